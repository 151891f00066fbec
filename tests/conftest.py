"""Test harness: all state under a project-local folder, one Prefect API for the session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".pytest-state" / f"run-{os.getpid()}"
STATE.mkdir(parents=True, exist_ok=True)
(STATE / "tmp").mkdir(exist_ok=True)
tempfile.tempdir = str(STATE / "tmp")  # Prefect's harness database lands here too

from flows.env import configure_state  # noqa: E402

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
    # Removed at exit, after Prefect's harness has cleaned up its own temporary folder.
    if exitstatus == 0 and not os.environ.get("VADFLOW_KEEP_TEST_STATE"):
        atexit.register(shutil.rmtree, STATE, ignore_errors=True)
