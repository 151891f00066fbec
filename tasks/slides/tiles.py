"""Read tile pixels named by a tile manifest, for training and scoring."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from tasks.slides.reader import Slide


def iter_tile_batches(
    slide: Slide, tiles: pl.DataFrame, batch_size: int
) -> Iterator[tuple[pl.DataFrame, np.ndarray]]:
    """Yield (rows, pixels (B, H, W, 3) uint8) for consecutive batches of one slide's tiles."""
    for start in range(0, tiles.height, batch_size):
        rows = tiles.slice(start, batch_size)
        pixels = np.stack(
            [
                slide.read_tile(r["x"], r["y"], r["extent"], r["level"], r["size"])
                for r in rows.iter_rows(named=True)
            ]
        )
        yield rows, pixels


def sample_tiles(tiles: pl.DataFrame, limit: int, seed: int) -> pl.DataFrame:
    """At most `limit` tiles, drawn without replacement, in a reproducible order."""
    if tiles.height <= limit:
        return tiles.sort("tile_id")
    return tiles.sort("tile_id").sample(n=limit, seed=seed, shuffle=True)


def load_tiles(tiles: pl.DataFrame, uri_by_slide: dict[str, str]) -> np.ndarray:
    """All pixels of the given tiles, (N, H, W, 3) uint8: a training cache, so keep N bounded."""
    if tiles.height == 0:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    out = np.empty((tiles.height, tiles["size"][0], tiles["size"][0], 3), dtype=np.uint8)
    index = 0
    for slide_id, group in tiles.group_by("slide_id", maintain_order=True):
        slide = Slide(uri_by_slide[slide_id[0]])
        for _, pixels in iter_tile_batches(slide, group, 256):
            out[index : index + len(pixels)] = pixels
            index += len(pixels)
    return out
