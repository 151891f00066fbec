"""Run identity and exclusion: unique run versions and one run per site at a time.

A run version names a run's model, heatmap and report folders and its MLflow tags. It was a
timestamp to the second, so two runs started in the same second shared folders; now it adds
milliseconds and a random suffix and still sorts by start time.

`site_lock` makes a second run of the same site fail at once with who holds it, instead of
both writing the same folders (and racing to create a fresh MLflow store). The lock is an
advisory `flock` on `<home>/locks/<site>.lock`: the kernel releases it when the holder exits,
however it exits, so a lock left by a killed run is simply taken over (the file's text only
says who held it last). `flock` is local to one machine: runs of one site on several machines
need a shared Prefect concurrency limit instead (README, "Faults").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path


def run_version(now: datetime | None = None) -> str:
    """A new run's version: `YYYYmmddTHHMMSS.mmm-xxxx` (UTC, milliseconds, 4 random hex
    digits); unique across runs started at the same moment, sortable by start time."""
    moment = now or datetime.now(UTC)
    return f"{moment:%Y%m%dT%H%M%S}.{moment.microsecond // 1000:03d}-{secrets.token_hex(2)}"


class SiteBusyError(RuntimeError):
    """Another run of the same site holds its lock."""


def lock_path(home: str | Path, site: str) -> Path:
    """`<home>/locks/<site>.lock`, the site name made safe for a file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", site) or "_"
    return Path(home) / "locks" / f"{safe}.lock"


@contextlib.contextmanager
def site_lock(home: str | Path, site: str, run: str) -> Iterator[Path]:
    """Hold site `site`'s run lock while the block runs; SiteBusyError at once when another
    run holds it, naming its PID, host, run and start time."""
    import fcntl  # POSIX; vadflow's workers are Linux or macOS

    path = lock_path(home, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SiteBusyError(_busy_message(site, path)) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run": run,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _busy_message(site: str, path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    who = (
        f"PID {holder.get('pid', '?')} on {holder.get('host', '?')} (run "
        f"{holder.get('run', '?')}) since {holder.get('since', '?')}"
    )
    return (
        f"site {site} is being run by {who}; wait for it to finish or stop it "
        f"(the lock, {path}, is released when that process exits)"
    )
