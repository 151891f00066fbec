"""A local Prefect API that never outlives the run that started it.

With no `PREFECT_API_URL`, Prefect starts its own API server in a subprocess and stops it at
exit (`atexit`). A run killed from outside (a scheduler's timeout, SIGKILL, the OOM killer)
runs no exit handler, and that server, re-parented to init, kept running (~240 MB each).

`local_prefect_api()` starts the same server (Prefect's `create_app` under uvicorn, in
Prefect's ephemeral mode, on 127.0.0.1 and a free port) through this module's `main`, which
watches the process that started it and shuts the server down within a second or two once
that process is gone, however it ended. On Linux the kernel also sends SIGTERM the moment the
parent dies (`PR_SET_PDEATHSIG`); the watch covers the other systems and the gap before the
server's own start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Prefect's private switches for the server it starts itself (prefect/server/api/server.py,
# SubprocessASGIServer._run_uvicorn_command): no UI, ephemeral mode, final settings.
_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
WATCH_INTERVAL_S = 0.5
STOP_GRACE_S = 5.0


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _start(port: int, log: Path) -> subprocess.Popen[bytes]:
    from prefect.settings import get_current_settings

    env = {
        **os.environ,
        **_SERVER_ENV,
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    env.pop("PREFECT_API_URL", None)
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "vadflow.flows.local_api", str(port), str(os.getpid())],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


@contextlib.contextmanager
def local_prefect_api(home: Path, timeout_s: float) -> Iterator[str]:
    """Start a local Prefect API tied to this process and point Prefect at it; yields its URL.

    The server's output goes to `home/prefect-api.log`. RuntimeError when it does not answer
    within `timeout_s` (the message contains Prefect's own "Timed out while attempting to
    connect to ephemeral Prefect API server", so `flows.env.api_start_failure` names the
    setting to raise) or exits first (the log's last lines are in the message).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log = Path(home) / "prefect-api.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    process = _start(port, log)
    try:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while not _healthy(url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"the local Prefect API exited with code {process.returncode} before "
                    f"answering; {log}: {_tail(log)}"
                )
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    "Timed out while attempting to connect to ephemeral Prefect API server "
                    f"({url}, waited {timeout_s:g} s; its output: {log})"
                )
            time.sleep(0.2)
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # for worker processes this run starts
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain()
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        _stop(process)


def _drain() -> None:
    """Send the logs and events still queued before the server goes (else Prefect prints
    "Error logging to API" at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=5)


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when the parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _watch(parent: int) -> None:
    """Stop this server once `parent` is gone: SIGTERM to ourselves (uvicorn shuts down
    cleanly), then a hard exit if that takes longer than the grace time."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os._exit(1)


def main(argv: list[str]) -> None:
    """`python -m vadflow.flows.local_api PORT PARENT_PID`: serve Prefect's API until the
    parent process is gone."""
    port, parent = int(argv[0]), int(argv[1])
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the kernel could be told
        sys.exit(1)
    threading.Thread(target=_watch, args=(parent,), name="watch-parent", daemon=True).start()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
