"""Score a slide's tiles in batches and stitch their anomaly maps into a slide heatmap.

Memory is bounded by one batch of tiles plus the heatmap itself (a slide at
1/`heatmap_downsample` scale), never the slide. Overlapping tiles are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from tasks.manifests import write_parquet_atomic
from tasks.slides.reader import Slide
from tasks.slides.tiles import iter_tile_batches


@dataclass(frozen=True)
class SlideScore:
    """Where a slide's scores went, and its slide-level score (max of the heatmap)."""

    slide_id: str
    tiles: int
    slide_score: float
    heatmap: str  # .npy, float32, NaN where no tile was scored
    tile_scores: str  # .parquet: tile_id, score
    heatmap_downsample: int


def heatmap_shape(width: int, height: int, downsample: int) -> tuple[int, int]:
    return math.ceil(height / downsample), math.ceil(width / downsample)


class HeatmapAccumulator:
    """Running sum and count of anomaly values per heatmap cell; the mean is the heatmap."""

    def __init__(self, width: int, height: int, downsample: int) -> None:
        self.downsample = downsample
        self.total = np.zeros(heatmap_shape(width, height, downsample), dtype=np.float64)
        self.count = np.zeros_like(self.total)

    def add(self, x: int, y: int, extent: int, anomaly_map: torch.Tensor) -> None:
        """Paste one tile's (1, H, W) map over its level-0 footprint, resized by area."""
        ds = self.downsample
        rows, cols = self.total.shape
        x0, y0 = int(x // ds), int(y // ds)
        x1 = min(cols, max(x0 + 1, round((x + extent) / ds)))
        y1 = min(rows, max(y0 + 1, round((y + extent) / ds)))
        if x0 >= cols or y0 >= rows:
            return
        cell = F.adaptive_avg_pool2d(anomaly_map[None].float(), (y1 - y0, x1 - x0))[0, 0]
        self.total[y0:y1, x0:x1] += cell.numpy()
        self.count[y0:y1, x0:x1] += 1

    def heatmap(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.total / self.count
        out[self.count == 0] = np.nan
        return out.astype(np.float32)


def score_slide(
    detector,
    slide_row: dict,
    tiles: pl.DataFrame,
    out_dir: Path,
    heatmap_downsample: int,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SlideScore:
    """Score every tile of one slide; write its tile scores and heatmap under `out_dir`.

    `transform` maps a (B, H, W, 3) uint8 batch before scoring (e.g. stain normalisation).
    """
    slide_id = slide_row["slide_id"]
    slide = Slide(slide_row["uri"])
    accumulator = HeatmapAccumulator(slide.width, slide.height, heatmap_downsample)
    tile_ids: list[str] = []
    scores: list[float] = []
    for rows, pixels in iter_tile_batches(slide, tiles, batch_size):
        if transform is not None:
            pixels = transform(pixels)
        output = detector.score(pixels)  # anomaly_map (B, 1, H, W), tile_score (B,)
        for row, anomaly_map in zip(rows.iter_rows(named=True), output.anomaly_map, strict=True):
            accumulator.add(row["x"], row["y"], row["extent"], anomaly_map)
        tile_ids.extend(rows["tile_id"].to_list())
        scores.extend(output.tile_score.tolist())
        if on_batch is not None:
            on_batch(rows.height)
    heatmap = accumulator.heatmap()
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmap_path = out_dir / f"{slide_id}.heatmap.npy"
    np.save(heatmap_path, heatmap)
    scores_path = write_parquet_atomic(
        pl.DataFrame(
            {"slide_id": slide_id, "tile_id": tile_ids, "score": scores},
            schema={"slide_id": pl.String, "tile_id": pl.String, "score": pl.Float64},
        ),
        out_dir / f"{slide_id}.tiles.parquet",
    )
    finite = heatmap[np.isfinite(heatmap)]
    return SlideScore(
        slide_id=slide_id,
        tiles=len(scores),
        slide_score=float(finite.max()) if finite.size else float("nan"),
        heatmap=str(heatmap_path),
        tile_scores=str(scores_path),
        heatmap_downsample=heatmap_downsample,
    )
