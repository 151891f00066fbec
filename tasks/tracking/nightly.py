"""What one nightly run logs, as three plain functions the Prefect tasks wrap.

    parent = start_nightly(session, ...)                 # the night's parent run
    child = start_family(session, parent, ...)           # a family's child, before training
    result = track_family(session, parent, run=child, ...)  # its logging, model, gate, end
    finish_nightly(session, parent, ...)                 # per-family summary, comparison, end

Each takes a `TrackingSession`, so with the tracking server down everything is spooled and the
nightly run still finishes; `vadflow tracking sync` sends it later.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from vadflow.tasks.evaluation.calibration import read_calibration
from vadflow.tasks.records import (
    Evaluated,
    NightlySummary,
    PromotionDecision,
    TrackedFamily,
    TrackingTarget,
    TrainedModel,
)
from vadflow.tasks.site import SiteConfig
from vadflow.tasks.tracking.mlflow_runs import (
    DEFAULT_FLOOR,
    NORMAL_MAX,
    NORMAL_MEDIAN,
    NORMAL_THRESHOLD,
    TAG_CATEGORY,
    TAG_PROMOTION,
    curve_metrics,
    experiment_name,
    family_params,
    manifest_hashes,
    run_tags,
)
from vadflow.tasks.training.model_folder import EXAMPLE_FILE

if TYPE_CHECKING:  # these load MLflow: imported where a run is logged, not with a flow module
    from vadflow.tasks.tracking.spool import TrackingSession

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionPolicy:
    """The champion gate's settings (a site's config, e.g. slide AUROC with margin 0.01, and
    the floor `min`: metric -> minimum, checked even with no champion to beat)."""

    metric: str = "slide_auroc"
    margin: float = 0.0
    higher_is_better: bool = True
    min: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FLOOR))


def start_nightly(
    session: TrackingSession,
    site: str,
    version: str,
    *,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    artifact_root: str | Path | None = None,
) -> str:
    """The night's parent run in the site's experiment; `params` are the site and tiling
    settings, `tags` come from `run_tags` (git commit, flow run, manifest hashes, contracts)."""
    run = session.start_run(
        experiment_name(site),
        f"nightly-{version}",
        {**run_tags(site), **tags, "version": version},
        artifact_location=artifact_root,
    )
    session.log_params(run, params)
    return run


def family_run_identity(
    site: str, family: str, category: str | None, tags: Mapping[str, str]
) -> tuple[str, str, dict[str, str]]:
    """A family's child run: (run name, registered-model suffix, tags). With `category` (an
    industrial site trained per category) `<family>/<category>`, `<family>-<category>` and
    the `category` tag. `tags` are the night's (flow run, manifests), which the flow hooks use
    to end a failed night's runs."""
    run_name, registered = family, family
    run_tag = run_tags(site, family=family)
    if category is not None:
        run_name, registered = f"{family}/{category}", f"{family}-{category}"
        run_tag[TAG_CATEGORY] = category
    return run_name, registered, {**tags, **run_tag}


def start_family(
    session: TrackingSession,
    parent: str,
    *,
    site: str,
    family: str,
    tags: Mapping[str, str],
    category: str | None = None,
) -> str:
    """Open a family's child run under `parent` before it is trained, so the run's start and
    end (in `track_family`) span training, scoring and evaluation. Returns its reference
    (`local-...` when spooled: `vadflow tracking sync` creates it with its start time)."""
    run_name, _, run_tag = family_run_identity(site, family, category, tags)
    return session.start_run(experiment_name(site), run_name, run_tag, parent=parent)


def track_family(
    session: TrackingSession,
    parent: str,
    *,
    site: str,
    fit: TrainedModel,
    evaluation: Evaluated,
    overlays: Sequence[str],
    tags: Mapping[str, str],
    tiling: Any,
    promotion: PromotionPolicy | None = None,
    eval_set_hash: str | None = None,
    contracts_passed: bool = True,
    category: str | None = None,
    slides_path: str | Path | None = None,
    run: str | None = None,
) -> TrackedFamily:
    """One child run for a trained and evaluated family: config and tiling as params, per-epoch
    curves, evaluation metrics, reports, overlays, the evaluation's plots, the model; then
    register it and put it through the champion gate (when `promotion` is given), and end it.

    `run` is the child opened before training (`start_family`), so the run spans training and
    scoring; without it the child is created here. The registered version is tagged with the
    manifest datasets' names and digests (`dataset_version_tags`) beside its run.

    `fit` and `evaluation` are the train and evaluate stages' records. With `category` (an
    industrial site trained per category) the run is one category's model: named
    `<family>/<category>`, tagged `category`, registered as `<site>-<family>-<category>` with
    its own champion gate, since each category's model is deployed and judged on its own."""
    family, report, diverged = fit.family, fit.report, fit.diverged
    run_name, registered, run_tag = family_run_identity(site, family, category, tags)
    run_tag |= run_tags(site, family=family, contracts_passed=contracts_passed)
    if run is None:
        run = session.start_run(experiment_name(site), run_name, run_tag, parent=parent)
    else:  # opened before training: the contracts' outcome is known only now
        session.set_tags(run, run_tag)
    session.log_params(run, family_params(family, fit.config, tiling))
    datasets = manifest_datasets(slides_path, site) if slides_path is not None else []
    if datasets and session.online and not run.startswith("local-"):
        log_manifest_datasets(session.client, run, datasets)
    session.log_metric_series(run, curve_metrics([asdict(c) for c in fit.curves]))
    session.log_metrics(run, evaluation.all_metrics)
    session.log_metrics(run, normal_validation_metrics(fit.model_dir))
    session.log_metrics(
        run,
        {
            "train_seconds": report.seconds if report else None,
            "train_tiles": fit.train_tiles,
            "val_tiles": fit.val_tiles,
            "best_epoch": report.best_epoch if report else None,
        },
    )
    if evaluation.report_dir:
        session.log_artifact(run, evaluation.report_dir, "report")
    for path in overlays:
        session.log_artifact(run, path, "heatmaps")
    for plot in evaluation.plots.values():  # ROC, FROC, PRO from evaluation
        session.log_artifact(run, plot, "plots")
    model_dir = Path(fit.model_dir)
    example = np.load(model_dir / EXAMPLE_FILE) if (model_dir / EXAMPLE_FILE).is_file() else None
    model_uri = session.log_model(run, model_dir, example)
    decision: PromotionDecision | None = None
    if promotion is not None:
        decision = session.register_and_promote(
            run,
            site,
            registered,
            metric=promotion.metric,
            margin=promotion.margin,
            higher_is_better=promotion.higher_is_better,
            contracts_passed=contracts_passed,
            diverged=diverged,
            eval_set_hash=eval_set_hash,
            floor=promotion.min,
            version_tags=dataset_version_tags(datasets),
        )
        if decision is not None:  # the run page says why, beside the registry's version tags
            outcome = "champion" if decision.promoted else "not promoted"
            session.set_tags(run, {TAG_PROMOTION: f"{outcome}: {decision.reason}"})
    session.end_run(run, "FAILED" if diverged else "FINISHED")
    return TrackedFamily(
        run_id=run, model_uri=model_uri, decision=decision, spooled=session.spooled > 0
    )


# The slide manifest's columns a dataset shows (others hold paths or nested values).
DATASET_COLUMNS = ("slide_id", "split", "label", "category", "sha256", "width", "height", "mpp")
DATASET_CONTEXTS = {"train": "training", "test": "test"}  # split -> MLflow's context tag
DATASET_TAG_PREFIX = "dataset."  # model version tags: dataset.<context>.{name,digest}


@dataclass(frozen=True)
class ManifestDataset:
    """One split of the slide manifest as an MLflow dataset: `<site>-<split>`, its MLflow
    context (`training` / `test`), a digest over its rows, the rows and the manifest file."""

    name: str
    split: str
    context: str
    digest: str
    rows: pl.DataFrame
    source: str


def manifest_datasets(slides_path: str | Path, site: str) -> list[ManifestDataset]:
    """The training and test slides of the manifest (usable rows only), each digested over its
    rows: the first 32 hex digits of a sha256 of slide_id, content hash and label, so the same
    slides give the same digest on every night. Splits with no slide are left out."""
    slides = pl.read_parquet(slides_path)
    if "status" in slides.columns:
        slides = slides.filter(pl.col("status") == "ok")
    columns = [c for c in DATASET_COLUMNS if c in slides.columns]
    found = []
    for split, context in DATASET_CONTEXTS.items():
        rows = slides.filter(pl.col("split") == split).select(columns).sort("slide_id")
        if rows.is_empty():
            continue
        key = rows.select([c for c in ("slide_id", "sha256", "label") if c in columns])
        digest = hashlib.sha256(key.write_csv().encode()).hexdigest()[:32]
        source = str(Path(slides_path).resolve())
        found.append(ManifestDataset(f"{site}-{split}", split, context, digest, rows, source))
    return found


def dataset_version_tags(datasets: Sequence[ManifestDataset]) -> dict[str, str]:
    """Model version tags naming the datasets a model was trained and tested on:
    `dataset.<context>.name` and `dataset.<context>.digest` (the digests the run's Datasets
    panel shows). MLflow 3 links a logged model to datasets only through metrics, and a
    registered version not at all, so the registry page gets them as tags."""
    tags = {}
    for dataset in datasets:
        tags[f"{DATASET_TAG_PREFIX}{dataset.context}.name"] = dataset.name
        tags[f"{DATASET_TAG_PREFIX}{dataset.context}.digest"] = dataset.digest
    return tags


def log_manifest_datasets(
    client: Any, run: str, datasets: str | Path | Sequence[ManifestDataset], site: str = ""
) -> dict[str, str]:
    """Log the training and test slides of the manifest as the run's MLflow datasets (the run
    page's Datasets panel): named `<site>-<split>`, sourced from the manifest file, digested
    over their rows (`manifest_datasets`), tagged with the context `training` / `test`.
    `datasets` is their list, or the manifest's path (then `site` names them). Returns
    split -> digest."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if isinstance(datasets, (str, Path)):
        datasets = manifest_datasets(datasets, site)
    inputs, digests = [], {}
    for dataset in datasets:
        with warnings.catch_warnings():
            # mlflow registers two local-file source classes and warns that it picks one.
            warnings.simplefilter("ignore", UserWarning)
            logged = mlflow.data.from_pandas(
                dataset.rows.to_pandas(),
                source=dataset.source,
                name=dataset.name,
                digest=dataset.digest,
            )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, dataset.context)]
        inputs.append(DatasetInput(logged._to_mlflow_entity(), tags))
        digests[dataset.split] = dataset.digest
    if inputs:
        client.log_inputs(run, datasets=inputs)
    return digests


def normal_validation_metrics(model_dir: str | Path) -> dict[str, float]:
    """What the model's own normal validation data says about it (its calibration): the slide
    threshold and the (median, max) of normal heatmaps. The champion gate's floor reads these
    where there are no labels to measure an AUROC with; empty when it was never calibrated."""
    calibration = read_calibration(model_dir)
    if calibration is None:
        return {}
    median, top = calibration.heatmap_value_range
    return {NORMAL_THRESHOLD: calibration.threshold, NORMAL_MEDIAN: median, NORMAL_MAX: top}


def finish_nightly(
    session: TrackingSession,
    parent: str,
    *,
    site: str,
    family_metrics: Mapping[str, Mapping[str, float]],
    comparison_dir: Path | None = None,
    reports: Mapping[str, str | Path] | None = None,
) -> list[Path]:
    """Per-family metrics on the parent (`<family>.<metric>`), its reports (e.g. contracts),
    and the cross-run comparison as `comparison/compare.{csv,png}`; then end the parent.

    The comparison needs the server (it reads past runs), so while offline it is skipped and
    only the rest is spooled. Returns the comparison files written."""
    for family, metrics in family_metrics.items():
        session.log_metrics(parent, {f"{family}.{k}": v for k, v in metrics.items()})
    for artifact_path, path in (reports or {}).items():
        if Path(path).exists():
            session.log_artifact(parent, path, artifact_path)
    from vadflow.tasks.tracking.compare import compare_runs, log_comparison
    from vadflow.tasks.tracking.spool import is_unreachable

    written: list[Path] = []
    if comparison_dir is not None and session.online and not parent.startswith("local-"):
        try:
            frame = compare_runs(session.client, site)
            written = log_comparison(session, parent, frame, Path(comparison_dir), site)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            logger.warning("no comparison for %s: tracking server unreachable (%s)", site, exc)
    session.end_run(parent, "FINISHED")
    return written


# --- the track stage: each call opens its own session (a Prefect task may run anywhere) ---


def git_commit() -> str:
    """The short commit of the code that ran (a run tag); "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def nightly_tags(
    site: SiteConfig, version: str, slides_path: str, tile_paths: list[str], flow_run_id: str
) -> dict[str, str]:
    """The tags of a night's runs: code, flow run, manifest hashes, domain and version."""
    return run_tags(
        site.name,
        git_commit=git_commit(),
        flow_run_id=flow_run_id,
        manifest_hashes=manifest_hashes(slides_path, tile_paths),
        contracts_passed=True,  # the manifest contracts raised otherwise (strict mode)
        extra={"domain": site.domain, "version": version},
    )


def open_nightly_run(
    target: TrackingTarget,
    site: SiteConfig,
    version: str,
    tags: Mapping[str, str],
    site_root: str | Path | None = None,
) -> str:
    """The night's parent run, with the site and tiling settings as params; a `local-...`
    reference when the server is down (spooled).

    First, this site's runs an earlier night left RUNNING (killed: its process is gone, or its
    heartbeat is stale) are closed as KILLED, and what that night half-wrote under `site_root`
    is removed (`tasks/tracking/lifecycle.py`)."""
    from vadflow.tasks.tracking.lifecycle import (
        close_stale_runs,
        liveness_tags,
        remove_partial_outputs,
    )
    from vadflow.tasks.tracking.spool import TrackingSession, is_unreachable

    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        try:
            closed = close_stale_runs(session.client, site.name) if session.online else []
        except Exception as exc:  # a server that is down is the spool's business, not ours
            if not is_unreachable(exc):
                raise
            closed = []
        for run in closed:
            removed = remove_partial_outputs(Path(site_root), run.version) if site_root else []
            logger.warning(
                "%s: run %s (%s) was left RUNNING; %s; removed partial outputs: %s",
                site.name,
                run.name,
                run.run_id,
                run.reason,
                [str(p) for p in removed] or "none",
            )
        return start_nightly(
            session,
            site.name,
            version,
            tags={**tags, **liveness_tags()},
            params={"site": site.name, "domain": site.domain, **site.tiling.model_dump()},
            artifact_root=target.artifact_root,
        )


def open_family_run(
    target: TrackingTarget,
    parent: str,
    site: SiteConfig,
    family: str,
    tags: Mapping[str, str],
    category: str | None = None,
) -> str:
    """A family's (or one category's) child run, opened before its training; `log_family_run`
    logs into it and ends it. Also a heartbeat for the night's parent run."""
    from vadflow.tasks.tracking.lifecycle import TAG_HEARTBEAT
    from vadflow.tasks.tracking.spool import TrackingSession

    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        session.set_tags(parent, {TAG_HEARTBEAT: str(int(time.time() * 1000))})
        return start_family(
            session, parent, site=site.name, family=family, tags=tags, category=category
        )


def end_family_run(target: TrackingTarget, run: str, status: str, reason: str) -> None:
    """End a child run that will log nothing more (its family was skipped), with `reason` as
    the tag `vadflow.end_reason`."""
    from vadflow.tasks.tracking.lifecycle import TAG_END_REASON
    from vadflow.tasks.tracking.spool import TrackingSession

    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        session.set_tags(run, {TAG_END_REASON: reason})
        session.end_run(run, status)


def log_family_run(
    target: TrackingTarget,
    parent: str,
    site: SiteConfig,
    slides_path: str,
    trained: TrainedModel,
    evaluation: Evaluated,
    overlays: Sequence[str],
    tags: Mapping[str, str],
    *,
    contracts_passed: bool,
    category: str | None = None,
    log: logging.Logger | logging.LoggerAdapter = logger,
    run: str | None = None,
) -> TrackedFamily:
    """One child run for a family (or one category's model of it), its model registered as
    `<site>-<family>` (`<site>-<family>-<category>`) and put through the site's champion gate
    on this night's evaluation set (the slides that were usable). `run` is the child that
    `open_family_run` opened before training (created here without it); it ends here."""
    from vadflow.tasks.tracking.registry import evaluation_set_hash
    from vadflow.tasks.tracking.spool import TrackingSession

    slides = pl.read_parquet(slides_path).filter(pl.col("status") == "ok")
    eval_hash = evaluation_set_hash(
        slides,
        extra={
            "heatmap_downsample": site.tiling.heatmap_downsample,
            "target_fpr": site.target_fpr,
        },
    )
    from vadflow.tasks.tracking.lifecycle import TAG_HEARTBEAT

    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        session.set_tags(parent, {TAG_HEARTBEAT: str(int(time.time() * 1000))})  # still alive
        tracked = track_family(
            session,
            parent,
            site=site.name,
            fit=trained,
            evaluation=evaluation,
            overlays=overlays,
            tags=tags,
            tiling=site.tiling,
            promotion=PromotionPolicy(**site.promotion.model_dump()),
            eval_set_hash=eval_hash,
            contracts_passed=contracts_passed,
            category=category,
            slides_path=slides_path,
            run=run,
        )
    if tracked.spooled:
        log.warning(
            "tracking server unreachable: %s is spooled; run `vadflow tracking sync` when it "
            "is back",
            trained.family,
        )
    return tracked


def close_nightly_run(
    target: TrackingTarget,
    parent: str,
    site: str,
    family_metrics: Mapping[str, Mapping[str, float]],
    comparison_dir: Path,
    contracts_report: str,
) -> list[Path]:
    """Per-family metrics, the contracts report and the cross-run comparison on the parent run,
    which then ends."""
    from vadflow.tasks.tracking.spool import TrackingSession

    with TrackingSession(target.tracking_uri, target.spool_dir) as session:
        return finish_nightly(
            session,
            parent,
            site=site,
            family_metrics=family_metrics,
            comparison_dir=comparison_dir,
            reports={"contracts": contracts_report},
        )


def summary_markdown(summary: NightlySummary) -> str:
    """The night as a Markdown table (a Prefect artifact): each family's metrics (per category
    and their mean on a site trained per category), then what the labels left out and the
    slides set aside."""
    lines = [f"# nightly {summary.site} {summary.version}", ""]
    lines += ["| family | category | metric | value |", "| --- | --- | --- | --- |"]
    for family, result in summary.families.items():
        shown = [(name, c.metrics) for name, c in result.categories.items()]
        shown.append(("mean" if result.categories else "", result.metrics))
        for category, metrics in shown:
            for key, value in metrics.items():
                lines.append(f"| {family} | {category} | {key} | {value:.4f} |")
    if gaps := summary.gaps.lines():
        lines += ["", "## label gaps", ""]
        lines += [f"- {line}" for line in gaps]
    if summary.quarantined:
        lines += ["", "## quarantined", ""]
        lines += [f"- {q.slide_id}: {q.reason}" for q in summary.quarantined]
    if not summary.exported:
        lines += ["", "exports skipped (`--no-export`): draw them with `vadflow export`"]
    return "\n".join(lines)
