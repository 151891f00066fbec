"""The evaluate stage's task (`tasks/evaluation/scored_run.py`)."""

from __future__ import annotations

from prefect import task

from vadflow.tasks.progress import report
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
    family: str | None = None,
) -> Evaluated:
    """Metrics, plots and slide table under reports/<name>/; calibration beside `model_dir`
    (a model trained on this site); `model_threshold` adds the calls a model calibrated
    before would make here. `family` tells whether the model learned from lesion labels
    (the `auto` slide score is then the maximum)."""
    # Imported here: evaluation pulls in sklearn, matplotlib and torch, which the flow module
    # (and the command line that imports it) should not pay for before the first task runs.
    from vadflow.tasks.detectors.registry import detector_class
    from vadflow.tasks.evaluation.scored_run import evaluate_scored_run

    stage = f"evaluate {name}"
    report(stage, 0, 1, f"{len(scores)} slides")
    evaluated = evaluate_scored_run(
        site,
        name,
        slides_path,
        scores,
        layout.reports,
        model_dir,
        model_threshold,
        masks_dir=str(layout.masks),
        labelled=family is not None and detector_class(family).supervision != "none",
    )
    report(stage, 1, 1, _headline(evaluated.metrics))
    return evaluated


def _headline(metrics: dict[str, float]) -> str:
    """The first AUROC the evaluation has (slide, image or pixel), for a progress line."""
    for key in ("slide_auroc", "image_auroc", "pixel_auroc"):
        value = metrics.get(key)
        if isinstance(value, float) and value == value:  # NaN: not computable here
            return f"{key} {value:.3f}"
    return "done"
