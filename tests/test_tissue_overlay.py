"""The tissue-percentage overlay: every grid tile coloured by its tissue fraction (green >= 90 %,
yellow between, red <= 10 %) over the slide thumbnail, written by the tiling stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import pyvips
from PIL import Image

from vadflow.tasks.site import TilingConfig
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.tiling.grid import finished_tiling, tile_origins, tile_slide
from vadflow.tasks.tiling.overlay import (
    ALPHA,
    COLOURS,
    GREEN,
    OVERLAY_DIR,
    RED,
    YELLOW,
    draw_tissue_overlay,
    tissue_classes,
)

GREY = 200


def _blend(thumb_rgb: np.ndarray, cls: int) -> np.ndarray:
    return np.rint((1 - ALPHA) * thumb_rgb.astype(np.float32) + ALPHA * COLOURS[cls])


def test_classes_at_the_thresholds() -> None:
    fractions = np.array([0.0, 0.1, 0.1001, 0.5, 0.8999, 0.9, 1.0])
    assert tissue_classes(fractions).tolist() == [RED, RED, YELLOW, YELLOW, YELLOW, GREEN, GREEN]


def test_known_tiles_get_their_colours_and_missing_tiles_none() -> None:
    thumb = np.full((40, 40, 3), GREY, np.uint8)
    xs, ys = tile_origins(40, 40, 10, 10)  # a 4 x 4 grid of 10 px tiles, row-major
    fractions = np.linspace(0, 1, 16)
    keep = np.arange(16) != 5  # tile (row 1, col 1) is not on the grid: left as it is
    out = draw_tissue_overlay(thumb, xs[keep], ys[keep], 10, 10, fractions[keep], downsample=1.0)
    classes = tissue_classes(fractions)
    for k in range(16):
        row, col = divmod(k, 4)
        centre = out[row * 10 + 5, col * 10 + 5]
        if k == 5:
            assert (centre == GREY).all()
            continue
        assert np.abs(centre - _blend(thumb[0, 0], classes[k])).max() <= 1
        # The tile's first row and column are its border: darker than its inside.
        assert out[row * 10, col * 10 + 5].sum() < centre.sum()
    assert {RED, YELLOW, GREEN} <= set(classes.tolist())


def test_overlapping_tiles_each_paint_their_own_step() -> None:
    thumb = np.full((30, 30, 3), GREY, np.uint8)
    xs, ys = tile_origins(30, 30, 20, 10)  # 20 px tiles every 10 px: a 2 x 2 grid
    fractions = np.array([1.0, 0.0, 0.5, 1.0])
    out = draw_tissue_overlay(thumb, xs, ys, 20, 10, fractions, downsample=1.0)
    centres = [(5, 5), (5, 15), (15, 5), (15, 15)]
    for (y, x), cls in zip(centres, tissue_classes(fractions), strict=True):
        assert np.abs(out[y, x] - _blend(thumb[0, 0], cls)).max() <= 1
    assert (out[25, 25] == GREY).all()  # beyond the last tile's step: no tile starts there


def _slide(path: Path) -> Path:
    array = np.full((2048, 2048, 3), 238, np.uint8)
    array[512:1600, 384:1344] = (190, 100, 165)  # tissue; its right and lower edges cut tiles
    image = pyvips.Image.new_from_array(array)
    image.tiffsave(
        str(path),
        tile=True,
        pyramid=True,
        compression="jpeg",
        Q=90,
        tile_width=256,
        tile_height=256,
        xres=1000 / 0.25,
        yres=1000 / 0.25,
    )
    return path


def test_tiling_writes_the_overlay_beside_the_masks(tmp_path: Path) -> None:
    path = _slide(tmp_path / "s.tif")
    source = SlideSource("s", str(path), "normal", "normal", "train", None)
    row = register_slide(source, "site", "pathology")
    tiling = TilingConfig(min_tissue_fraction=0.0)  # every grid tile in the manifest
    result = tile_slide(row, tiling, "pathology", tmp_path / "tiles", tmp_path / "masks")
    assert Path(result.overlay_png) == tmp_path / "masks" / OVERLAY_DIR / "s.png"
    assert finished_tiling(row, tiling, tmp_path / "tiles").overlay_png == result.overlay_png

    overlay = np.asarray(Image.open(result.overlay_png).convert("RGB"))
    # 128 level-0 px tiles (64 px at 0.5 um/px on a 0.25 um/px slide) drawn 8 px wide.
    assert overlay.shape == (128, 128, 3)
    with Slide(str(path)) as slide:
        thumb = slide.thumbnail(16.0)
    tiles = pl.read_parquet(result.manifest)
    assert tiles.height == 16 * 16
    classes = tissue_classes(tiles["tissue_fraction"].to_numpy())
    assert {RED, YELLOW, GREEN} == set(classes.tolist())  # tissue, glass and its edges
    for x, y, cls in zip(tiles["x"], tiles["y"], classes, strict=True):
        cy, cx = (y + 64) // 16, (x + 64) // 16
        assert np.abs(overlay[cy, cx] - _blend(thumb[cy, cx], cls)).max() <= 1, (x, y, cls)
    # The middle of the tissue is green and a glass corner is red, on the image itself.
    r, g, b = overlay[1000 // 16, 800 // 16].astype(int)
    assert g > r + 30 and g > b + 30
    r, g, b = overlay[4, 4].astype(int)  # top-left glass tile, inside its border
    assert r > g + 60 and r > b + 60


@pytest.mark.parametrize("downsample", [1.0, 2.5])
def test_overlay_is_the_thumbnails_size(downsample: float) -> None:
    thumb = np.full((37, 53, 3), GREY, np.uint8)
    xs, ys = tile_origins(int(53 * downsample), int(37 * downsample), 16, 16)
    out = draw_tissue_overlay(thumb, xs, ys, 16, 16, np.ones(len(xs)), downsample)
    assert out.shape == thumb.shape and out.dtype == np.uint8
