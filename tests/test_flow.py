"""The nightly flow end to end on tiny synthetic sites, on the embedded default stack."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from vadflow.tasks.records import NightlySummary
from vadflow.tasks.scoring.heatmap import load_heatmap

pytestmark = [pytest.mark.slow, pytest.mark.flow]


@pytest.fixture(scope="module")
def pathology_run(prefect_harness, state_dir: Path) -> dict:
    from vadflow.flows.nightly import nightly
    from vadflow.tasks.synth.pathology import make_pathology_site

    site = make_pathology_site(
        state_dir / "data",
        "tiny-path",
        n_train_normal=3,
        n_test_normal=3,
        n_test_tumor=3,
        width=2048,
        height=1536,
        seed=7,
    )
    # (The synthetic site's site.yaml sets the FROC's isolated-cell rule its lesions need.)
    # One slide that cannot be opened: it must be quarantined and the run must go on.
    (site / "testing" / "images" / "corrupt_999.tif").write_bytes(b"II*\x00garbage")
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'flow-test.db'}"
    summary = nightly(
        str(site), output_root=str(state_dir / "outputs"), tracking_uri=tracking, families=["ae_l2"]
    )
    return {"summary": summary, "site": site, "tracking": tracking}


def test_bad_slide_is_quarantined_and_the_rest_completes(pathology_run) -> None:
    summary = pathology_run["summary"]
    assert [q.slide_id for q in summary.quarantined] == ["corrupt_999"]
    assert "corrupt_999.tif" in summary.quarantined[0].reason
    quarantine = Path(summary.outputs) / "quarantine" / "corrupt_999.json"
    assert json.loads(quarantine.read_text())["slide_id"] == "corrupt_999"
    scored = {row.slide_id for row in summary.families["ae_l2"].table}
    assert len(scored) == 6 and "corrupt_999" not in scored


def test_tile_manifest_rows_lie_inside_their_slides(pathology_run) -> None:
    out = Path(pathology_run["summary"].outputs)
    slides = pl.read_parquet(out / "slides.parquet").filter(pl.col("status") == "ok")
    tiles = pl.concat([pl.read_parquet(p) for p in sorted((out / "tiles").glob("*.parquet"))])
    joined = tiles.join(slides.select("slide_id", "width", "height"), on="slide_id")
    assert joined.height == tiles.height > 0
    assert (joined["x"] >= 0).all() and (joined["y"] >= 0).all()
    assert (joined["x"] + joined["extent"] <= joined["width"]).all()
    assert (joined["y"] + joined["extent"] <= joined["height"]).all()
    assert tiles["tile_id"].is_unique().all()
    # Lesion tiles only on tumour slides; normal slides carry none.
    lesion_slides = set(tiles.filter(pl.col("label_fraction") > 0)["slide_id"])
    tumour_slides = set(slides.filter(pl.col("label") == "anomalous")["slide_id"])
    assert lesion_slides and lesion_slides <= tumour_slides


def test_heatmaps_match_slide_aspect(pathology_run) -> None:
    summary = pathology_run["summary"]
    out = Path(summary.outputs)
    slides = pl.read_parquet(out / "slides.parquet")
    heatmaps = sorted(out.glob("heatmaps/ae_l2-*/*.heatmap.tif"))
    assert len(heatmaps) == 7  # 6 test slides + 1 held-out normal
    for path in heatmaps:
        row = slides.filter(pl.col("slide_id") == path.name.split(".")[0]).row(0, named=True)
        heat = load_heatmap(path)
        assert heat.shape == (-(-row["height"] // 16), -(-row["width"] // 16))
        assert np.isfinite(heat).any()
    overlays = sorted(
        p for p in (out / "exports" / "ae_l2").glob("*.png") if ".thumbnail" not in p.name
    )
    assert len(overlays) == 7
    assert len(list((out / "exports" / "ae_l2").glob("*.thumbnail.png"))) == 7


def test_autoencoder_ranks_tumour_slides_above_normal(pathology_run) -> None:
    metrics = pathology_run["summary"].families["ae_l2"].metrics
    assert metrics["slide_auroc"] >= 0.8, metrics
    assert metrics["pixel_auroc"] >= 0.7, metrics
    assert 0.0 <= metrics["froc"] <= 1.0


def test_the_slide_score_setting_reaches_evaluation_calibration_and_exports(
    pathology_run,
) -> None:
    """The site's `aggregation.slide_score` (default `auto`) is what the threshold, the slide
    table, the model's calibration.json and the exported calls are on."""
    from vadflow.tasks.evaluation.calibration import read_calibration
    from vadflow.tasks.site import load_site

    site = load_site(pathology_run["site"])
    result = pathology_run["summary"].families["ae_l2"]
    calibration = read_calibration(result.model_dir)
    assert calibration is not None
    assert site.aggregation.slide_score == "auto"
    # One held-out normal slide here: `auto` calls slides on the maximum (tail needs two).
    assert calibration.slide_score == "max"
    assert calibration.tail_reference is not None  # every model carries its probability scale
    assert result.metrics["threshold"] == pytest.approx(calibration.threshold)
    out = Path(pathology_run["summary"].outputs)
    scored = json.loads(next(out.glob("heatmaps/ae_l2-*/scored.json")).read_text())
    exported = {s["slide_id"]: s["score"] for s in scored["exported"]}
    for row in result.table:  # the exports call slides on the evaluation's slide scores
        assert exported[row.slide_id] == pytest.approx(row.score)


def test_mlflow_run_has_metrics_artifacts_and_a_loadable_model(pathology_run) -> None:
    summary = pathology_run["summary"]
    client = MlflowClient(pathology_run["tracking"])
    run = client.get_run(summary.families["ae_l2"].mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
    assert run.data.tags["site"] == "tiny-path"
    for key in ("slide_auroc", "pixel_auroc", "froc", "train_loss", "val_loss"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "heatmaps")}
    assert len(artifacts) == 7
    from tests.mlflow_server import use_tracking_uri

    # Unset afterwards: mlflow exports the URI as $MLFLOW_TRACKING_URI, which later tests in the
    # session would otherwise track into (a cross-site run ended up in this test's store).
    with use_tracking_uri(pathology_run["tracking"]):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    tiles = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    scores = model.predict(tiles)
    assert np.asarray(scores).shape == (3,) and np.isfinite(scores).all()


def test_the_family_run_spans_training_and_scoring(pathology_run) -> None:
    """The child run opens before the model folder is written and ends after the heatmaps
    and exports are: its duration is the family's night, not the logging after it."""
    summary = pathology_run["summary"]
    family = summary.families["ae_l2"]
    run = MlflowClient(pathology_run["tracking"]).get_run(family.mlflow_run_id)
    out = Path(summary.outputs)
    model_files = [p for p in Path(family.model_dir).rglob("*") if p.is_file()]
    heatmap_files = [p for p in out.glob(f"heatmaps/ae_l2-{summary.version}/**/*") if p.is_file()]
    export_files = [p for p in Path(family.exports_dir).rglob("*") if p.is_file()]
    assert model_files and heatmap_files and export_files
    first_trained = min(p.stat().st_mtime for p in model_files) * 1000
    last_scored = max(p.stat().st_mtime for p in heatmap_files + export_files) * 1000
    assert run.info.start_time <= first_trained, (run.info.start_time, first_trained)
    assert run.info.end_time >= last_scored, (run.info.end_time, last_scored)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect_flow_run_id"]  # the flow's failure hooks find it by this
    client = MlflowClient(pathology_run["tracking"], registry_uri=pathology_run["tracking"])
    [version] = client.search_model_versions(
        f"name = 'tiny-path-ae_l2' and run_id = '{run.info.run_id}'"
    )
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert version.tags["dataset.training.name"] == "tiny-path-train"
    assert version.tags["dataset.training.digest"] == inputs["tiny-path-train"]
    assert version.tags["dataset.test.digest"] == inputs["tiny-path-test"]


@pytest.fixture(scope="module")
def industrial_run(prefect_harness, state_dir: Path) -> NightlySummary:
    from vadflow.flows.nightly import nightly
    from vadflow.tasks.synth.industrial import make_industrial_site

    site = make_industrial_site(
        state_dir / "data", "tiny-line", n_train=24, n_test_good=8, n_test_per_defect=4, seed=3
    )
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'flow-test.db'}"
    return nightly(
        str(site), output_root=str(state_dir / "outputs"), tracking_uri=tracking, families=["ae_l2"]
    )


def test_same_flow_runs_on_an_mvtec_folder(industrial_run) -> None:
    metrics = industrial_run.families["ae_l2"].metrics
    assert metrics["n_test_slides"] == 16
    assert metrics["slide_auroc"] >= 0.8, metrics
    assert "pixel_auroc" in metrics and "froc" not in metrics


def test_exports_and_report_recompute_to_the_logged_metrics(pathology_run) -> None:
    """FROC and slide AUC recomputed from the files people open match the flow's metrics."""
    from vadflow.tasks.evaluation.camelyon import evaluation_mask, read_camelyon_csv
    from vadflow.tasks.evaluation.froc import froc
    from vadflow.tasks.evaluation.metrics import image_auroc
    from vadflow.tasks.slides.ground_truth import ground_truth_mask

    summary = pathology_run["summary"]
    out = Path(summary.outputs)
    metrics = summary.families["ae_l2"].metrics
    table = pl.read_csv(out / "reports" / "ae_l2" / "slides.csv")
    recomputed = image_auroc((table["label"] == "anomalous").to_numpy(), table["score"].to_numpy())
    assert recomputed == pytest.approx(metrics["slide_auroc"])
    slides = pl.read_parquet(out / "slides.parquet").filter(pl.col("split") == "test")
    slides = slides.filter(pl.col("status") == "ok")
    exports = out / "exports" / "ae_l2"
    candidates, masks = {}, {}
    for row in slides.iter_rows(named=True):
        sid = row["slide_id"]
        for suffix in (".png", ".csv", ".candidates.geojson", ".regions.geojson", ".xml"):
            assert (exports / f"{sid}{suffix}").exists(), f"{sid}{suffix}"
        candidates[sid] = read_camelyon_csv(exports / f"{sid}.csv")
        truth = ground_truth_mask(row["annotation_uri"], row["width"], row["height"], 32)
        masks[sid] = evaluation_mask(truth >= 0.5, 32, row["mpp"], itc_um=10)
    normals = slides.filter(pl.col("label") == "normal")["slide_id"].to_list()
    assert froc(candidates, masks, normals).score == pytest.approx(metrics["froc"], abs=1e-6)
    report = (out / "reports" / "ae_l2" / "report.html").read_text()
    assert "slide_auroc" in report and "data:image/png;base64" in report
