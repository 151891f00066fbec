"""The export stage's task (`tasks/exports/publish.py`)."""

from __future__ import annotations

from prefect import get_run_logger, task

from vadflow.tasks.progress import report
from vadflow.tasks.records import Evaluated, Exported, SlideScore
from vadflow.tasks.site import CandidatesConfig, SiteLayout


@task(name="export")
def export_task(
    name: str,
    slides_path: str,
    scores: list[SlideScore],
    evaluation: Evaluated | None,
    layout: SiteLayout,
    domain: str | None = None,
    model: str = "",
    model_dir: str | None = None,
    render: bool = True,
    candidates: CandidatesConfig | None = None,
    keep_artefacts: bool = False,
) -> Exported:
    """Overlays, lesion files and the HTML report of run `name`, at the evaluation's threshold
    or, without one, at the model's own calibration; without `render`, only the run's
    `scored.json`, for `vadflow export` to draw them later."""
    # Imported here: the exports draw with matplotlib and read heatmaps through torch's stage.
    from vadflow.tasks.exports.publish import export_scored_run

    stage = f"export {name}"
    report(stage, 0, 1, f"{len(scores)} slides")
    exported = export_scored_run(
        layout,
        name,
        slides_path,
        scores,
        evaluation,
        domain=domain,
        model=model,
        model_dir=model_dir,
        logger=get_run_logger(),
        render=render,
        candidates=candidates,
        keep_artefacts=keep_artefacts,
    )
    report(stage, 1, 1, f"{len(exported.overlays)} overlays")
    return exported
