"""Test harness: all state under a project-local folder, one Prefect API for the session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATE_ROOT = ROOT / ".pytest-state"


def _remove_stale_state() -> None:
    """Folders of earlier sessions whose process is gone (a green run removes its own)."""
    for folder in STATE_ROOT.glob("*-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


_remove_stale_state()
STATE = STATE_ROOT / f"run-{os.getpid()}"
TMP = STATE_ROOT / f"tmp-{os.getpid()}"  # apart from STATE: Prefect cleans it up at exit
STATE.mkdir(parents=True, exist_ok=True)
TMP.mkdir(parents=True, exist_ok=True)
tempfile.tempdir = str(TMP)  # Prefect's harness database lands here too
# Torch's OpenMP threads spin-wait between small ops; on 2 busy cores that costs 10-50x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vadflow.flows.env import configure_state  # noqa: E402

configure_state(STATE / "home")
os.environ["PREFECT_HOME"] = str(STATE / "home" / "prefect")


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return STATE


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API (SQLite) for every flow test: it takes ~25 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_sessionfinish(session, exitstatus) -> None:
    if exitstatus == 0 and not os.environ.get("VADFLOW_KEEP_TEST_STATE"):
        atexit.register(shutil.rmtree, STATE, ignore_errors=True)
