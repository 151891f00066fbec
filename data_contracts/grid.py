"""The tiling grid a tile manifest is checked against (kept free of great-expectations, so
callers can build grids without importing it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Grid:
    """A slide's tiling grid in level-0 px: tiles start at (origin_x + i * step,
    origin_y + j * step)."""

    step: int
    origin_x: int = 0
    origin_y: int = 0

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"grid step must be a positive number of pixels, not {self.step}")


Grids = Grid | Mapping[str, Grid]  # one grid for every slide, or one per slide_id
