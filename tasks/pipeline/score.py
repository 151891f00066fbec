"""The score stage's task (`tasks/scoring/run.py`): one slide, one saved model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from vadflow.tasks.progress import advance
from vadflow.tasks.records import SlideScore


@task(name="score")
def score_task(
    model_dir: str,
    slide_row: dict[str, Any],
    tiles_path: str,
    out_dir: str,
    heatmap_downsample: int,
    slides_in_run: int | None = None,
    reuse: bool = False,
) -> SlideScore:
    """Score one slide with a saved model and the stain reference it was trained with.

    The flow maps this task over slides, and the mapped tasks run side by side in threads:
    each waits for a torch slot (at most one per core) and takes its share of the cores.
    A model calibrated on `tail` slide scores (its calibration.json) gives the slide its tail
    score against the model's own normal reference, so its threshold applies.
    `slides_in_run` is how many slides the map scores: the progress total, and how many tasks
    share the cores (None: assume the map has a task for every core).

    With `reuse` (the nightly), a slide this model folder scored before, unchanged since, gets
    its earlier heatmap and tile scores (linked into `out_dir`) and no pixel is decoded; each
    newly scored slide is recorded in the model folder for the next night
    (`tasks/scoring/reuse.py`).
    """
    # Imported here: scoring pulls in torch, which importing a flow should not.
    from vadflow.tasks.detectors.base import read_config
    from vadflow.tasks.detectors.components.threads import torch_slot
    from vadflow.tasks.evaluation.calibration import calibrated_slide_score, read_calibration
    from vadflow.tasks.scoring.reuse import earlier_score, remember_score
    from vadflow.tasks.scoring.run import score_with_model

    family = read_config(Path(model_dir))["family"]
    if reuse and (
        earlier := earlier_score(model_dir, slide_row, tiles_path, out_dir, heatmap_downsample)
    ):
        advance(f"score {family}", slides_in_run, f"{earlier.slide_id}: unchanged, reused")
        return calibrated_slide_score(earlier, read_calibration(model_dir))
    with torch_slot(slides_in_run):
        score = score_with_model(model_dir, slide_row, tiles_path, out_dir, heatmap_downsample)
    if reuse:
        remember_score(model_dir, slide_row, tiles_path, heatmap_downsample, score)
    score = calibrated_slide_score(score, read_calibration(model_dir))
    advance(f"score {family}", slides_in_run, f"{score.slide_id}: {score.tiles} tiles")
    return score
