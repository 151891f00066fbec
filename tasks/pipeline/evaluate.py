"""The evaluate stage's task (`tasks/evaluation/scored_run.py`)."""

from __future__ import annotations

from prefect import task

from vadflow.tasks.evaluation.scored_run import evaluate_scored_run
from vadflow.tasks.records import Evaluated, SlideScore
from vadflow.tasks.site import SiteConfig, SiteLayout


@task(name="evaluate")
def evaluate_task(
    site: SiteConfig,
    name: str,
    slides_path: str,
    scores: list[SlideScore],
    layout: SiteLayout,
    model_dir: str | None = None,
    model_threshold: float | None = None,
) -> Evaluated:
    """Metrics, plots and slide table under reports/<name>/; calibration beside `model_dir`
    (a model trained on this site); `model_threshold` adds the calls a model calibrated
    before would make here."""
    return evaluate_scored_run(
        site,
        name,
        slides_path,
        scores,
        layout.reports,
        model_dir,
        model_threshold,
        masks_dir=str(layout.masks),
    )
