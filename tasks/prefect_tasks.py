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
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from vadflow.tasks.evaluation.calibration import Calibration, read_calibration, write_calibration
from vadflow.tasks.evaluation.evaluate import evaluate_site, heatmap_value_range
from vadflow.tasks.evaluation.plots import plot_froc, plot_pro, plot_roc
from vadflow.tasks.exports.render import ScoredRun, render_exports
from vadflow.tasks.manifests import TILE_SCHEMA, empty_frame, write_parquet_atomic
from vadflow.tasks.normalise.stain import make_normaliser, normaliser_from_dict
from vadflow.tasks.scoring.heatmap import SlideScore, load_heatmap, score_slide
from vadflow.tasks.site import SiteConfig, SiteLayout
from vadflow.tasks.slides.discover import SlideSource, discover
from vadflow.tasks.slides.register import register_slide, slide_frame, write_quarantine
from vadflow.tasks.slides.tiles import load_tiles, sample_tiles
from vadflow.tasks.tiling.grid import TilingResult
from vadflow.tasks.tiling.runners import tile_site
from vadflow.tasks.tracking.nightly import (
    EXAMPLE_FILE,
    PromotionPolicy,
    finish_nightly,
    start_nightly,
    track_family,
)
from vadflow.tasks.tracking.registry import download_champion, evaluation_set_hash
from vadflow.tasks.tracking.spool import TrackingSession
from vadflow.tasks.validation import (
    BoundaryCheck,
    check_manifests,
    check_metrics,
    check_scores,
    report_folder,
)

STAIN_FILE = "stain.json"  # the stain reference fitted on this model's training tiles


@task(name="discover")
def discover_task(site: SiteConfig) -> list[SlideSource]:
    sources = discover(site.source, site.domain, site.val_fraction, storage=site.storage.options())
    get_run_logger().info("found %d slides under %s", len(sources), site.source)
    return sources


@task(name="register")
def register_task(site: SiteConfig, sources: list[SlideSource], layout: SiteLayout) -> str:
    """Slide manifest for the site; quarantined slides get a JSON file with their reason."""
    logger = get_run_logger()
    options = site.storage.options()
    rows = [
        register_slide(s, site.name, site.domain, site.mpp_override, site.mpp_bounds, options)
        for s in sources
    ]
    for row in rows:
        if row["status"] == "quarantined":
            logger.warning("quarantined %s: %s", row["slide_id"], row["reason"])
    write_quarantine(rows, layout.quarantine_uri, options)
    path = write_parquet_atomic(slide_frame(rows), layout.slides_manifest)
    return str(path)


@task(name="tile-site")
def tile_site_task(rows: list[dict], site: SiteConfig, layout: SiteLayout) -> list[TilingResult]:
    """Mask and tile every slide: local processes or a Dask cluster, as the site says.

    Finished slides (same content hash and tiling settings) are skipped, so a nightly rerun
    starts no workers when nothing changed; a slide that fails is reported, the rest go on.
    """
    logger = get_run_logger()

    def report(result: TilingResult) -> None:
        if result.status != "ok":
            logger.warning("%s: %s (%s)", result.slide_id, result.status, result.reason)

    return tile_site(rows, site, layout.tiles_uri, layout.masks_uri, on_result=report)


@task(name="validate-manifests")
def validate_manifests_task(
    slides_path: str, tile_paths: list[str], site: SiteConfig, layout: SiteLayout, run: str
) -> BoundaryCheck:
    """Slide and tile manifest contracts before training: strict stops, quarantine drops."""
    return check_manifests(
        slides_path,
        tile_paths,
        tiling=site.tiling,
        mode=site.contracts,
        report_dir=report_folder(layout.reports, run),
        quarantine_dir=layout.quarantine,
        markdown_artifact=create_markdown_artifact,
        artifact_key=f"contracts-{site.name}",
    )


@task(name="validate-scores")
def validate_scores_task(
    family: str,
    scores: list[SlideScore],
    slides_path: str,
    tile_paths: list[str],
    site: SiteConfig,
    layout: SiteLayout,
    run: str,
) -> BoundaryCheck:
    return check_scores(
        family,
        scores,
        slides_path,
        tile_paths,
        expected_slides=[s.slide_id for s in scores],
        mode=site.contracts,
        report_dir=report_folder(layout.reports, run),
        quarantine_dir=layout.quarantine,
        markdown_artifact=create_markdown_artifact,
        artifact_key=f"contracts-{site.name}",
    )


@task(name="validate-metrics")
def validate_metrics_task(
    family: str, evaluation: dict[str, Any], site: SiteConfig, layout: SiteLayout, run: str
) -> BoundaryCheck:
    return check_metrics(
        family,
        {**evaluation["metrics"], **evaluation["froc_points"]},
        report_dir=report_folder(layout.reports, run),
        markdown_artifact=create_markdown_artifact,
        artifact_key=f"contracts-{site.name}",
    )


def read_tile_manifests(paths: list[str]) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths]
    return pl.concat(frames) if frames else empty_frame(TILE_SCHEMA)


def training_tiles(
    site: SiteConfig, slides_path: str, tile_paths: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a bounded sample of normal train tiles, and of held-out normal val tiles."""
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
    options = site.storage.options()
    train = load_tiles(train_rows, uris, options)
    val = load_tiles(val_rows, uris, options)
    if len(val) == 0:  # no held-out slide: validate on a slice of the training tiles
        val = train[: max(1, len(train) // 10)]
    return train, val


LESION_TILE_FRACTION = 0.5  # a tile is "tumour" for supervised_cnn when half of it is lesion


def _trainable_slides(slides_path: str) -> pl.DataFrame:
    """Slides that may train or validate: readable, and never from the test split."""
    return pl.read_parquet(slides_path).filter(
        (pl.col("status") == "ok") & pl.col("split").is_in(["train", "val"])
    )


def labelled_training_tiles(
    site: SiteConfig, slides_path: str, tile_paths: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(tiles, labels, val tiles, val labels) for tile-supervised families; None without labels.

    Tumour: tiles of annotated tumour training slides with label_fraction >= 0.5. Normal: every
    tile of normal slides and the lesion-free tiles (label_fraction == 0) of annotated tumour
    slides; tiles on a lesion's edge and all tiles of unannotated tumour slides are left out.
    Validation: the held-out normal ("val") slides' tiles plus a fifth of the tumour tiles
    (val slides are all normal, so tumour tiles are held out by tile, not by slide).
    """
    slides = _trainable_slides(slides_path)
    uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))
    tiles = read_tile_manifests(tile_paths).join(
        slides.select("slide_id", "label", "annotation_uri"), on="slide_id"
    )
    annotated = (pl.col("label") == "anomalous") & pl.col("annotation_uri").is_not_null()
    tumour = tiles.filter(
        annotated
        & (pl.col("split") == "train")
        & (pl.col("label_fraction") >= LESION_TILE_FRACTION)
    )
    normal = tiles.filter(
        (pl.col("label") == "normal") | (annotated & (pl.col("label_fraction") == 0))
    )
    normal_train = normal.filter(pl.col("split") == "train")
    if tumour.height == 0 or normal_train.height == 0:
        return None
    limit = site.max_train_tiles
    tumour = sample_tiles(tumour, limit // 2, 2)  # shuffled
    n_val = tumour.height // 5
    val_tumour, train_tumour = tumour.head(n_val), tumour.slice(n_val)
    train_normal = sample_tiles(normal_train, max(1, limit - train_tumour.height), 0)
    val_normal = sample_tiles(normal.filter(pl.col("split") == "val"), max(64, limit // 4), 1)
    if val_normal.height == 0:  # no held-out slide: hold out a tenth of the normal tiles
        n = max(1, train_normal.height // 10)
        val_normal, train_normal = train_normal.head(n), train_normal.slice(n)
    options = site.storage.options()

    def pixels(tumour_rows: pl.DataFrame, normal_rows: pl.DataFrame):
        labels = np.r_[np.ones(tumour_rows.height, bool), np.zeros(normal_rows.height, bool)]
        return load_tiles(pl.concat([tumour_rows, normal_rows]), uris, options), labels

    train, labels = pixels(train_tumour, train_normal)
    val, val_labels = pixels(val_tumour, val_normal)
    return train, labels, val, val_labels


def training_bags(
    site: SiteConfig, slides_path: str, tile_paths: list[str]
) -> tuple[list[np.ndarray], list[bool]] | None:
    """One bag of tiles per train-split slide and its label, for slide-supervised families.

    None unless there are both tumour and normal training slides with tiles. Slide labels only:
    no annotation is needed. Each slide's tiles are capped so all bags together stay near
    `max_train_tiles` (at least 64 per slide), since mil scores every tile each epoch.
    """
    slides = _trainable_slides(slides_path).filter(
        (pl.col("split") == "train") & pl.col("label").is_in(["normal", "anomalous"])
    )
    tiles = read_tile_manifests(tile_paths)
    with_tiles = set(tiles["slide_id"].unique().to_list())
    present = [s for s in slides["slide_id"].to_list() if s in with_tiles]
    tumour = dict(zip(slides["slide_id"], slides["label"] == "anomalous", strict=True))
    if not any(tumour[s] for s in present) or all(tumour[s] for s in present):
        return None
    uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))
    cap = max(64, site.max_train_tiles // len(present))
    options = site.storage.options()
    bags = [
        load_tiles(sample_tiles(tiles.filter(pl.col("slide_id") == s), cap, i), uris, options)
        for i, s in enumerate(present)
    ]
    return bags, [bool(tumour[s]) for s in present]


@task(name="train")
def train_task(
    family: str, site: SiteConfig, slides_path: str, tile_paths: list[str], model_dir: str
) -> dict[str, Any]:
    """Fit one detector family; save it; return its fit report, or {"skipped": reason}.

    Unsupervised families train on normal tiles; supervised_cnn on labelled tiles
    (`labelled_training_tiles`), mil on one bag per training slide (`training_bags`). A labelled
    family on a site without the labels it needs is skipped with a warning, not failed.
    A diverged run (NaN/inf) keeps its best weights and is reported as diverged: it is scored
    and logged so the failure is visible, and the champion gate never promotes it.
    """
    from vadflow.tasks.detectors.base import DivergedError
    from vadflow.tasks.detectors.registry import create_detector, detector_class

    logger = get_run_logger()
    supervision = detector_class(family).supervision
    if supervision == "tile":
        labelled = labelled_training_tiles(site, slides_path, tile_paths)
        if labelled is None:
            reason = (
                f"no training tile has label_fraction >= {LESION_TILE_FRACTION}: it needs "
                "tumour slides under training/tumor with lesion_annotations/<slide>.xml, and "
                "normal training tiles"
            )
            logger.warning("skipping %s on site %s: %s", family, site.name, reason)
            return {"family": family, "skipped": reason}
        train, labels, val, val_labels = labelled
        normal = train[~labels]
    elif supervision == "slide":
        bagged = training_bags(site, slides_path, tile_paths)
        if bagged is None:
            reason = "it needs both tumour and normal training slides (slide labels)"
            logger.warning("skipping %s on site %s: %s", family, site.name, reason)
            return {"family": family, "skipped": reason}
        bags, bag_labels = bagged
        normal = np.concatenate([b for b, t in zip(bags, bag_labels, strict=True) if not t])
    else:
        train, val = training_tiles(site, slides_path, tile_paths)
        normal = train
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The stain reference is fitted on normal tiles for every family.
    normaliser = make_normaliser(site.stain_normalisation).fit(normal)
    (out / STAIN_FILE).write_text(json.dumps(normaliser.to_dict()))
    if supervision == "slide":
        bags = [normaliser.transform(b) for b in bags]
        example = bags[0][:2]
        counts = {"train_slides": len(bags), "train_tiles": sum(map(len, bags)), "val_tiles": 0}
    else:
        train, val = normaliser.transform(train), normaliser.transform(val)
        example = val[:2]
        counts = {"train_tiles": len(train), "val_tiles": len(val)}
        if supervision == "tile":
            counts["train_tumour_tiles"] = int(labels.sum())
    logger.info("%s (supervision=%s): %s", family, supervision, counts)
    overrides = dict(site.detectors.get(family, {}))
    config_fields = {f.name for f in fields(detector_class(family).config_cls)}
    if "tile_size" in config_fields:
        overrides.setdefault("tile_size", site.tiling.tile_size)  # the site's tiles decide
    if "augment" in config_fields:  # the trainer reads it (tasks/detectors/augment.py)
        overrides.setdefault("augment", site.augmentation.model_dump())
    detector = create_detector(family, **overrides)
    epochs_log: list[dict[str, float]] = []

    def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
        epochs_log.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        logger.info("%s epoch %d: train %.5f  val %.5f", family, epoch, train_loss, val_loss)

    try:
        if supervision == "slide":
            fitted = detector.fit_bags(bags, bag_labels, on_epoch=on_epoch)
        elif supervision == "tile":
            fitted = detector.fit_labelled(train, labels, val, val_labels, on_epoch=on_epoch)
        else:
            fitted = detector.fit(train, val, on_epoch=on_epoch)
        report = asdict(fitted)
    except DivergedError as exc:
        logger.error("%s diverged: %s", family, exc)
        report = {**(asdict(exc.report) if exc.report else {}), "diverged": True}
    detector.save(out)
    np.save(out / EXAMPLE_FILE, example)  # the MLflow model's input example
    summary = {
        "family": family,
        "model_dir": str(out),
        "supervision": supervision,
        **counts,
        "config": asdict(detector.config),
        "report": report,
        "curves": epochs_log,
    }
    (out / "fit_report.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


STAIN_SOURCE_TILES = 128  # tiles of a slide its stain statistics are estimated from


def load_stain_normaliser(model_dir: Path):
    path = model_dir / STAIN_FILE
    return normaliser_from_dict(json.loads(path.read_text())) if path.exists() else None


@task(name="score")
def score_task(
    model_dir: str, slide_row: dict, tiles_path: str, out_dir: str, heatmap_downsample: int
) -> SlideScore:
    """Score one slide with a saved model and the stain reference it was trained with."""
    from vadflow.tasks.detectors.registry import load_detector

    detector = load_detector(Path(model_dir))
    normaliser = load_stain_normaliser(Path(model_dir))
    tiles = pl.read_parquet(tiles_path)
    transform = None
    if normaliser is not None and normaliser.method != "none" and tiles.height:
        # The slide's stain is estimated once, from a sample of its tiles, not per batch.
        sample = sample_tiles(tiles, STAIN_SOURCE_TILES, seed=0)
        transform = normaliser.for_source(
            load_tiles(sample, {slide_row["slide_id"]: slide_row["uri"]})
        )
    return score_slide(
        detector, slide_row, tiles, Path(out_dir), heatmap_downsample, transform=transform
    )


@task(name="evaluate")
def evaluate_task(
    site: SiteConfig,
    family: str,
    slides_path: str,
    scores: list[SlideScore],
    layout: SiteLayout,
    model_dir: str | None = None,
    model_threshold: float | None = None,
) -> dict[str, Any]:
    """Metrics, plots and slide table under reports/<family>/; calibration beside the model.

    `model_dir` (a model trained on this site) gets this evaluation's calibration written beside
    it; `model_threshold` (a model calibrated before, perhaps at another site) adds the calls
    made at that threshold to the metrics.
    """
    slides = pl.read_parquet(slides_path)
    by_slide = {s.slide_id: (s.slide_score, s.heatmap) for s in scores}
    evaluation = evaluate_site(
        slides,
        by_slide,
        site.tiling.heatmap_downsample,
        site.target_fpr,
        site.domain,
        itc_um=site.froc_itc_um,
        model_threshold=model_threshold,
    )
    folder = layout.reports / family
    folder.mkdir(parents=True, exist_ok=True)
    evaluation.table.write_csv(folder / "slides.csv")
    metrics = {**evaluation.metrics, **evaluation.froc_points}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots = _evaluation_plots(evaluation, folder, f"{site.name} / {family}")
    if model_dir is not None:
        # The threshold travels with the model: scoring new slides predicts with it.
        write_calibration(
            model_dir, Calibration(evaluation.threshold, site.target_fpr, evaluation.value_range)
        )
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
    evaluation: dict[str, Any] | None,
    layout: SiteLayout,
    domain: str | None = None,
    model: str = "",
    model_dir: str | None = None,
) -> list[str]:
    """What people open: overlays on one colour scale, lesion files, and the HTML report.

    The threshold is the evaluation's (this run's held-out normal slides); without one (new
    slides, no metrics) it is the model's own calibration in `model_dir`. Lesion candidates go
    to the slides evaluation computed them for and, on a `domain="pathology"` site, to every
    slide. The inputs are saved beside the heatmaps (`scored.json`) for `vadflow export`.
    """
    if not scores:
        return []
    if evaluation is not None:
        threshold, value_range = evaluation["threshold"], tuple(evaluation["value_range"])
        source, report_dir = "from held-out normal slides", evaluation["report_dir"]
        metrics = {**evaluation["metrics"], **evaluation["froc_points"]}
        plots, given = evaluation["plots"], evaluation["candidates"]
    else:
        calibration = read_calibration(model_dir) if model_dir else None
        if calibration is None:
            get_run_logger().warning(
                "model %s has no calibration.json: slides are scored, not called", model
            )
            threshold, source = math.nan, "none"
            value_range = heatmap_value_range([load_heatmap(s.heatmap) for s in scores])
        else:
            threshold, value_range = calibration.threshold, calibration.heatmap_value_range
            source = f"the model's calibration, target FPR {calibration.target_fpr:g}"
        report_dir, metrics, plots, given = str(layout.reports / family), {}, {}, {}
    everyone = domain == "pathology"
    run = ScoredRun(
        site=layout.site,
        name=family,
        model=model,
        slides_path=slides_path,
        scores=tuple(scores),
        calibrated_threshold=threshold,
        threshold_source=source,
        value_range=value_range,
        exports_dir=str(layout.exports / family),
        report_dir=report_dir,
        candidate_slides=tuple(s.slide_id for s in scores if everyone or s.slide_id in given),
        metrics=metrics,
        plots=plots,
    )
    rendered = render_exports(run, candidates=given)
    return [s.overlay for s in rendered.exported]


@task(name="start-tracking")
def start_tracking_task(
    tracking_uri: str,
    spool_dir: str,
    site: SiteConfig,
    artifact_root: str | None,
    tags: dict[str, str],
) -> str:
    """The nightly parent run (a `local-...` reference when the server is down: spooled)."""
    with TrackingSession(tracking_uri, spool_dir) as session:
        return start_nightly(
            session,
            site.name,
            tags["version"],
            tags=tags,
            params={"site": site.name, "domain": site.domain, **site.tiling.model_dump()},
            artifact_root=artifact_root,
        )


@task(name="track")
def track_task(
    tracking_uri: str,
    spool_dir: str,
    parent_run_id: str,
    site: SiteConfig,
    slides_path: str,
    fit: dict[str, Any],
    evaluation: dict[str, Any],
    overlays: list[str],
    tags: dict[str, str],
    contracts_passed: bool,
) -> dict[str, Any]:
    """One child run per family; its model registered as <site>-<family> and gated."""
    slides = pl.read_parquet(slides_path).filter(pl.col("status") == "ok")
    eval_hash = evaluation_set_hash(
        slides,
        extra={
            "heatmap_downsample": site.tiling.heatmap_downsample,
            "target_fpr": site.target_fpr,
        },
    )
    with TrackingSession(tracking_uri, spool_dir) as session:
        result = track_family(
            session,
            parent_run_id,
            site=site.name,
            fit=fit,
            evaluation=evaluation,
            overlays=overlays,
            tags=tags,
            tiling=site.tiling,
            promotion=PromotionPolicy(**site.promotion.model_dump()),
            eval_set_hash=eval_hash,
            contracts_passed=contracts_passed,
        )
    if result.spooled:
        get_run_logger().warning(
            "tracking server unreachable: %s is spooled; run `vadflow tracking sync` when it "
            "is back",
            fit["family"],
        )
    return asdict(result)


@task(name="finish-tracking")
def finish_tracking_task(
    tracking_uri: str,
    spool_dir: str,
    parent_run_id: str,
    site: SiteConfig,
    summary: dict[str, dict[str, float]],
    layout: SiteLayout,
    contracts_report: str,
) -> None:
    """Per-family metrics, the contracts report and the cross-run comparison on the parent."""
    with TrackingSession(tracking_uri, spool_dir) as session:
        finish_nightly(
            session,
            parent_run_id,
            site=site.name,
            family_metrics=summary,
            comparison_dir=layout.reports / "comparison",
            reports={"contracts": contracts_report},
        )


@task(name="resolve-model")
def resolve_model_task(
    model: str, site: str, family: str, tracking_uri: str, cache_root: str
) -> str:
    """A local detector folder for `model`: a folder, an MLflow model URI, 'champion' (this
    site's) or 'champion@<site>' (another site's)."""
    import mlflow.artifacts

    if Path(model).is_dir():
        return model
    if model == "champion" or model.startswith("champion@"):
        # "champion@<other-site>": another hospital's model, for cross-site evaluation.
        owner = model.partition("@")[2] or site
        target = Path(cache_root) / "model-cache" / f"{owner}-{family}-champion"
        return str(download_champion(tracking_uri, owner, family, target))
    uri = model
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
