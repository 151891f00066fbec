"""Score one slide with a saved model: the score stage.

    score = score_with_model(model_dir, slide_row, tiles_path, out_dir, heatmap_downsample=16)

The model folder holds the detector and the stain reference it was trained with
(tasks/training/stain.py); the slide is normalised to that reference, its own stain estimated
once from a sample of its tiles (not per batch, which would normalise batches apart), and then
scored into its heatmap and tile scores (`score_slide`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from vadflow.tasks.records import SlideScore
from vadflow.tasks.scoring.heatmap import score_slide
from vadflow.tasks.slides.tiles import load_tiles, sample_tiles
from vadflow.tasks.training.stain import read_stain_reference

STAIN_SOURCE_TILES = 128  # tiles of a slide its stain statistics are estimated from


def score_with_model(
    model_dir: str | Path,
    slide_row: dict[str, Any],
    tiles_path: str,
    out_dir: str | Path,
    heatmap_downsample: int,
) -> SlideScore:
    """Score one slide's tiles (its manifest `tiles_path`) with the model in `model_dir`."""
    from vadflow.tasks.detectors.registry import load_detector

    detector = load_detector(Path(model_dir))
    normaliser = read_stain_reference(model_dir)
    tiles = pl.read_parquet(tiles_path)
    transform = None
    if normaliser is not None and normaliser.method != "none" and tiles.height:
        sample = sample_tiles(tiles, STAIN_SOURCE_TILES, seed=0)
        transform = normaliser.for_source(
            load_tiles(sample, {slide_row["slide_id"]: slide_row["uri"]})
        )
    return score_slide(
        detector, slide_row, tiles, Path(out_dir), heatmap_downsample, transform=transform
    )
