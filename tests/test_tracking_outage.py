"""A tracking server that is down does not lose a finished run: spool, then sync, no duplicates."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from vadflow.tasks.tracking.mlflow_runs import experiment_name, run_tags
from vadflow.tasks.tracking.spool import (
    LOCAL_PREFIX,
    TrackingSession,
    is_unreachable,
    pending_operations,
    sync,
)

pytest_plugins = ["tests.mlflow_server"]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One embedded SQLite store for this module's tests (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('outage-store') / 'mlflow.db'}"


def _dead_uri() -> str:
    from tests.mlflow_server import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def _local(record: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    return sorted(record)


class Trainer:
    """Stands in for a training loop: logs one loss per epoch and keeps its own record."""

    def __init__(self, session: TrackingSession, run: str) -> None:
        self.session, self.run = session, run
        self.record: list[tuple[int, float, int]] = []  # (epoch, loss, timestamp)

    def epochs(self, first: int, last: int) -> None:
        for epoch in range(first, last + 1):
            loss, stamp = 1.0 / epoch, int(time.time() * 1000)
            self.session.log_metrics(self.run, {"train_loss": loss}, step=epoch, timestamp=stamp)
            self.record.append((epoch, loss, stamp))


def test_unreachable_is_told_apart_from_a_refused_request() -> None:
    refused = MlflowException(
        "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/create failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: ..."
    )
    assert is_unreachable(refused)
    assert is_unreachable(requests.exceptions.ConnectionError("refused"))
    try:
        try:
            raise requests.exceptions.ReadTimeout("slow")
        except requests.exceptions.ReadTimeout as exc:  # how MLflow's REST client wraps it
            raise MlflowException(f"API request failed: {exc}")  # noqa: B904
    except MlflowException as wrapped:
        assert is_unreachable(wrapped)
    assert not is_unreachable(MlflowException("Run 'abc' not found", "RESOURCE_DOES_NOT_EXIST"))
    assert not is_unreachable(ValueError("bad value"))


def test_errors_that_are_not_outages_are_raised_not_spooled(store_uri: str, tmp_path: Path) -> None:
    with TrackingSession(store_uri, tmp_path / "spool") as session:
        run = session.start_run("vadflow/errors", "r", {"site": "errors"})
        session.log_params(run, {"lr": 0.1})
        with pytest.raises(MlflowException):
            session.log_params(run, {"lr": 0.2})  # a param cannot change: a bug, not an outage
        with pytest.raises(FileNotFoundError):
            session.log_artifact(run, tmp_path / "missing.png")
    assert session.online and session.spooled == 0
    assert not (tmp_path / "spool").exists()


def test_spool_survives_a_torn_last_line_and_names_a_bad_one(
    store_uri: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    uri = store_uri
    with TrackingSession(_dead_uri(), spool) as session:
        run = session.start_run("vadflow/torn", "r", {"site": "torn"})
        session.log_metrics(run, {"m": 1.0})
    with session.spool_file.open("a") as handle:
        handle.write('{"op": "log_batch", "key": "x", "run": "')  # a writer died mid-line
    report = sync(spool, uri)
    assert report.ok, report.errors
    assert report.applied == 2
    bad = spool / "20990101T000000-000000000-bad.jsonl"
    bad.write_text('{"op":"open"}\nnot json\n{"op":"close","key":"c"}\n')
    report = sync(spool, uri)
    assert not report.ok and "line 2: not valid JSON" in report.errors[0]


def test_a_run_created_in_a_later_spool_file_is_resolved(store_uri: str, tmp_path: Path) -> None:
    """Two sessions side by side: B's file sorts first but uses a run A created offline."""
    spool, dead = tmp_path / "spool", _dead_uri()
    b = TrackingSession(dead, spool)
    b.start_run("vadflow/side-by-side", "b-own", {"site": "side-by-side"})  # names B's file
    with TrackingSession(dead, spool) as a:
        shared = a.start_run("vadflow/side-by-side", "a-run", {"site": "side-by-side"})
    b.log_metrics(shared, {"m": 3.0})
    b.close()
    assert b.spool_file.name < a.spool_file.name
    report = sync(spool, store_uri)
    assert report.ok, report.errors
    client = MlflowClient(store_uri)
    assert client.get_run(report.runs[shared]).data.metrics == {"m": 3.0}


def test_offline_session_spools_everything_and_sync_replays_it_once(
    store_uri: str, tiny_detector, tmp_path: Path
) -> None:
    """No server at all: every call goes to the spool quickly; `sync` into a store then replays
    runs, params, curves, artifacts, the model and the champion gate, and a second replay (even
    of a copy without the ledger) changes nothing."""
    spool = tmp_path / "spool"
    site = "offline-site"
    overlay = tmp_path / "overlay.png"
    overlay.write_bytes(b"\x89PNG overlay")
    started = time.monotonic()
    with TrackingSession(_dead_uri(), spool) as session:
        parent = session.start_run(experiment_name(site), "nightly-1", run_tags(site))
        child = session.start_run(
            experiment_name(site), "ae_l2", run_tags(site, family="ae_l2"), parent=parent
        )
        session.log_params(child, {"config": {"lr": 0.001}, "tiling": {"tile_size": 32}})
        trainer = Trainer(session, child)
        trainer.epochs(1, 4)
        session.log_metrics(child, {"slide_auroc": 0.8})
        session.log_artifact(child, overlay, "heatmaps")
        model_uri = session.log_model(
            child, tiny_detector.directory, np.load(tiny_detector.directory / "example_tiles.npy")
        )
        decision = session.register_and_promote(
            child, site, "ae_l2", metric="slide_auroc", contracts_passed=True, diverged=False
        )
        session.end_run(child)
        session.end_run(parent)
    elapsed = time.monotonic() - started
    overlay.unlink()  # the spool kept its own copy
    assert not session.online and "ConnectionError" in (session.offline_reason or "")
    assert parent.startswith(LOCAL_PREFIX) and child.startswith(LOCAL_PREFIX)
    assert model_uri is None and decision is None
    assert elapsed < 30, f"giving up on the server took {elapsed:.0f} s"
    ops = [json.loads(line)["op"] for line in session.spool_file.read_text().splitlines()]
    assert ops[0] == "open" and ops[-1] == "close"
    assert ops.count("create_run") == 2 and "log_model" in ops
    assert pending_operations(spool) == session.spooled
    from vadflow.flows.cli.tracking import tracking_app

    status = CliRunner().invoke(tracking_app, ["status", "--spool", str(spool)])
    assert status.exit_code == 0 and f"{session.spooled} operation(s) waiting" in status.output
    before_sync = tmp_path / "spool-copy"
    shutil.copytree(spool, before_sync)

    still_down = sync(spool, _dead_uri())
    assert not still_down.ok and still_down.applied == 0
    assert still_down.remaining == session.spooled and "unreachable" in still_down.errors[0]

    uri = store_uri
    report = sync(spool, uri)
    assert report.ok, report.errors
    assert report.applied == session.spooled and report.archived == [session.spool_file.name]
    assert (spool / "synced" / session.spool_file.name).exists()
    assert pending_operations(spool) == 0
    client = MlflowClient(uri, registry_uri=uri)
    child_id, parent_id = report.runs[child], report.runs[parent]
    run = client.get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.params["config.lr"] == "0.001" and run.info.status == "FINISHED"
    assert _history(client, child_id, "train_loss") == _local(trainer.record)
    assert [a.path for a in client.list_artifacts(child_id, "heatmaps")] == ["heatmaps/overlay.png"]
    champion = client.get_model_version_by_alias(f"{site}-ae_l2", "champion")
    assert champion.run_id == child_id

    assert sync(spool, uri).applied == 0  # the ledger: nothing twice
    again = sync(before_sync, uri)  # no ledger: found by run key, op key and metric history
    assert again.ok, again.errors
    assert again.runs == report.runs
    assert _history(client, child_id, "train_loss") == _local(trainer.record)
    experiment = client.get_experiment_by_name(experiment_name(site)).experiment_id
    assert len(client.search_runs([experiment], run_view_type=ViewType.ALL)) == 2
    assert len(client.search_model_versions(f"name = '{site}-ae_l2'")) == 1


@pytest.mark.slow
def test_server_stopped_mid_run_then_sync_restores_the_history(
    tiny_detector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `mlflow server`: log, stop it mid-run, keep logging (spooled), start it again,
    `vadflow tracking sync`; the server's metric history equals the trainer's own record."""
    from tests.mlflow_server import MlflowServer, use_tracking_uri
    from vadflow.flows.cli.tracking import tracking_app

    server = MlflowServer(tmp_path / "server").start()
    spool = tmp_path / "spool"
    site = f"outage-{uuid.uuid4().hex[:6]}"
    try:
        session = TrackingSession(server.uri, spool)
        parent = session.start_run(experiment_name(site), "nightly", run_tags(site))
        child = session.start_run(
            experiment_name(site), "ae_l2", run_tags(site, family="ae_l2"), parent=parent
        )
        session.log_params(child, {"config": {"epochs": 9}})
        trainer = Trainer(session, child)
        trainer.epochs(1, 3)
        assert session.online and session.spooled == 0

        server.stop()
        trainer.epochs(4, 6)  # the server is gone: these go to the spool
        assert not session.online
        report_file = tmp_path / "report.md"
        report_file.write_text("# run report")
        session.log_artifact(child, report_file, "report")
        session.log_metrics(child, {"slide_auroc": 0.9})
        session.log_model(
            child, tiny_detector.directory, np.load(tiny_detector.directory / "example_tiles.npy")
        )
        session.register_and_promote(
            child, site, "ae_l2", metric="slide_auroc", contracts_passed=True, diverged=False
        )
        session.end_run(child)
        session.close()
        # Another task starts while the server is still down: its run exists only locally.
        with TrackingSession(server.uri, spool) as late:
            other = late.start_run(
                experiment_name(site), "padim", run_tags(site, family="padim"), parent=parent
            )
            late.log_metrics(other, {"slide_auroc": 0.7})
            late.end_run(other)
        assert other.startswith(LOCAL_PREFIX)

        server.start()
        # The server is back, but the child still has operations in the spool: a new session
        # queues behind them rather than sending epoch 7 ahead of epochs 4-6.
        with TrackingSession(server.uri, spool) as after:
            trainer.session = after
            trainer.epochs(7, 7)
            after.end_run(parent)
        assert after.spooled == 1 and after.online  # epoch 7 queued; the parent had nothing

        monkeypatch.setenv("VADFLOW_HOME", str(tmp_path / "home"))
        runner = CliRunner()
        args = ["sync", "--tracking-uri", server.uri, "--spool", str(spool)]
        result = runner.invoke(tracking_app, [*args, "--home", str(tmp_path / "home")])
        assert result.exit_code == 0, result.output
        assert "0 left" in result.output

        client = MlflowClient(server.uri, registry_uri=server.uri)
        assert _history(client, child, "train_loss") == _local(trainer.record)
        assert [m.step for m in client.get_metric_history(child, "train_loss")] == list(range(1, 8))
        assert client.get_run(child).data.metrics["slide_auroc"] == 0.9
        assert [a.path for a in client.list_artifacts(child, "report")] == ["report/report.md"]
        assert client.get_run(parent).info.status == "FINISHED"
        late_runs = client.search_runs(
            [client.get_experiment_by_name(experiment_name(site)).experiment_id],
            filter_string="tags.family = 'padim'",
        )
        assert len(late_runs) == 1
        assert late_runs[0].data.tags["mlflow.parentRunId"] == parent
        version = client.get_model_version_by_alias(f"{site}-ae_l2", "champion")
        assert version.run_id == child
        with use_tracking_uri(server.uri):
            loaded = mlflow.pyfunc.load_model(f"models:/{site}-ae_l2@champion")
            scores = loaded.predict(tiny_detector.tiles[:3])
        np.testing.assert_allclose(scores, tiny_detector.scores(tiny_detector.tiles[:3]), rtol=1e-6)

        # Replaying twice gives the same history.
        result = runner.invoke(tracking_app, [*args, "--home", str(tmp_path / "home")])
        assert result.exit_code == 0 and "replayed 0" in result.output
        assert _history(client, child, "train_loss") == _local(trainer.record)
    finally:
        server.stop()


def test_nightly_logging_finishes_with_the_server_down(
    store_uri: str, tiny_detector, tmp_path: Path
) -> None:
    """The nightly's own calls (`start_nightly`, `track_family`, `finish_nightly`) complete
    with no server; after sync the family run, its model and the champion are there."""
    from vadflow.tasks.site import TilingConfig
    from vadflow.tasks.tracking.nightly import (
        PromotionPolicy,
        finish_nightly,
        start_nightly,
        track_family,
    )

    spool, dead, site = tmp_path / "spool", _dead_uri(), "down-site"
    fit, evaluation = _tiny_night(tiny_detector)
    with TrackingSession(dead, spool) as session:
        parent = start_nightly(session, site, "v1", tags={}, params={"site": site})
    with TrackingSession(dead, spool) as session:
        tracked = track_family(
            session,
            parent,
            site=site,
            fit=fit,
            evaluation=evaluation,
            overlays=[],
            tags={},
            tiling=TilingConfig(),
            promotion=PromotionPolicy(),
            eval_set_hash="f" * 64,
        )
    with TrackingSession(dead, spool) as session:
        assert (
            finish_nightly(
                session,
                parent,
                site=site,
                family_metrics={"ae_l2": evaluation.metrics},
                comparison_dir=tmp_path / "comparison",
            )
            == []
        )
    assert tracked.spooled and tracked.run_id.startswith(LOCAL_PREFIX)
    assert tracked.model_uri is None and tracked.decision is None

    report = sync(spool, store_uri)
    assert report.ok, report.errors
    client = MlflowClient(store_uri, registry_uri=store_uri)
    run = client.get_run(report.runs[tracked.run_id])
    assert run.data.tags["mlflow.parentRunId"] == report.runs[parent]
    assert run.data.metrics["slide_auroc"] == 0.9 and run.info.status == "FINISHED"
    champion = client.get_model_version_by_alias(f"{site}-ae_l2", "champion")
    assert champion.run_id == run.info.run_id
    assert client.get_run(report.runs[parent]).data.metrics["ae_l2.slide_auroc"] == 0.9


def test_a_family_run_opened_while_down_is_created_at_sync_with_its_start(
    store_uri: str, tiny_detector, tmp_path: Path
) -> None:
    """A child run opened before training while the server is down (`start_family`) and
    logged into by a later session is created at sync with its own start time, so its run
    spans training; the registered version carries the manifest datasets' digests."""
    import time

    import polars as pl

    from vadflow.tasks.site import TilingConfig
    from vadflow.tasks.tracking.nightly import (
        PromotionPolicy,
        manifest_datasets,
        start_family,
        start_nightly,
        track_family,
    )

    spool, dead, site = tmp_path / "spool", _dead_uri(), "down-early"
    slides = tmp_path / "slides.parquet"
    pl.DataFrame(
        {
            "slide_id": ["n1", "t1"],
            "split": ["train", "test"],
            "label": ["normal", "tumor"],
            "sha256": ["a", "b"],
            "status": ["ok", "ok"],
        }
    ).write_parquet(slides)
    fit, evaluation = _tiny_night(tiny_detector)
    tags = {"prefect_flow_run_id": "flow-early"}
    with TrackingSession(dead, spool) as session:
        parent = start_nightly(session, site, "v1", tags=tags, params={"site": site})
    with TrackingSession(dead, spool) as session:
        child = start_family(session, parent, site=site, family="ae_l2", tags=tags)
    opened_ms = time.time() * 1000
    time.sleep(0.05)  # "training"
    with TrackingSession(dead, spool) as session:
        tracked = track_family(
            session,
            parent,
            site=site,
            fit=fit,
            evaluation=evaluation,
            overlays=[],
            tags=tags,
            tiling=TilingConfig(),
            promotion=PromotionPolicy(min={}),
            eval_set_hash="f" * 64,
            slides_path=slides,
            run=child,
        )
    assert child.startswith(LOCAL_PREFIX) and tracked.run_id == child and tracked.spooled

    report = sync(spool, store_uri)
    assert report.ok, report.errors
    client = MlflowClient(store_uri, registry_uri=store_uri)
    run = client.get_run(report.runs[child])
    assert run.data.tags["mlflow.parentRunId"] == report.runs[parent]
    assert run.data.tags["prefect_flow_run_id"] == "flow-early"
    assert run.data.tags["contracts"] == "passed" and run.info.status == "FINISHED"
    assert run.info.start_time <= opened_ms < run.info.end_time
    assert run.info.end_time - run.info.start_time >= 50
    version = client.get_model_version_by_alias(f"{site}-ae_l2", "champion")
    assert version.run_id == run.info.run_id
    expected = {d.context: (d.name, d.digest) for d in manifest_datasets(slides, site)}
    for context, (name, digest) in expected.items():
        assert version.tags[f"dataset.{context}.name"] == name
        assert version.tags[f"dataset.{context}.digest"] == digest


def _tiny_night(tiny_detector):
    """A trained tiny model and its evaluation, as the nightly hands them to tracking."""
    from vadflow.tasks.detectors.base import FitReport
    from vadflow.tasks.records import EpochLoss, Evaluated, TrainedModel

    fit = TrainedModel(
        family="ae_l2",
        model_dir=str(tiny_detector.directory),
        supervision="none",
        train_tiles=16,
        val_tiles=8,
        config={"tile_size": 32},
        report=FitReport(1, 1, [0.5], [0.6], seconds=1.0, device="cpu"),
        curves=(EpochLoss(1, 0.5, 0.6),),
    )
    evaluation = Evaluated(
        name="ae_l2",
        metrics={"slide_auroc": 0.9},
        froc_points={},
        threshold=0.5,
        value_range=(0.0, 1.0),
        table=(),
        report_dir="",
    )
    return fit, evaluation
