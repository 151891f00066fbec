"""No run left RUNNING (issue #23.5): a SIGKILLed night is closed as KILLED by the next start,
with its partial outputs removed; a failing or interrupted flow ends its own runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vadflow.tasks.records import TrackingTarget
from vadflow.tasks.site import SiteConfig
from vadflow.tasks.tracking.lifecycle import (
    TAG_END_REASON,
    TAG_HEARTBEAT,
    TAG_OWNER,
    close_stale_runs,
    end_flow_runs,
)
from vadflow.tasks.tracking.mlflow_runs import (
    TAG_FLOW_RUN,
    experiment_name,
    run_tags,
    tracking_target,
)
from vadflow.tasks.tracking.nightly import open_nightly_run, start_family
from vadflow.tasks.tracking.spool import TrackingSession

SITE = "lifecycle-site"

# The killed night: opens its parent run and a child, half-writes a model and a heatmap
# folder, says so, and waits to be killed.
KILLED_NIGHT = """
import json, sys, time
from pathlib import Path
from vadflow.tasks.records import TrackingTarget
from vadflow.tasks.site import SiteConfig
from vadflow.tasks.tracking.mlflow_runs import run_tags
from vadflow.tasks.tracking.nightly import open_nightly_run, start_family
from vadflow.tasks.tracking.spool import TrackingSession

target = TrackingTarget(**json.loads(sys.argv[1]))
site = SiteConfig(name=sys.argv[2], domain="pathology", source=sys.argv[3])
root = Path(sys.argv[3])
parent = open_nightly_run(target, site, "v1", run_tags(site.name, flow_run_id="f1"), root)
with TrackingSession(target.tracking_uri, target.spool_dir) as session:
    child = session.start_run(f"vadflow/{site.name}", "ae_l2", {"site": site.name}, parent=parent)
(root / "models" / "ae_l2" / "v1").mkdir(parents=True)
(root / "models" / "ae_l2" / "v1" / "weights.pt").write_bytes(b"half")
(root / "heatmaps" / "ae_l2-v1").mkdir(parents=True)
(root / "heatmaps" / "ae_l2-v1" / "slide-1.tif").write_bytes(b"half")
print(json.dumps({"parent": parent, "child": child}), flush=True)
time.sleep(600)
"""


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingTarget:
    """The embedded store under a fresh home (what `--home` tracks into)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking_target(None, tmp_path / "home")


def _site(root: Path) -> SiteConfig:
    return SiteConfig(name=SITE, domain="pathology", source=str(root))


def _running(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(experiment_name(SITE))
    return client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")


def test_a_sigkilled_night_is_closed_by_the_next_start(target, tmp_path: Path) -> None:
    root = tmp_path / "outputs" / SITE
    kept_model = root / "models" / "ae_l2" / "v0"  # an earlier, complete night: untouched
    kept_model.mkdir(parents=True)
    (kept_model / "config.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    night = subprocess.Popen(
        [sys.executable, "-c", KILLED_NIGHT, json.dumps(target.__dict__), SITE, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = night.stdout.readline()
        assert line, night.stderr.read()
        runs = json.loads(line)
    finally:
        night.send_signal(signal.SIGKILL)  # no handler runs: only the next start can help
        night.wait(timeout=30)
    client = MlflowClient(target.tracking_uri)
    assert {r.info.run_id for r in _running(client)} == {runs["parent"], runs["child"]}
    assert client.get_run(runs["parent"]).data.tags[TAG_OWNER].endswith(f":{night.pid}")

    rerun = open_nightly_run(target, _site(root), "v2", run_tags(SITE, flow_run_id="f2"), root)
    for run_id in (runs["parent"], runs["child"]):
        killed = client.get_run(run_id)
        assert killed.info.status == "KILLED"
        assert f"its process {night.pid}" in killed.data.tags[TAG_END_REASON]
    assert not (root / "models" / "ae_l2" / "v1").exists()
    assert not (root / "heatmaps" / "ae_l2-v1").exists()
    assert (kept_model / "config.json").exists()
    assert [r.info.run_id for r in _running(client)] == [rerun]  # the rerun's own, alive
    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        session.end_run(rerun, "FINISHED")
    assert _running(client) == []  # afterwards, no run of the site is RUNNING


def test_a_stale_heartbeat_is_closed_and_a_fresh_one_is_left(target) -> None:
    client = MlflowClient(target.tracking_uri)
    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        experiment = experiment_name(SITE)
        day_old = str(int((time.time() - 30 * 3600) * 1000))
        now = str(int(time.time() * 1000))
        other_host = {**run_tags(SITE), TAG_OWNER: "another-host:1"}
        stale = session.start_run(experiment, "old", {**other_host, TAG_HEARTBEAT: day_old})
        alive = session.start_run(experiment, "alive", {**other_host, TAG_HEARTBEAT: now})
    closed = close_stale_runs(client, SITE)
    assert [c.run_id for c in closed] == [stale]
    assert "no heartbeat for 30.0 h" in closed[0].reason
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"


def test_a_failed_flow_ends_its_runs(target) -> None:
    client = MlflowClient(target.tracking_uri)
    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        experiment = experiment_name(SITE)
        ours = run_tags(SITE, flow_run_id="flow-a")
        parent = session.start_run(experiment, "nightly", ours)
        child = session.start_run(experiment, "ae_l2", ours, parent=parent)
        # A family's child opened before its training, as the flow does, ends with the night.
        early = start_family(session, parent, site=SITE, family="padim", tags=ours)
        other = session.start_run(experiment, "nightly", run_tags(SITE, flow_run_id="flow-b"))
    ended = end_flow_runs(target.tracking_uri, SITE, "flow-a", "FAILED", "ValueError: boom")
    assert sorted(ended) == sorted([parent, child, early])
    for run_id in (parent, child, early):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags[TAG_END_REASON] == "ValueError: boom"
    assert client.get_run(other).info.status == "RUNNING"
    assert client.get_run(other).data.tags[TAG_FLOW_RUN] == "flow-b"
    # An unreachable store does not hide the night's own error: nothing ended, no raise.
    assert end_flow_runs("http://127.0.0.1:9", SITE, "flow-b", "KILLED", "x") == []
