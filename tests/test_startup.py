"""Less waiting before work: what importing a flow costs, and how many threads torch gets.

A flow module (and the command line that imports it) must not load the libraries that only
stages use: they cost seconds of CPU before the first task, in every process that imports the
flow. Each check runs in a fresh interpreter, since this test process has them all loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vadflow.tasks.detectors.components import threads
from vadflow.tasks.detectors.components.threads import threads_per_task

ROOT = Path(__file__).resolve().parents[1]
# What only the stages need: deep learning, tracking, contracts, plotting, image science.
HEAVY = ("torch", "mlflow", "great_expectations", "matplotlib", "sklearn", "skimage", "scipy")


def _loaded_after_import(module: str) -> list[str]:
    probe = (
        "import json, sys\n"
        f"import {module}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module", ["vadflow.flows.nightly", "vadflow.flows.batch_score", "vadflow.flows.cli"]
)
def test_importing_a_flow_or_the_cli_loads_no_stage_library(module: str) -> None:
    assert _loaded_after_import(module) == []


def test_the_probe_sees_a_heavy_import() -> None:
    # The stage behind the score task does load torch: the probe above can fail.
    assert "torch" in _loaded_after_import("vadflow.tasks.scoring.run")


@pytest.mark.parametrize(
    ("cores", "concurrent", "expected"),
    [
        (2, 1, 2),  # training: one family at a time takes every core
        (2, 2, 1),  # two slides scored side by side on two cores
        (16, 3, 5),  # three slides on 16 cores: an equal share, rounded down
        (2, 8, 1),  # more tasks than cores still get one thread each
        (1, 1, 1),
        (0, 0, 1),  # nonsense in, one thread out
    ],
)
def test_threads_per_task_shares_the_cores(cores: int, concurrent: int, expected: int) -> None:
    assert threads_per_task(cores, concurrent) == expected


def test_a_users_omp_cap_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.set_torch_threads(concurrent=1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert threads.set_torch_threads(concurrent=2) == 2
    torch.set_num_threads(before)


def test_torch_slots_bound_the_tasks_running_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    # New threads start from the last count set anywhere: put this process's back afterwards.
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "SLOTS", 2)
    monkeypatch.setattr(threads, "_SLOTS", threading.BoundedSemaphore(2))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # no user cap
    running, peak, seen = [0], [0], []
    lock = threading.Lock()

    def task(expected: int | None) -> None:
        with threads.torch_slot(expected) as count:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                seen.append((count, torch.get_num_threads()))
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    workers = [threading.Thread(target=task, args=(None,)) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert peak[0] == 2
    assert seen == [(1, 1)] * 6  # a map over many slides: one thread each, set in its thread

    alone = threading.Thread(target=task, args=(1,))  # one slide: it may use both cores
    alone.start()
    alone.join()
    torch.set_num_threads(before)
    assert seen[-1] == (2, 2)
