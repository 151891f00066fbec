"""What `vadflow run` prints, as a person sees it in a shell: one line per stage and the
results, no Prefect log line; the log is in a file the output names (`--verbose`: on the
terminal). Run in a fresh interpreter, as the console script runs, with Prefect's local API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.flow]

ROOT = Path(__file__).resolve().parents[1]
# A Prefect log line as its console handler formats it: "05:30:41.315 | INFO    | ...".
PREFECT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\|")


def _vadflow(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent), "PREFECT_HOME": str(tmp_path / "p")}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)  # the embedded default: a local API started by this command
    return subprocess.run(
        [sys.executable, "-c", "from vadflow.flows.cli import app; app()", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_a_run_shows_stages_not_prefect_lines_and_names_its_log(tmp_path: Path) -> None:
    from vadflow.tasks.synth.industrial import make_industrial_site

    site = make_industrial_site(tmp_path, "line-a", n_train=4, n_test_good=1, n_test_per_defect=1)
    home = tmp_path / "home"
    args = ["run", str(site), "--family", "ae_l2", "--epochs", "1", "--home", str(home)]

    quiet = _vadflow(args, tmp_path)
    printed = quiet.stdout + quiet.stderr
    assert quiet.returncode == 0, printed
    assert not [line for line in printed.splitlines() if PREFECT_LINE.match(line)], printed
    for noise in ("Task run '", "Flow run '", "temporary server", "mlflow.store"):
        assert noise not in printed, noise
    for stage in ("register", "tile", "train ae_l2", "evaluate ae_l2", "track ae_l2"):
        assert re.search(rf"✓ {stage} ", printed), stage
    named = re.search(r"Prefect's log: +(\S+)", quiet.stdout)
    assert named, quiet.stdout
    log = Path(named.group(1))
    assert log.parent == home.resolve() / "logs" and log.is_file()
    text = log.read_text()
    assert "Finished in state Completed" in text  # the flow's and tasks' lines
    # The local Prefect API is vadflow's own child (flows/local_api.py), stopped when the flow
    # ends: its output has a file of its own beside the logs.
    assert (home / "prefect-api.log").is_file()

    verbose = _vadflow([*args, "--verbose"], tmp_path)
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert any(PREFECT_LINE.match(line) for line in verbose.stderr.splitlines())
    assert "Prefect's log:" not in verbose.stdout
