"""What one nightly run logs, as three plain functions the Prefect tasks wrap.

    parent = start_nightly(session, ...)                 # the night's parent run
    result = track_family(session, parent, ...)          # one nested child run per family
    finish_nightly(session, parent, ...)                 # per-family summary, comparison, end

Each takes a `TrackingSession`, so with the tracking server down everything is spooled and the
nightly run still finishes; `vadflow tracking sync` sends it later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vadflow.tasks.tracking.compare import compare_runs, log_comparison
from vadflow.tasks.tracking.mlflow_runs import (
    curve_metrics,
    experiment_name,
    family_params,
    run_tags,
)
from vadflow.tasks.tracking.registry import PromotionDecision
from vadflow.tasks.tracking.spool import TrackingSession, is_unreachable

logger = logging.getLogger(__name__)

EXAMPLE_FILE = "example_tiles.npy"  # written beside the weights by the train task


@dataclass(frozen=True)
class PromotionPolicy:
    """The champion gate's settings (a site's config, e.g. slide AUROC with margin 0.01)."""

    metric: str = "slide_auroc"
    margin: float = 0.0
    higher_is_better: bool = True


@dataclass(frozen=True)
class FamilyTracking:
    """What `track_family` logged: the run reference (`local-...` if spooled), the model URI
    (None if spooled), the champion gate's decision (None if spooled or not asked for), and
    whether anything went to the spool (then `vadflow tracking sync` sends it)."""

    run_id: str
    model_uri: str | None
    decision: dict[str, Any] | None
    spooled: bool


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


def track_family(
    session: TrackingSession,
    parent: str,
    *,
    site: str,
    fit: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    overlays: list[str],
    tags: Mapping[str, str],
    tiling: Any,
    promotion: PromotionPolicy | None = None,
    eval_set_hash: str | None = None,
    contracts_passed: bool = True,
) -> FamilyTracking:
    """One child run for a trained and evaluated family: config and tiling as params, per-epoch
    curves, evaluation metrics, reports, overlays, the evaluation's plots, the model; then
    register it and put it through the champion gate (when `promotion` is given).

    `fit` and `evaluation` are the train and evaluate tasks' records."""
    family = fit["family"]
    report = fit.get("report", {})
    diverged = bool(report.get("diverged"))
    run = session.start_run(
        experiment_name(site),
        family,
        {**tags, **run_tags(site, family=family, contracts_passed=contracts_passed)},
        parent=parent,
    )
    session.log_params(run, family_params(family, fit["config"], tiling))
    session.log_metric_series(run, curve_metrics(fit.get("curves", [])))
    session.log_metrics(run, {**evaluation["metrics"], **evaluation.get("froc_points", {})})
    session.log_metrics(
        run,
        {
            "train_seconds": report.get("seconds"),
            "train_tiles": fit.get("train_tiles"),
            "val_tiles": fit.get("val_tiles"),
            "best_epoch": report.get("best_epoch"),
        },
    )
    if evaluation.get("report_dir"):
        session.log_artifact(run, evaluation["report_dir"], "report")
    for path in overlays:
        session.log_artifact(run, path, "heatmaps")
    for plot in evaluation.get("plots", {}).values():  # ROC, FROC, PRO from evaluation
        session.log_artifact(run, plot, "plots")
    model_dir = Path(fit["model_dir"])
    example = np.load(model_dir / EXAMPLE_FILE) if (model_dir / EXAMPLE_FILE).is_file() else None
    model_uri = session.log_model(run, model_dir, example)
    decision: PromotionDecision | None = None
    if promotion is not None:
        decision = session.register_and_promote(
            run,
            site,
            family,
            metric=promotion.metric,
            margin=promotion.margin,
            higher_is_better=promotion.higher_is_better,
            contracts_passed=contracts_passed,
            diverged=diverged,
            eval_set_hash=eval_set_hash,
        )
    session.end_run(run, "FAILED" if diverged else "FINISHED")
    return FamilyTracking(
        run_id=run,
        model_uri=model_uri,
        decision=decision.to_dict() if decision is not None else None,
        spooled=session.spooled > 0,
    )


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
