"""The track stage's tasks (`tasks/tracking/nightly.py`, `tasks/tracking/resolve.py`): the
night's parent run, a child run per family with the champion gate, the parent's summary; and
which model a scoring run uses."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from vadflow.tasks.records import Evaluated, TrackedFamily, TrackingTarget, TrainedModel
from vadflow.tasks.site import SiteConfig
from vadflow.tasks.tracking.nightly import close_nightly_run, log_family_run, open_nightly_run
from vadflow.tasks.tracking.resolve import resolve_model


@task(name="start-tracking")
def start_tracking_task(
    target: TrackingTarget, site: SiteConfig, version: str, tags: dict[str, str]
) -> str:
    """The nightly parent run (a `local-...` reference when the server is down: spooled)."""
    return open_nightly_run(target, site, version, tags)


@task(name="track")
def track_task(
    target: TrackingTarget,
    parent_run_id: str,
    site: SiteConfig,
    slides_path: str,
    trained: TrainedModel,
    evaluation: Evaluated,
    overlays: list[str],
    tags: dict[str, str],
    contracts_passed: bool,
    category: str | None = None,
) -> TrackedFamily:
    """One child run per family (per family and category: `category`); its model registered
    as <site>-<family> (<site>-<family>-<category>) and gated."""
    return log_family_run(
        target,
        parent_run_id,
        site,
        slides_path,
        trained,
        evaluation,
        overlays,
        tags,
        contracts_passed=contracts_passed,
        category=category,
        log=get_run_logger(),
    )


@task(name="finish-tracking")
def finish_tracking_task(
    target: TrackingTarget,
    parent_run_id: str,
    site: str,
    family_metrics: dict[str, dict[str, float]],
    comparison_dir: str,
    contracts_report: str,
) -> list[Path]:
    """Per-family metrics, the contracts report and the cross-run comparison on the parent."""
    return close_nightly_run(
        target, parent_run_id, site, family_metrics, Path(comparison_dir), contracts_report
    )


@task(name="resolve-model")
def resolve_model_task(
    model: str, site: str, family: str, tracking_uri: str, cache_root: str
) -> str:
    """A local detector folder for `model`: a folder, an MLflow model URI, 'champion' (this
    site's) or 'champion@<site>' (another site's)."""
    return resolve_model(model, site, family, tracking_uri, cache_root)
