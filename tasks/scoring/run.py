"""Score one slide with a saved model: the score stage.

    score = score_with_model(model_dir, slide_row, tiles_path, out_dir, heatmap_downsample=16)

The model folder holds the detector and the stain reference it was trained with
(tasks/training/stain.py); the slide is normalised to that reference, its own stain estimated
once from a sample of its tiles (not per batch, which would normalise batches apart), and then
scored into its heatmap and tile scores (`score_slide`).

    scores = score_slides(model_dir, rows, tiles_paths, out_dir, 16, executor=pool)

`score_one` is one slide as the pipeline scores it (an earlier score reused where nothing
changed, calibrated slide score, progress); `score_slides` maps it over many slides, in this
process or on an executor: a Dask client's (`tasks/tiling/runners.py: tiling_executor`, the
site's `parallel` setting, the same one tiling uses) or a local process pool. Each slide is
scored whole by one worker, so outputs do not depend on how many workers there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import polars as pl

from vadflow.tasks.progress import advance
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


def score_one(
    model_dir: str,
    slide_row: dict[str, Any],
    tiles_path: str,
    out_dir: str,
    heatmap_downsample: int,
    slides_in_run: int | None = None,
    reuse: bool = False,
    side_by_side: int | None = None,
) -> SlideScore:
    """Score one slide as the pipeline does: with `reuse`, a slide this model folder scored
    before, unchanged since, gets its earlier heatmap and tile scores and no pixel is decoded
    (`tasks/scoring/reuse.py`); the slide score is calibrated by the model's calibration.

    `side_by_side` is how many slides this process scores at once (its torch threads are the
    cores divided by it; None: one per core); `slides_in_run` is the progress total.
    """
    from vadflow.tasks.detectors.base import read_config
    from vadflow.tasks.detectors.components.threads import torch_slot
    from vadflow.tasks.evaluation.calibration import calibrated_slide_score, read_calibration
    from vadflow.tasks.scoring.reuse import earlier_score, remember_score

    family = read_config(Path(model_dir))["family"]
    if reuse and (
        earlier := earlier_score(model_dir, slide_row, tiles_path, out_dir, heatmap_downsample)
    ):
        advance(f"score {family}", slides_in_run, f"{earlier.slide_id}: unchanged, reused")
        return calibrated_slide_score(earlier, read_calibration(model_dir))
    with torch_slot(side_by_side):
        score = score_with_model(model_dir, slide_row, tiles_path, out_dir, heatmap_downsample)
    if reuse:
        remember_score(model_dir, slide_row, tiles_path, heatmap_downsample, score)
    score = calibrated_slide_score(score, read_calibration(model_dir))
    advance(f"score {family}", slides_in_run, f"{score.slide_id}: {score.tiles} tiles")
    return score


def score_slides(
    model_dir: str,
    slide_rows: Sequence[dict[str, Any]],
    tiles_paths: Sequence[str],
    out_dir: str,
    heatmap_downsample: int,
    *,
    executor: Executor | None = None,
    workers: int | None = None,
    reuse: bool = False,
) -> list[SlideScore]:
    """Score many slides with one model, one `score_one` per slide; results in `slide_rows`
    order. With an `executor` (a Dask client's, or a process pool) each slide is a job on it
    and `workers` says how many run at once (each worker's torch gets its share of the cores;
    None: leave the worker's default); without, the slides are scored here one by one.
    Progress is reported from this process as slides finish.
    """
    if len(slide_rows) != len(tiles_paths):
        raise ValueError(
            f"{len(slide_rows)} slides but {len(tiles_paths)} tile manifests: give one per slide"
        )
    from vadflow.tasks.detectors.base import read_config

    total = len(slide_rows)
    family = read_config(Path(model_dir))["family"]
    if executor is None:
        return [
            score_one(model_dir, row, path, out_dir, heatmap_downsample, total, reuse, 1)
            for row, path in zip(slide_rows, tiles_paths, strict=True)
        ]
    futures = [
        executor.submit(
            score_one, model_dir, row, path, out_dir, heatmap_downsample, total, reuse, workers
        )
        for row, path in zip(slide_rows, tiles_paths, strict=True)
    ]
    scores = []
    for future in futures:  # in order: a slide's error is raised with its own traceback
        score = future.result()
        # The workers' progress has no listener; count the slide here, where `vadflow run` is.
        advance(f"score {family}", total, f"{score.slide_id}: {score.tiles} tiles")
        scores.append(score)
    return scores
