"""Tissue-percentage overlay: a slide thumbnail with its tile grid coloured by tissue fraction.

What a pathologist opens to check that tiling found the tissue: green tiles are (nearly) all
tissue (>= 90 %), red ones (nearly) none (<= 10 %), yellow ones partly. Every tile of the grid
is drawn, kept or not, so tissue showing through a red tile is tissue the mask missed, and a
green tile over glass is glass the mask took for tissue. Colours are blended over the
thumbnail, so the tissue stays visible; tile borders are drawn where a tile is large enough on
the thumbnail to show them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FULL = 0.9  # tissue fraction from which a tile is green
EMPTY = 0.1  # ... up to which it is red; yellow between
RED, YELLOW, GREEN = 0, 1, 2
COLOURS = np.array([[230, 20, 20], [255, 215, 0], [0, 200, 0]], dtype=np.float32)  # by class
ALPHA = 0.5  # weight of the tile colour over the thumbnail: green still reads as green on eosin
BORDER_SHADE = 0.6  # a border pixel takes this share of its tile's colour (darker)
MIN_CELL_PX = 8  # aim for tiles at least this wide on the thumbnail ...
MAX_SIDE_PX = 4096  # ... unless that makes the thumbnail longer than this
MIN_BORDER_PX = 6  # narrower tiles get no border: it would hide the colour
QC_COLOUR = np.array([200, 0, 200], dtype=np.float32)  # magenta: no tissue class uses it
QC_ALPHA = 0.6  # QC'd areas read through the tile colours
OVERLAY_DIR = "tile-tissue"  # under the site's masks folder: masks/tile-tissue/<slide>.png


def tissue_classes(fractions: np.ndarray) -> np.ndarray:
    """RED (<= 10 % tissue), YELLOW (between) or GREEN (>= 90 %) per tile, as int8."""
    fractions = np.asarray(fractions, dtype=np.float64)
    classes = np.full(fractions.shape, YELLOW, dtype=np.int8)
    classes[fractions <= EMPTY] = RED
    classes[fractions >= FULL] = GREEN
    return classes


def overlay_downsample(width: int, height: int, extent: int) -> float:
    """Level-0 px per thumbnail px: tiles MIN_CELL_PX wide where the size cap allows."""
    return max(1.0, extent / MIN_CELL_PX, max(width, height) / MAX_SIDE_PX)


def draw_tissue_overlay(
    thumb: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    extent: int,
    step: int,
    fractions: np.ndarray,
    downsample: float,
) -> np.ndarray:
    """Colour every grid tile (level-0 corners `xs`, `ys`) on `thumb` (H, W, 3) uint8, a
    thumbnail at `downsample` level-0 px per pixel; returns a new (H, W, 3) uint8 image.

    Each tile paints the part of the grid it starts, `min(step, extent)` level-0 px square, so
    overlapping tiles (stride < tile) do not paint over each other.
    """
    height, width = thumb.shape[:2]
    out = thumb.astype(np.float32)
    if len(xs) == 0:
        return thumb.copy()
    cell = min(step, extent)
    col_origins, cols = np.unique(np.asarray(xs), return_inverse=True)
    row_origins, rows = np.unique(np.asarray(ys), return_inverse=True)
    grid = np.full((len(row_origins), len(col_origins)), -1, dtype=np.int8)  # -1: no tile
    grid[rows, cols] = tissue_classes(fractions)

    def cell_of(origins: np.ndarray, n_px: int) -> tuple[np.ndarray, np.ndarray]:
        """Per thumbnail pixel along one axis: its grid index (-1 outside) and border flag."""
        centre = (np.arange(n_px) + 0.5) * downsample  # level-0 coordinate of each px centre
        index = np.searchsorted(origins, centre, side="right") - 1
        inside = (index >= 0) & (centre < origins[np.maximum(index, 0)] + cell)
        index = np.where(inside, index, -1)
        first = np.r_[True, index[1:] != index[:-1]]  # the first pixel of each tile
        return index, first & inside

    col_index, col_border = cell_of(col_origins, width)
    row_index, row_border = cell_of(row_origins, height)
    painted = (row_index[:, None] >= 0) & (col_index[None, :] >= 0)  # (H, W)
    looked_up = grid[np.maximum(row_index, 0)[:, None], np.maximum(col_index, 0)[None, :]]
    classes = np.where(painted, looked_up, -1)  # (H, W): a class, or -1 where no tile is
    tiled = classes >= 0
    colour = COLOURS[np.maximum(classes, 0)]  # (H, W, 3)
    if cell / downsample >= MIN_BORDER_PX:
        border = tiled & (row_border[:, None] | col_border[None, :])
        colour[border] *= BORDER_SHADE
        # A border is drawn opaque so the grid reads as a grid.
        out[border] = colour[border]
        tiled &= ~border
    out[tiled] = (1.0 - ALPHA) * out[tiled] + ALPHA * colour[tiled]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_qc(image: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """`image` (H, W, 3) uint8 with the artefact QC mask `flagged` (H, W) bool in magenta, so a
    person sees which tissue the detectors' slide scores leave out."""
    out = image.astype(np.float32)
    out[flagged] = (1.0 - QC_ALPHA) * out[flagged] + QC_ALPHA * QC_COLOUR
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8, (H, W) uint8 (a label image) or (H, W) bool (a 1-bit mask) -> PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
