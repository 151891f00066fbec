"""The local Prefect API a command starts never outlives it (issue #24, case 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

# What a command does (flows/cli/startup.py: prefect_api), then it hangs until killed.
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from vadflow.flows.env import configure_state
    configure_state(sys.argv[1])
    from prefect import flow
    from vadflow.flows.cli.startup import prefect_api

    @flow
    def answer():
        return 42

    with prefect_api():
        print("api", os.environ["PREFECT_API_URL"], answer(), flush=True)
        if sys.argv[2] == "hang":
            time.sleep(600)
    print("after", os.environ.get("PREFECT_API_URL"), flush=True)
    """
)


def _servers_of(parent: psutil.Process) -> list[psutil.Process]:
    servers = []
    for child in parent.children(recursive=True):
        try:
            if "vadflow.flows.local_api" in " ".join(child.cmdline()):
                servers.append(child)
        except psutil.Error:  # gone or a zombie meanwhile
            continue
    return servers


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    return env


@pytest.mark.slow
def test_a_killed_run_leaves_no_prefect_server(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    run = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "home"), "hang"],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ""
        while not line.startswith("api ") and run.poll() is None:  # Prefect logs first
            line = run.stdout.readline()
        # the flow ran against the local API
        assert line.startswith("api http://127.0.0.1:") and line.split()[-1] == "42", line
        servers = _servers_of(psutil.Process(run.pid))
        assert len(servers) == 1
        server = servers[0]
        run.send_signal(signal.SIGKILL)  # no exit handler runs
        run.wait(timeout=10)
        gone, alive = psutil.wait_procs([server], timeout=15)
        assert not alive, f"the local Prefect API (pid {server.pid}) outlived its run"
    finally:
        run.kill()
        run.wait()


@pytest.mark.slow
def test_the_local_api_stops_and_the_setting_is_restored_when_the_command_ends(
    tmp_path: Path,
) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "home"), "end"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "api http://127.0.0.1:" in done.stdout and "after None" in done.stdout
    assert "Error logging to API" not in done.stdout + done.stderr  # logs drained first
    assert (tmp_path / "home" / "prefect-api.log").exists()
