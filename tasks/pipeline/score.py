"""The score stage's task (`tasks/scoring/run.py`): one slide, one saved model."""

from __future__ import annotations

from typing import Any

from prefect import task

from vadflow.tasks.records import SlideScore
from vadflow.tasks.scoring.run import score_with_model


@task(name="score")
def score_task(
    model_dir: str,
    slide_row: dict[str, Any],
    tiles_path: str,
    out_dir: str,
    heatmap_downsample: int,
) -> SlideScore:
    """Score one slide with a saved model and the stain reference it was trained with."""
    return score_with_model(model_dir, slide_row, tiles_path, out_dir, heatmap_downsample)
