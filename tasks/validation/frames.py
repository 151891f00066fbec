"""The frames the contracts read, built from what the stages leave on disk: tile manifests and
tile scores concatenated, one row per scored slide, and each slide's tiling grid."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from vadflow.data_contracts import Grid
from vadflow.data_contracts.schemas import TILE_SCORES_SCHEMA, conform_types

__all__ = ["TILE_SCORES_SCHEMA", "read_frames", "slide_scores_frame", "tile_grids"]


def tile_grids(slides: pl.DataFrame, tiling: Any) -> dict[str, Grid]:
    """slide_id -> its tiling grid, from the site's TilingConfig and each slide's MPP.

    Uses tasks.tiling.grid.working_geometry itself, so the contract checks the grid the tiler
    lays (its step depends on the MPP, not on the pyramid level, so any level will do).
    """
    from vadflow.tasks.tiling.grid import working_geometry

    class _AnyLevel:
        def best_level_for_downsample(self, downsample: float) -> int:
            return 0

    grids = {}
    for row in slides.select("slide_id", "mpp").iter_rows(named=True):
        geometry = working_geometry(_AnyLevel(), row["mpp"], tiling)  # type: ignore[arg-type]
        grids[row["slide_id"]] = Grid(step=geometry.step)  # tile_origins starts at (0, 0)
    return grids


def read_frames(
    paths: Iterable[str | Path], schema: Mapping[str, pl.DataType] | None = None
) -> pl.DataFrame:
    """Concatenate Parquet files (tile manifests, tile scores); no file gives an empty frame
    with ``schema``'s columns (nothing to check is not a missing column). With ``schema``, each
    file is conformed to it first (`conform_types`): a file with a wrongly typed column has its
    own rows flagged, and cannot turn the column of every other file into text."""
    frames = [pl.read_parquet(p) for p in paths]
    if schema is not None:
        frames = [conform_types(f, dict(schema)) for f in frames]
    if frames:
        return pl.concat(frames, how="diagonal_relaxed")
    return pl.DataFrame(schema=dict(schema or {}))


def slide_scores_frame(scores: Iterable[Any]) -> pl.DataFrame:
    """One row per SlideScore (or mapping with its fields), with the heatmap's shape read
    from the .npy header (memory-mapped: the heatmap itself is not loaded)."""
    rows = []
    for s in scores:
        record = s if isinstance(s, Mapping) else vars(s)
        rows_, cols = _heatmap_shape(record.get("heatmap"))
        rows.append(
            {
                "slide_id": record["slide_id"],
                "tiles": record.get("tiles"),
                "slide_score": _float(record.get("slide_score")),
                "heatmap_downsample": record.get("heatmap_downsample"),
                "heatmap_rows": rows_,
                "heatmap_cols": cols,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "slide_id": pl.String,
            "tiles": pl.Int64,
            "slide_score": pl.Float64,
            "heatmap_downsample": pl.Int64,
            "heatmap_rows": pl.Int64,
            "heatmap_cols": pl.Int64,
        },
    )


def _heatmap_shape(path: str | None) -> tuple[int | None, int | None]:
    if not path:
        return None, None
    from vadflow.tasks.scoring.heatmap import (
        heatmap_file_shape,  # torch: only when there are heatmaps
    )

    try:
        shape = heatmap_file_shape(path)
    except (OSError, ValueError):
        return None, None  # unreadable: the contract's "heatmap file is readable" rule says so
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else (None, None)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
