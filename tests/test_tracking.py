"""MLflow runs that tell the story: structure, comparison, the CLI, and artifacts on S3."""

from __future__ import annotations

import json
import math
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from vadflow.tasks.detectors.base import FitReport
from vadflow.tasks.records import EpochLoss, Evaluated, SlideResult, TrainedModel
from vadflow.tasks.site import TilingConfig
from vadflow.tasks.tracking.compare import compare_runs, write_comparison
from vadflow.tasks.tracking.mlflow_runs import (
    curve_metrics,
    default_artifact_root,
    experiment_name,
    family_params,
    manifest_hashes,
    resolve_tracking_uri,
    run_tags,
)
from vadflow.tasks.tracking.nightly import (
    PromotionPolicy,
    finish_nightly,
    start_nightly,
    track_family,
)
from vadflow.tasks.tracking.spool import TrackingSession
from vadflow.tasks.tracking.system_metrics import SystemMetrics, collectors

pytest_plugins = ["tests.mlflow_server"]

PNG = b"\x89PNG\r\n\x1a\n"


# --- structure helpers (no server) ---------------------------------------------------------


def test_tracking_uri_comes_from_flag_then_environment_then_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    embedded = resolve_tracking_uri(None, tmp_path)
    assert embedded == f"sqlite:///{(tmp_path / 'mlflow' / 'mlflow.db').resolve()}"
    assert default_artifact_root(embedded, tmp_path) == tmp_path / "mlflow" / "artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    assert default_artifact_root("http://tracking.example:5000") is None  # the server decides
    assert resolve_tracking_uri("http://other:5000", tmp_path) == "http://other:5000"


def test_tags_params_and_curves_have_their_documented_shape(tmp_path: Path) -> None:
    slides = tmp_path / "slides.parquet"
    slides.write_bytes(b"slides")
    tiles = [tmp_path / "b.parquet", tmp_path / "a.parquet"]
    for path in tiles:
        path.write_bytes(path.name.encode())
    hashes = manifest_hashes(slides, tiles)
    assert hashes == manifest_hashes(slides, list(reversed(tiles)))  # order does not matter
    tags = run_tags(
        "site-a",
        family="ae_l2",
        git_commit="abc1234",
        flow_run_id="f-1",
        manifest_hashes=hashes,
        contracts_passed=False,
    )
    assert tags["site"] == "site-a" and tags["family"] == "ae_l2"
    assert tags["git_commit"] == "abc1234" and tags["prefect_flow_run_id"] == "f-1"
    assert tags["manifest.slides.sha256"] == hashes["slides"] and tags["contracts"] == "failed"
    assert run_tags("site-a")["vadflow.kind"] == "nightly"

    params = family_params("ae_l2", {"lr": 1e-3, "epochs": 3}, TilingConfig())
    assert params["config.lr"] == 1e-3 and params["tiling.tile_size"] == 64
    assert params["family"] == "ae_l2"

    curves = [{"epoch": 1, "train_loss": 0.5, "val_loss": float("nan")}, {"epoch": 2, "x": 1}]
    metrics = curve_metrics(curves, timestamp=7)
    assert [(m.key, m.value, m.step, m.timestamp) for m in metrics] == [
        ("train_loss", 0.5, 1, 7),
        ("x", 1.0, 2, 7),
    ]  # NaN dropped: it would sort badly in the dashboard


def test_comparison_table_and_plot_are_written(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    frame = pl.DataFrame(
        {
            "nightly": ["n2", "n2", "n1"],
            "started": [datetime(2026, 1, d, tzinfo=UTC) for d in (2, 2, 1)],
            "family": ["ae_l2", "padim", "ae_l2"],
            "slide_auroc": [0.8, 0.9, 0.7],
            "froc": [None, None, None],
            "champion": [False, True, False],
        }
    )
    table, plot = write_comparison(frame, tmp_path, "site-a", ["slide_auroc", "froc"])
    assert pl.read_csv(table).height == 3
    assert plot.read_bytes().startswith(PNG)


# --- a nightly run against a real server ----------------------------------------------------


def _records(tmp_path: Path, tiny_detector, slide_auroc: float, family: str = "ae_l2") -> dict:
    """What the train, evaluate and export tasks hand to tracking, for a tiny detector."""
    model_dir = tmp_path / "models" / family
    shutil.copytree(tiny_detector.directory, model_dir)
    report_dir = tmp_path / "reports" / family
    report_dir.mkdir(parents=True)
    (report_dir / "metrics.json").write_text(json.dumps({"slide_auroc": slide_auroc}))
    (report_dir / "lesion_candidates.json").write_text("[]")
    overlays = []
    for slide in ("t1", "n1"):
        path = tmp_path / "exports" / family / f"{slide}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG + b"overlay")
        overlays.append(str(path))
    fit = TrainedModel(
        family=family,
        model_dir=str(model_dir),
        supervision="none",
        train_tiles=16,
        val_tiles=8,
        config=asdict(tiny_detector.detector.config),
        report=FitReport(3, 3, [1.0, 0.5, 1 / 3], [1.2, 0.6, 0.4], seconds=1.5, device="cpu"),
        curves=tuple(EpochLoss(e, 1.0 / e, 1.2 / e) for e in (1, 2, 3)),
    )
    evaluation = Evaluated(
        name=family,
        metrics={
            "slide_auroc": slide_auroc,
            "pixel_auroc": 0.75,
            "froc": 0.4,
            "slide_sensitivity": math.nan,
            "n_test_slides": 4.0,
        },
        froc_points={"sens_at_0.25_fp": 0.2, "sens_at_1_fp": 0.5},
        threshold=0.1,
        value_range=(0.0, 1.0),
        table=tuple(
            SlideResult(sid, "test", label, "", score, None)
            for sid, label, score in [
                ("n1", "normal", 0.1),
                ("n2", "normal", 0.3),
                ("t1", "anomalous", 0.2),
                ("t2", "anomalous", 0.9),
            ]
        ),
        report_dir=str(report_dir),
        plots={"ROC": str(report_dir / "roc.png"), "FROC": str(report_dir / "froc.png")},
    )
    for plot in evaluation.plots.values():
        Path(plot).write_bytes(PNG + b"plot")
    return {"fit": fit, "evaluation": evaluation, "overlays": overlays}


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.mark.slow
def test_nightly_run_tells_the_story(mlflow_server, tiny_detector, tmp_path: Path) -> None:
    site = f"story-{uuid.uuid4().hex[:6]}"
    tags = run_tags(
        site,
        git_commit="abc1234",
        flow_run_id="flow-run-1",
        manifest_hashes={"slides": "1" * 64, "tiles": "2" * 64},
        contracts_passed=True,
        extra={"domain": "pathology", "version": "20260101T000000"},
    )
    records = _records(tmp_path, tiny_detector, slide_auroc=0.75)
    contracts = tmp_path / "contracts.md"
    contracts.write_text("# contracts\nall passed\n")
    tiling = TilingConfig()
    with TrackingSession(mlflow_server.uri, tmp_path / "spool") as session:
        parent = start_nightly(
            session,
            site,
            "20260101T000000",
            tags=tags,
            params={"site": site, "domain": "pathology", **tiling.model_dump()},
        )
        with SystemMetrics(session, parent, interval=0.1) as system:
            result = track_family(
                session,
                parent,
                site=site,
                fit=records["fit"],
                evaluation=records["evaluation"],
                overlays=records["overlays"],
                tags=tags,
                tiling=tiling,
                promotion=PromotionPolicy(metric="slide_auroc", margin=0.01),
                eval_set_hash="e" * 64,
            )
        written = finish_nightly(
            session,
            parent,
            site=site,
            family_metrics={"ae_l2": records["evaluation"].metrics},
            comparison_dir=tmp_path / "comparison",
            reports={"contracts": contracts},
        )
    assert session.online and session.spooled == 0
    assert not session.spool_file.exists()

    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name(experiment_name(site))
    assert experiment is not None
    child = client.get_run(result.run_id)
    assert child.info.experiment_id == experiment.experiment_id
    assert child.info.status == "FINISHED"
    ctags = child.data.tags
    assert ctags["mlflow.parentRunId"] == parent
    assert (ctags["site"], ctags["family"], ctags["contracts"]) == (site, "ae_l2", "passed")
    assert ctags["git_commit"] == "abc1234" and ctags["prefect_flow_run_id"] == "flow-run-1"
    assert ctags["manifest.tiles.sha256"] == "2" * 64
    params = child.data.params
    assert params["config.tile_size"] == "32" and params["tiling.tile_size"] == "64"
    history = client.get_metric_history(result.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    metrics = child.data.metrics
    assert metrics["slide_auroc"] == 0.75 and metrics["sens_at_1_fp"] == 0.5
    assert "slide_sensitivity" not in metrics  # NaN is not logged
    assert metrics["train_tiles"] == 16
    assert {
        "report/metrics.json",
        "report/lesion_candidates.json",
        "heatmaps/t1.png",
        "heatmaps/n1.png",
        "plots/roc.png",
        "plots/froc.png",
    } <= _artifacts(client, result.run_id)

    # The model is logged, registered as <site>-<family> and, being the first, champion.
    assert result.model_uri and result.model_uri.startswith("models:/")
    assert result.decision is not None and result.decision.promoted
    version = client.get_model_version_by_alias(f"{site}-ae_l2", "champion")
    assert version.run_id == result.run_id

    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["vadflow.kind"] == "nightly"
    assert parent_run.data.params["tile_size"] == "64"
    assert parent_run.data.metrics["ae_l2.slide_auroc"] == 0.75
    assert {
        "contracts/contracts.md",
        "comparison/compare.csv",
        "comparison/compare.png",
    } <= _artifacts(client, parent)
    assert [p.name for p in written] == ["compare.csv", "compare.png"]
    table = pl.read_csv(written[0])
    assert table["family"].to_list() == ["ae_l2"] and table["champion"].to_list() == [True]
    if collectors():  # psutil here: MLflow's system metrics went to the parent run
        assert system.steps >= 1
        assert "system/cpu_utilization_percentage" in parent_run.data.metrics


def _night(session, site: str, version: str, aurocs: dict[str, float]) -> str:
    parent = session.start_run(
        experiment_name(site), f"nightly-{version}", run_tags(site, extra={"version": version})
    )
    for family, value in aurocs.items():
        run = session.start_run(
            experiment_name(site),
            family,
            run_tags(site, family=family, extra={"version": version}),
            parent=parent,
        )
        session.log_metrics(run, {"slide_auroc": value, "pixel_auroc": value - 0.1})
        session.end_run(run)
    session.end_run(parent)
    return parent


@pytest.mark.slow
def test_compare_across_families_and_nights(
    mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vadflow.flows.cli import app

    site = f"cmp-{uuid.uuid4().hex[:6]}"
    with TrackingSession(mlflow_server.uri, tmp_path / "spool") as session:
        _night(session, site, "n1", {"ae_l2": 0.70, "padim": 0.80})
        newest = _night(session, site, "n2", {"ae_l2": 0.75, "padim": 0.85})
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    frame = compare_runs(client, site)
    assert frame.select("nightly", "family", "slide_auroc").rows() == [
        ("n2", "ae_l2", 0.75),
        ("n2", "padim", 0.85),
        ("n1", "ae_l2", 0.70),
        ("n1", "padim", 0.80),
    ]
    assert frame["froc"].null_count() == 4 and not frame["champion"].any()
    with pytest.raises(LookupError, match="no MLflow experiment"):
        compare_runs(client, "no-such-site")

    # `vadflow compare <site>` prints the table and logs it to the newest nightly run.
    monkeypatch.setenv("VADFLOW_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(
        app,
        ["compare", site, "--tracking-uri", mlflow_server.uri, "--home", str(tmp_path / "home")],
    )
    assert result.exit_code == 0, result.output
    assert "padim" in result.output and "0.8500" in result.output
    assert {"comparison/compare.csv", "comparison/compare.png"} <= _artifacts(client, newest)


@pytest.mark.slow
def test_artifacts_and_model_go_to_s3(
    moto_s3, tiny_detector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracking server whose artifact store is S3 (moto on 127.0.0.1): files and the model
    land in the bucket, and the model loads back from there."""
    from tests.mlflow_server import MlflowServer, use_tracking_uri

    for key, value in moto_s3.env().items():  # this test's process only
        monkeypatch.setenv(key, value)
    server = MlflowServer(
        tmp_path / "server",
        artifacts_destination=f"s3://{moto_s3.bucket}/mlflow",
        env=moto_s3.env(),
    ).start()
    try:
        site = f"s3-{uuid.uuid4().hex[:6]}"
        report = tmp_path / "report.md"
        report.write_text("run report")
        with TrackingSession(server.uri, tmp_path / "spool") as session:
            run = session.start_run(experiment_name(site), "ae_l2", run_tags(site, family="ae_l2"))
            session.log_artifact(run, report, "report")
            example = np.load(tiny_detector.directory / "example_tiles.npy")
            model_uri = session.log_model(run, tiny_detector.directory, example)
            session.end_run(run)
        assert session.spooled == 0 and model_uri
        keys = moto_s3.keys("mlflow/")
        assert any(k.endswith("report/report.md") for k in keys), keys
        assert any(k.endswith("weights.pt") for k in keys), keys
        with use_tracking_uri(server.uri):
            loaded = mlflow.pyfunc.load_model(f"runs:/{run}/model")
            scores = loaded.predict(tiny_detector.tiles[:4])
        np.testing.assert_allclose(scores, tiny_detector.scores(tiny_detector.tiles[:4]), rtol=1e-6)
    finally:
        server.stop()


def test_training_and_test_manifests_are_the_runs_datasets(tmp_path: Path) -> None:
    """The run page's Datasets panel names the slides a model was trained and tested on."""
    from mlflow.tracking import MlflowClient

    from vadflow.tasks.tracking.nightly import log_manifest_datasets

    slides = pl.DataFrame(
        {
            "slide_id": ["n1", "n2", "t1", "v1", "bad"],
            "split": ["train", "train", "test", "val", "test"],
            "label": ["normal", "normal", "tumor", "normal", "tumor"],
            "sha256": ["a", "b", "c", "d", "e"],
            "status": ["ok", "ok", "ok", "ok", "quarantined"],
        }
    )
    path = tmp_path / "slides.parquet"
    slides.write_parquet(path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("datasets")).info.run_id
    digests = log_manifest_datasets(client, run, path, "site-d")
    inputs = {d.dataset.name: d for d in client.get_run(run).inputs.dataset_inputs}
    assert set(inputs) == {"site-d-train", "site-d-test"}
    for split, context in (("train", "training"), ("test", "test")):
        found = inputs[f"site-d-{split}"]
        assert found.dataset.digest == digests[split] and len(digests[split]) == 32
        assert str(path.resolve()) in found.dataset.source
        assert {t.key: t.value for t in found.tags}["mlflow.data.context"] == context
    assert json.loads(inputs["site-d-test"].dataset.profile)["num_rows"] == 1  # no quarantined
    # Other slides (a changed label) give another digest.
    slides.with_columns(label=pl.lit("normal")).write_parquet(path)
    again = client.create_run(client.get_experiment_by_name("datasets").experiment_id)
    assert (
        log_manifest_datasets(client, again.info.run_id, path, "site-d")["test"]
        != (digests["test"])
    )


def test_a_family_run_opened_before_training_is_the_one_logged_and_ended(
    tiny_detector, tmp_path: Path
) -> None:
    """`start_family` opens the child before training; `track_family(run=...)` logs into
    that run (no second child), ends it, and tags the registered version with the datasets
    that the run's Datasets panel shows."""
    import time

    from mlflow.tracking import MlflowClient

    from vadflow.tasks.tracking.nightly import start_family

    slides = tmp_path / "slides.parquet"
    pl.DataFrame(
        {
            "slide_id": ["n1", "n2", "t1"],
            "split": ["train", "train", "test"],
            "label": ["normal", "normal", "tumor"],
            "sha256": ["a", "b", "c"],
            "status": ["ok", "ok", "ok"],
        }
    ).write_parquet(slides)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    site, tags = "early-open", {"prefect_flow_run_id": "flow-2"}
    records = _records(tmp_path, tiny_detector, slide_auroc=0.8)
    with TrackingSession(uri, tmp_path / "spool") as session:
        parent = start_nightly(session, site, "v1", tags=tags, params={"site": site})
        child = start_family(
            session, parent, site=site, family="ae_l2", tags=tags, category="bottle"
        )
        client = MlflowClient(uri, registry_uri=uri)
        opened = client.get_run(child)
        assert opened.info.status == "RUNNING"
        assert opened.data.tags["prefect_flow_run_id"] == "flow-2"  # the hooks can end it
        assert opened.data.tags["mlflow.parentRunId"] == parent
        time.sleep(0.05)  # "training"
        result = track_family(
            session,
            parent,
            site=site,
            fit=records["fit"],
            evaluation=records["evaluation"],
            overlays=records["overlays"],
            tags=tags,
            tiling=TilingConfig(),
            promotion=PromotionPolicy(),
            category="bottle",
            slides_path=slides,
            run=child,
        )
    assert result.run_id == child
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.info.run_name == "ae_l2/bottle"
    assert run.info.start_time == opened.info.start_time
    assert run.info.end_time - run.info.start_time >= 50
    assert run.data.tags["category"] == "bottle" and run.data.tags["contracts"] == "passed"
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert [c.info.run_id for c in children] == [child]
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    version = client.get_model_version_by_alias(f"{site}-ae_l2-bottle", "champion")
    assert version.run_id == child
    assert version.tags["dataset.training.name"] == "early-open-train"
    assert version.tags["dataset.training.digest"] == inputs["early-open-train"]
    assert version.tags["dataset.test.name"] == "early-open-test"
    assert version.tags["dataset.test.digest"] == inputs["early-open-test"]


def test_a_skipped_familys_early_run_ends_with_the_reason(tmp_path: Path) -> None:
    """A family skipped after its child run opened (no labels for a supervised baseline)
    leaves no RUNNING run: it ends, the reason in `vadflow.end_reason`, and the night's
    parent got a heartbeat when the child opened."""
    from vadflow.tasks.records import TrackingTarget
    from vadflow.tasks.site import SiteConfig
    from vadflow.tasks.tracking.lifecycle import TAG_END_REASON, TAG_HEARTBEAT
    from vadflow.tasks.tracking.nightly import end_family_run, open_family_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = TrackingTarget(uri, str(tmp_path / "spool"))
    site = SiteConfig(name="skip-site", domain="pathology", source=str(tmp_path))
    with TrackingSession(uri, target.spool_dir) as session:
        parent = start_nightly(session, site.name, "v1", tags={}, params={})
    child = open_family_run(target, parent, site, "supervised_cnn", {"prefect_flow_run_id": "f"})
    client = MlflowClient(uri)
    assert client.get_run(child).info.status == "RUNNING"
    assert TAG_HEARTBEAT in client.get_run(parent).data.tags
    end_family_run(target, child, "FINISHED", "skipped: the site has no labels")
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.info.run_name == "supervised_cnn"
    assert run.data.tags[TAG_END_REASON] == "skipped: the site has no labels"
