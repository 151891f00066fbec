"""No run left RUNNING: how a night's MLflow runs end when the night does not.

    end_flow_runs(uri, site, flow_run_id, "FAILED", why)  # the nightly flow's failure hooks
    closed = close_stale_runs(client, site)                # the next start: what a SIGKILL left

An exception in the nightly flow ends its runs as FAILED, SIGTERM or Ctrl-C (Prefect turns
both into a crash, or a cancellation) as KILLED, from the flow's hooks (`flows/nightly.py`).
A SIGKILL (or a machine that lost power) runs no handler, so every parent run carries its owner
(`vadflow.owner` = `<host>:<pid>`) and a heartbeat (`vadflow.heartbeat`, epoch ms, set when it
starts and as each family is tracked). On the next start, a RUNNING nightly run of the site is
closed as KILLED, with the reason in the tag `vadflow.end_reason`, when its owner on this host
is dead or its heartbeat is older than `STALE_AFTER_S`; its children still RUNNING go with it.
Outputs the killed night left half-written (model folders without `config.json`, heatmap
folders without `scored.json`) are removed by `remove_partial_outputs`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vadflow.tasks.tracking.mlflow_runs import (
    TAG_FLOW_RUN,
    TAG_PARENT,
    TAG_RUN_KIND,
    experiment_name,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

TAG_OWNER = "vadflow.owner"  # "<host>:<pid>" of the process that runs the night
TAG_HEARTBEAT = "vadflow.heartbeat"  # epoch ms of the owner's last sign of life
TAG_END_REASON = "vadflow.end_reason"  # why vadflow, not the run itself, ended it
# A night that has not beaten for this long is dead even if its owner's pid is in use (a
# reused pid, or another host's process that cannot be asked).
STALE_AFTER_S = 24 * 3600
MODEL_FILE = "config.json"  # written last-but-one by a detector's save(); absent: partial
SCORED_FILE = "scored.json"  # written once a run's heatmaps are complete


@dataclass(frozen=True)
class ClosedRun:
    run_id: str
    name: str
    version: str | None  # the night's version tag: whose outputs may be partial
    reason: str


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def liveness_tags() -> dict[str, str]:
    """The tags that let a later start tell this process's runs apart from abandoned ones."""
    return {TAG_OWNER: owner(), TAG_HEARTBEAT: str(int(time.time() * 1000))}


def end_run_tree(client: MlflowClient, run_id: str, status: str, reason: str) -> list[str]:
    """End `run_id` and its children still RUNNING as `status` with `reason`; returns the ids
    ended. A run already ended is left as it is."""
    run = client.get_run(run_id)
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{run_id}' and attributes.status = 'RUNNING'",
    )
    ended = []
    for found in [*children, run]:
        if found.info.status != "RUNNING":
            continue
        client.set_tag(found.info.run_id, TAG_END_REASON, reason)
        client.set_terminated(found.info.run_id, status)
        ended.append(found.info.run_id)
    return ended


def _no_store_yet(tracking_uri: str) -> bool:
    """A local SQLite or file store that does not exist: opening it would create it."""
    for scheme in ("sqlite:///", "file://"):
        if tracking_uri.startswith(scheme):
            return not Path(tracking_uri.removeprefix(scheme)).exists()
    return False


def end_flow_runs(
    tracking_uri: str, site: str, flow_run_id: str, status: str, reason: str
) -> list[str]:
    """End every run of `site` that the Prefect flow run `flow_run_id` left RUNNING (the night's
    parent and its children all carry its id as a tag) as `status`, with `reason`.

    Called from the nightly flow's failure, crash and cancellation hooks: an exception ends the
    runs as FAILED, SIGTERM/SIGINT (a crash or a cancellation to Prefect) as KILLED. Best
    effort: the night is failing already, and a tracking error must not hide why."""
    from mlflow.tracking import MlflowClient

    if not flow_run_id or _no_store_yet(tracking_uri):
        return []  # nothing was tracked (the night failed before tracking): create nothing
    try:
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment_name(site))
        if found is None or not flow_run_id:
            return []
        running = client.search_runs(
            [found.experiment_id],
            filter_string=(
                f"attributes.status = 'RUNNING' and tags.`{TAG_FLOW_RUN}` = '{flow_run_id}'"
            ),
        )
        for run in running:
            client.set_tag(run.info.run_id, TAG_END_REASON, reason[:4000])
            client.set_terminated(run.info.run_id, status)
    except Exception as exc:  # the tracking server may be why the night failed
        logger.warning(
            "could not end the MLflow runs of flow run %s as %s (%s); the next start closes them",
            flow_run_id,
            status,
            exc,
        )
        return []
    ended = [run.info.run_id for run in running]
    if ended:
        logger.warning("ended MLflow runs %s as %s: %s", ended, status, reason)
    return ended


def close_stale_runs(
    client: MlflowClient, site: str, stale_after_s: float = STALE_AFTER_S
) -> list[ClosedRun]:
    """Close this site's nightly runs left RUNNING by a process that is gone (see the module
    docstring), with their children, as KILLED. Returns what was closed."""
    found = client.get_experiment_by_name(experiment_name(site))
    if found is None:
        return []
    running = client.search_runs(
        [found.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_RUN_KIND}` = 'nightly'",
    )
    now_ms = time.time() * 1000
    closed = []
    for run in running:
        why = _why_stale(run, now_ms, stale_after_s)
        if why is None:
            continue
        reason = f"closed as KILLED at the next start: {why}"
        end_run_tree(client, run.info.run_id, "KILLED", reason)
        closed.append(
            ClosedRun(run.info.run_id, run.info.run_name, run.data.tags.get("version"), reason)
        )
    return closed


def _why_stale(run, now_ms: float, stale_after_s: float) -> str | None:
    tags = run.data.tags
    host, _, pid = tags.get(TAG_OWNER, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
        return f"its process {pid} on {host} is gone"
    beat = float(tags.get(TAG_HEARTBEAT) or run.info.start_time or 0)
    age_s = (now_ms - beat) / 1000
    if age_s > stale_after_s:
        return f"no heartbeat for {age_s / 3600:.1f} h (limit {stale_after_s / 3600:g} h)"
    return None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_partial_outputs(site_root: Path, version: str) -> list[Path]:
    """Remove what a killed night `version` left half-written under a site's outputs: model
    folders `models/<family>/<version>/` without `config.json` and heatmap folders
    `heatmaps/<family>-<version>/` without `scored.json`. Returns what was removed."""
    root = Path(site_root)
    removed = []
    for folder in sorted(root.glob(f"models/*/{version}")):
        if folder.is_dir() and not any(folder.rglob(MODEL_FILE)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for folder in sorted(root.glob(f"heatmaps/*-{version}")):
        if folder.is_dir() and not any(folder.rglob(SCORED_FILE)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
