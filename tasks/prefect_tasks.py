"""Prefect task entry points: thin wrappers that take and return paths and small records.

Each wraps a plain function of a stage module, so the logic is testable without Prefect and
the task results (and their cache keys) stay cheap: no arrays or tensors cross this edge.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from data_contracts.runner import (
    ContractResult,
    require,
    validate_slide_manifest,
    validate_tile_manifest,
)
from tasks.evaluation.camelyon import write_camelyon_csv
from tasks.evaluation.evaluate import evaluate_site
from tasks.evaluation.plots import plot_froc, plot_pro, plot_roc
from tasks.exports.asap import write_candidates_asap
from tasks.exports.geojson import export_slide_geojson
from tasks.exports.overlay import heatmap_overlay
from tasks.exports.report import write_html_report
from tasks.manifests import TILE_SCHEMA, empty_frame, write_parquet_atomic
from tasks.scoring.aggregate import heatmap_regions
from tasks.scoring.heatmap import SlideScore, score_slide
from tasks.site import SiteConfig, SiteLayout
from tasks.slides.discover import SlideSource, discover
from tasks.slides.ground_truth import ground_truth_mask
from tasks.slides.register import register_slide, slide_frame, write_quarantine
from tasks.slides.tiles import load_tiles, sample_tiles
from tasks.tiling.grid import TilingResult, finished_tiling, tile_slide
from tasks.tracking.mlflow_runs import (
    experiment_id,
    log_metrics,
    log_model,
    log_params,
    start_run,
)


@task(name="discover")
def discover_task(site: SiteConfig) -> list[SlideSource]:
    sources = discover(site.source, site.domain, site.val_fraction)
    get_run_logger().info("found %d slides under %s", len(sources), site.source)
    return sources


@task(name="register")
def register_task(site: SiteConfig, sources: list[SlideSource], layout: SiteLayout) -> str:
    """Slide manifest for the site; quarantined slides get a JSON file with their reason."""
    logger = get_run_logger()
    rows = [register_slide(s, site.name, site.domain, site.mpp_override) for s in sources]
    for row in rows:
        if row["status"] == "quarantined":
            logger.warning("quarantined %s: %s", row["slide_id"], row["reason"])
    write_quarantine(rows, layout.quarantine)
    path = write_parquet_atomic(slide_frame(rows), layout.slides_manifest)
    return str(path)


@task(name="tile", retries=1)
def tile_task(slide_row: dict, site: SiteConfig, layout: SiteLayout) -> TilingResult:
    """Tissue mask and tile manifest for one slide; a finished slide is not redone."""
    done = finished_tiling(slide_row, site.tiling, layout.tiles)
    if done is not None:
        return done
    result = tile_slide(slide_row, site.tiling, site.domain, layout.tiles, layout.masks)
    if result.status == "no_tissue":
        get_run_logger().warning("%s: no tissue found, no tiles", slide_row["slide_id"])
    return result


@task(name="validate")
def validate_task(slides_path: str, tile_paths: list[str], layout: SiteLayout) -> str:
    """Run the manifest contracts; fail the stage with the contract's own message."""
    slides = pl.read_parquet(slides_path)
    tiles = read_tile_manifests(tile_paths)
    results: list[ContractResult] = [
        validate_slide_manifest(slides),
        validate_tile_manifest(tiles, slides),
    ]
    markdown = "\n\n".join(r.to_markdown() for r in results)
    layout.reports.mkdir(parents=True, exist_ok=True)
    report = layout.reports / "contracts.md"
    report.write_text(markdown)
    create_markdown_artifact(markdown, key="manifest-contracts")
    for result in results:
        require(result)
    return str(report)


def read_tile_manifests(paths: list[str]) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths]
    return pl.concat(frames) if frames else empty_frame(TILE_SCHEMA)


@task(name="train")
def train_task(
    family: str, site: SiteConfig, slides_path: str, tile_paths: list[str], model_dir: str
) -> dict[str, Any]:
    """Fit one detector family on normal training tiles; save it; return its fit report."""
    from tasks.detectors import create_detector, detector_class

    logger = get_run_logger()
    slides = pl.read_parquet(slides_path)
    uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))
    tiles = read_tile_manifests(tile_paths)
    normal = tiles.join(slides.select("slide_id", "label"), on="slide_id").filter(
        pl.col("label") == "normal"
    )
    train_rows = sample_tiles(normal.filter(pl.col("split") == "train"), site.max_train_tiles, 0)
    val_rows = sample_tiles(
        normal.filter(pl.col("split") == "val"), max(64, site.max_train_tiles // 4), 1
    )
    if train_rows.height == 0:
        raise ValueError(
            f"site {site.name}: no normal training tiles; put normal slides under "
            "training/normal (pathology) or <category>/train/good (industrial)"
        )
    train, val = load_tiles(train_rows, uris), load_tiles(val_rows, uris)
    if len(val) == 0:  # no held-out slide: validate on a slice of the training tiles
        val = train[: max(1, len(train) // 10)]
    logger.info("%s: training on %d tiles, validating on %d", family, len(train), len(val))
    overrides = dict(site.detectors.get(family, {}))
    if "tile_size" in {f.name for f in fields(detector_class(family).config_cls)}:
        overrides.setdefault("tile_size", site.tiling.tile_size)  # the site's tiles decide
    detector = create_detector(family, **overrides)
    epochs_log: list[dict[str, float]] = []

    def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
        epochs_log.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        logger.info("%s epoch %d: train %.5f  val %.5f", family, epoch, train_loss, val_loss)

    report = detector.fit(train, val, on_epoch=on_epoch)
    out = Path(model_dir)
    detector.save(out)
    np.save(out / "example_tiles.npy", val[:2])  # the MLflow model's input example
    summary = {
        "family": family,
        "model_dir": str(out),
        "train_tiles": len(train),
        "val_tiles": len(val),
        "config": asdict(detector.config),
        "report": asdict(report),
        "curves": epochs_log,
    }
    (out / "fit_report.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


@task(name="score")
def score_task(
    model_dir: str, slide_row: dict, tiles_path: str, out_dir: str, heatmap_downsample: int
) -> SlideScore:
    from tasks.detectors import load_detector

    detector = load_detector(Path(model_dir))
    tiles = pl.read_parquet(tiles_path)
    return score_slide(detector, slide_row, tiles, Path(out_dir), heatmap_downsample)


@task(name="evaluate")
def evaluate_task(
    site: SiteConfig,
    family: str,
    slides_path: str,
    scores: list[SlideScore],
    layout: SiteLayout,
    model_dir: str | None = None,
) -> dict[str, Any]:
    """Metrics, plots and slide table under reports/<family>/; calibration beside the model."""
    slides = pl.read_parquet(slides_path)
    by_slide = {s.slide_id: (s.slide_score, s.heatmap) for s in scores}
    evaluation = evaluate_site(
        slides, by_slide, site.tiling.heatmap_downsample, site.target_fpr, site.domain
    )
    folder = layout.reports / family
    folder.mkdir(parents=True, exist_ok=True)
    evaluation.table.write_csv(folder / "slides.csv")
    metrics = {**evaluation.metrics, **evaluation.froc_points}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots = _evaluation_plots(evaluation, folder, f"{site.name} / {family}")
    if model_dir is not None:
        # The threshold travels with the model: batch scoring predicts with it.
        calibration = {
            "threshold": evaluation.threshold,
            "target_fpr": site.target_fpr,
            "heatmap_value_range": list(evaluation.value_range),
        }
        (Path(model_dir) / "calibration.json").write_text(json.dumps(calibration, indent=2))
    return {
        "family": family,
        "metrics": evaluation.metrics,
        "froc_points": evaluation.froc_points,
        "threshold": evaluation.threshold,
        "value_range": list(evaluation.value_range),
        "table": evaluation.table.to_dicts(),
        "candidates": evaluation.candidates,
        "plots": plots,
        "report_dir": str(folder),
    }


def _evaluation_plots(evaluation, folder: Path, title: str) -> dict[str, str]:
    table = evaluation.table.filter(pl.col("label") != "unknown")
    labels = (table["label"] == "anomalous").to_numpy()
    plots: dict[str, str] = {}
    if 0 < labels.sum() < len(labels):
        plots["ROC"] = str(plot_roc(labels, table["score"].to_numpy(), folder / "roc.png", title))
    if evaluation.froc_result is not None and evaluation.froc_result.n_lesions:
        plots["FROC"] = str(plot_froc(evaluation.froc_result, folder / "froc.png", title))
    if evaluation.pro is not None:
        plots["PRO"] = str(plot_pro(evaluation.pro, folder / "pro.png", title))
    return plots


@task(name="export")
def export_task(
    family: str,
    slides_path: str,
    scores: list[SlideScore],
    evaluation: dict[str, Any],
    layout: SiteLayout,
) -> list[str]:
    """What people open: overlays on one colour scale, lesion files, and the HTML report."""
    slides = pl.read_parquet(slides_path)
    rows = {r["slide_id"]: r for r in slides.iter_rows(named=True)}
    threshold = evaluation["threshold"]
    vmin, vmax = evaluation["value_range"]
    if math.isfinite(threshold) and threshold > vmin:
        vmax = max(vmax, 2 * threshold - vmin)  # the threshold sits mid-scale or below
    out = layout.exports / family
    overlays: dict[str, str] = {}
    for score in scores:
        row = rows[score.slide_id]
        heatmap = np.load(score.heatmap)
        truth = ground_truth_mask(
            row["annotation_uri"], row["width"], row["height"], score.heatmap_downsample
        )
        png = out / f"{score.slide_id}.png"
        heatmap_overlay(row["uri"], heatmap, score.heatmap_downsample, png, vmin, vmax, truth)
        overlays[score.slide_id] = str(png)
        candidates = evaluation["candidates"].get(score.slide_id)
        if candidates is not None:
            write_camelyon_csv(out / f"{score.slide_id}.csv", candidates)
            cut = threshold if math.isfinite(threshold) else vmax
            export_slide_geojson(
                out, score.slide_id, candidates, heatmap, score.heatmap_downsample, cut
            )
            write_candidates_asap(
                out / f"{score.slide_id}.xml",
                candidates,
                heatmap_regions(heatmap, score.heatmap_downsample, cut),
            )
    write_html_report(
        Path(evaluation["report_dir"]) / "report.html",
        f"{layout.site} / {family}",
        evaluation["table"],
        {**evaluation["metrics"], **evaluation["froc_points"]},
        plots=evaluation["plots"],
        overlays=overlays,
        notes=[f"threshold {threshold:.5g} from held-out normal slides"],
    )
    return list(overlays.values())


@task(name="start-tracking")
def start_tracking_task(
    tracking_uri: str, site: SiteConfig, artifact_root: str | None, tags: dict[str, str]
) -> str:
    """The nightly parent run, in the site's experiment."""
    client = MlflowClient(tracking_uri)
    experiment = experiment_id(client, site.name, Path(artifact_root) if artifact_root else None)
    run_id = start_run(client, experiment, f"nightly-{tags.get('version', '')}", tags)
    log_params(
        client, run_id, {"site": site.name, "domain": site.domain, **site.tiling.model_dump()}
    )
    return run_id


@task(name="track")
def track_task(
    tracking_uri: str,
    parent_run_id: str,
    site: SiteConfig,
    fit: dict[str, Any],
    evaluation: dict[str, Any],
    overlays: list[str],
    tags: dict[str, str],
) -> str:
    """One child run per family: config, curves, metrics, reports, overlays and the model."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    family = fit["family"]
    run_id = start_run(
        client,
        parent.info.experiment_id,
        family,
        {**tags, "family": family},
        parent_run_id=parent_run_id,
    )
    log_params(
        client,
        run_id,
        {"family": family, "config": fit["config"], "tiling": site.tiling.model_dump()},
    )
    for point in fit["curves"]:
        step = int(point["epoch"])
        log_metrics(client, run_id, {"train_loss": point["train_loss"]}, step=step)
        log_metrics(client, run_id, {"val_loss": point["val_loss"]}, step=step)
    log_metrics(client, run_id, {**evaluation["metrics"], **evaluation["froc_points"]})
    log_metrics(
        client,
        run_id,
        {"train_seconds": fit["report"]["seconds"], "train_tiles": fit["train_tiles"]},
    )
    client.log_artifacts(run_id, evaluation["report_dir"], artifact_path="report")
    for path in overlays:
        client.log_artifact(run_id, path, artifact_path="heatmaps")
    folder = Path(overlays[0]).parent if overlays else None
    lesion_files = [p for p in folder.glob("*") if p.suffix != ".png"] if folder else []
    for path in lesion_files:
        client.log_artifact(run_id, str(path), artifact_path="lesions")
    example = np.load(Path(fit["model_dir"]) / "example_tiles.npy")
    log_model(tracking_uri, run_id, Path(fit["model_dir"]), example)
    client.set_terminated(run_id, "FAILED" if fit["report"].get("diverged") else "FINISHED")
    return run_id


@task(name="finish-tracking")
def finish_tracking_task(tracking_uri: str, parent_run_id: str, summary: dict[str, Any]) -> None:
    client = MlflowClient(tracking_uri)
    for family, metrics in summary.items():
        log_metrics(client, parent_run_id, {f"{family}.{k}": v for k, v in metrics.items()})
    client.set_terminated(parent_run_id, "FINISHED")


@task(name="resolve-model")
def resolve_model_task(
    model: str, site: str, family: str, tracking_uri: str, cache_root: str
) -> str:
    """A local detector folder for `model`: a folder, an MLflow model URI, or 'champion'."""
    import mlflow.artifacts

    if Path(model).is_dir():
        return model
    uri = f"models:/{site}-{family}@champion" if model == "champion" else model
    if not uri.startswith(("models:/", "runs:/")):
        raise ValueError(
            f"model {model!r} is neither a folder nor an MLflow model URI "
            "(models:/<name>@<alias>, models:/<name>/<version>, runs:/<run>/model)"
        )
    target = Path(cache_root) / "model-cache" / _safe_name(uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri
    )
    found = sorted(Path(local).rglob("config.json"))
    detector_dirs = [p.parent for p in found if (p.parent / "weights.pt").exists()]
    if not detector_dirs:
        raise ValueError(f"{uri}: downloaded, but it holds no vadflow detector (config.json)")
    return str(detector_dirs[0])


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
