"""The track stage's tasks (`tasks/tracking/nightly.py`, `tasks/tracking/resolve.py`): the
night's parent run, a child run per family with the champion gate, the parent's summary; and
which model a scoring run uses. The stages (and MLflow) are imported in the task bodies."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from vadflow.tasks.progress import report
from vadflow.tasks.records import Evaluated, TrackedFamily, TrackingTarget, TrainedModel
from vadflow.tasks.site import SiteConfig


@task(name="start-tracking")
def start_tracking_task(
    target: TrackingTarget,
    site: SiteConfig,
    version: str,
    tags: dict[str, str],
    site_root: str | None = None,
) -> str:
    """The nightly parent run (a `local-...` reference when the server is down: spooled);
    first, runs a killed night left RUNNING are closed as KILLED and its partial outputs under
    `site_root` removed."""
    from vadflow.tasks.tracking.nightly import open_nightly_run

    report("track", 0, 1, f"opening the night's run in {target.tracking_uri}")
    parent = open_nightly_run(target, site, version, tags, site_root)
    spooled = parent.startswith("local-")
    report("track", 0, 1, "spooled: the server is unreachable" if spooled else "night's run opened")
    return parent


@task(name="open-family-run")
def open_family_run_task(
    target: TrackingTarget,
    parent_run_id: str,
    site: SiteConfig,
    family: str,
    tags: dict[str, str],
    category: str | None = None,
) -> str:
    """A family's (per category: `category`) child run, opened before its training so that
    the run spans training, scoring and evaluation; `track_task` logs into it and ends it.
    A `local-...` reference when the server is down (spooled, created at `sync`)."""
    from vadflow.tasks.tracking.nightly import open_family_run

    return open_family_run(target, parent_run_id, site, family, tags, category)


@task(name="end-family-run")
def end_family_run_task(target: TrackingTarget, run_id: str, reason: str) -> None:
    """End a family's child run that has nothing to log (the family was skipped: `reason`)."""
    from vadflow.tasks.tracking.nightly import end_family_run

    end_family_run(target, run_id, "FINISHED", reason)


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
    run_id: str | None = None,
) -> TrackedFamily:
    """One child run per family (per family and category: `category`); its model registered
    as <site>-<family> (<site>-<family>-<category>) and gated. `run_id` is the child that
    `open_family_run_task` opened before training (created here without it); it ends here."""
    from vadflow.tasks.tracking.nightly import log_family_run

    stage = f"track {trained.family}"
    report(stage, 0, 1, "logging the run and the model")
    tracked = log_family_run(
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
        run=run_id,
    )
    report(stage, 1, 1, _outcome(tracked))
    return tracked


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
    from vadflow.tasks.tracking.nightly import close_nightly_run

    report("track", 0, 1, "the night's summary and the comparison")
    written = close_nightly_run(
        target, parent_run_id, site, family_metrics, Path(comparison_dir), contracts_report
    )
    report("track", 1, 1, f"night's summary logged ({', '.join(family_metrics) or 'no family'})")
    return written


@task(name="resolve-model")
def resolve_model_task(
    model: str, site: str, family: str, tracking_uri: str, cache_root: str
) -> str:
    """A local detector folder for `model`: a folder, an MLflow model URI, 'champion' (this
    site's) or 'champion@<site>' (another site's)."""
    from vadflow.tasks.tracking.resolve import resolve_model

    report("model", 0, 1, f"finding {model}")
    folder = resolve_model(model, site, family, tracking_uri, cache_root)
    report("model", 1, 1, folder)
    return folder


def _outcome(tracked: TrackedFamily) -> str:
    """The champion gate's decision (or the spool) in a few words, for the progress display."""
    if tracked.spooled:
        return "spooled: the server is unreachable (`vadflow tracking sync` sends it)"
    decision = tracked.decision
    if decision is None:
        return "logged"
    return "promoted to champion" if decision.promoted else f"not promoted: {decision.reason}"
