"""Tissue masks, mask presets and levels, the tile grid, and tiling one slide end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import pyvips
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from vadflow.tasks.site import TilingConfig
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.reader import LevelInfo
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.tiling.grid import (
    coverage,
    finished_tiling,
    tile_origins,
    tile_slide,
    tile_slides,
    working_geometry,
)
from vadflow.tasks.tiling.mask import (
    MASK_PRESETS,
    MaskPreset,
    mask_downsample,
    mask_preset,
    tissue_mask,
)


def _glass(h: int = 64, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (240 + rng.integers(-4, 4, (h, w, 3))).astype(np.uint8)


def test_mask_finds_stained_tissue_and_fills_holes() -> None:
    rgb = _glass()
    rgb[10:50, 10:50] = (200, 110, 170)  # eosin-pink tissue
    rgb[28:32, 28:32] = (238, 238, 238)  # a hole of glass inside it
    rgb[2, 60] = (200, 110, 170)  # a speck
    mask = tissue_mask(rgb)
    assert mask[10:50, 10:50].all()
    assert not mask[2, 60]
    assert mask.sum() == 40 * 40


def test_all_glass_has_no_tissue() -> None:
    assert not tissue_mask(_glass()).any()


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    extent=st.integers(8, 128),
    overlap=st.sampled_from([1.0, 0.5]),
)
def test_grid_covers_every_pixel_without_spill(width, height, extent, overlap) -> None:
    step = max(1, int(extent * overlap))
    xs, ys = tile_origins(width, height, extent, step)
    assert (xs >= 0).all() and (ys >= 0).all()
    assert (xs + extent <= width).all() and (ys + extent <= height).all()
    assert len(set(zip(xs.tolist(), ys.tolist(), strict=True))) == len(xs)
    if width >= extent and height >= extent:
        count = np.zeros((height, width), np.uint8)
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            count[y : y + extent, x : x + extent] += 1
        assert (count >= 1).all()  # every pixel scored, the far strips included
        # Off the grid only where a last column or row ends flush with the edge.
        off = (xs % step != 0) | (ys % step != 0)
        assert ((xs[off] + extent == width) | (ys[off] + extent == height)).all()
        if step == extent:
            cols, rows = -(-width // extent), -(-height // extent)  # ceil
            assert len(xs) == cols * rows
    else:
        assert len(xs) == 0


def test_coverage_is_area_fraction() -> None:
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # top-left quarter at 4 px per cell
    xs, ys = np.array([0, 16, 0]), np.array([0, 0, 8])
    fractions = coverage(mask, xs, ys, extent=16, ds=4)
    np.testing.assert_allclose(fractions, [1.0, 0.0, 0.5])


# --- presets, mask level, grid properties ------------------------------------------------


def test_presets_are_data_and_named_in_errors() -> None:
    assert {"he", "he-faint", "object-dark"} <= set(MASK_PRESETS)
    assert all(isinstance(p, MaskPreset) for p in MASK_PRESETS.values())
    with pytest.raises(ValueError, match="he-faint"):
        mask_preset("h&e")


def test_keep_lumens_preset_leaves_large_holes_open() -> None:
    rgb = _glass(80, 80)
    rgb[5:75, 5:75] = (200, 110, 170)
    rgb[20:60, 20:60] = (238, 238, 238)  # a 40x40 px lumen
    rgb[10:13, 10:13] = (238, 238, 238)  # a 3x3 px hole
    filled = tissue_mask(rgb, MASK_PRESETS["he"], um_per_px=16.0)
    kept = tissue_mask(rgb, MASK_PRESETS["he-keep-lumens"], um_per_px=16.0)
    assert filled[40, 40] and not kept[40, 40]  # 40^2 px * 256 um^2 > 250,000 um^2
    assert kept[11, 11]  # small holes are still filled


def test_object_preset_finds_a_grey_part_on_white() -> None:
    rgb = np.full((60, 60, 3), 235, np.uint8)
    rgb[15:45, 20:50] = 90  # a grey, colourless part: no saturation at all
    assert not tissue_mask(rgb, MASK_PRESETS["he"]).any()
    part = tissue_mask(rgb, MASK_PRESETS["object-dark"])
    assert part[15:45, 20:50].all() and part.sum() == 30 * 30


def _levels(width: int, height: int, n: int) -> list[LevelInfo]:
    return [
        LevelInfo(max(1, width >> i), max(1, height >> i), width / max(1, width >> i))
        for i in range(n)
    ]


def test_mask_level_is_a_pyramid_level_in_range_and_flat_for_huge_slides() -> None:
    # 0.25 um/px: levels at 8 um/px (ds 32) and 16 um/px (ds 64) are both in range.
    assert mask_downsample(_levels(40_000, 30_000, 8), 0.25) == 32
    # 200k x 200k at 8 um/px is 39 Mpx: over the budget, so the 16 um/px level is read.
    assert mask_downsample(_levels(200_000, 200_000, 9), 0.25) == 64
    # A pyramid without a level in range: resampled to the finest in-range resolution.
    assert mask_downsample(_levels(40_000, 30_000, 2), 0.25) == pytest.approx(32)
    # No MPP (industrial): full resolution for small images.
    assert mask_downsample(_levels(900, 900, 1), None) == 1.0


class _StubSlide:
    """What working_geometry needs from a slide: its pyramid."""

    def __init__(self, width: int, height: int) -> None:
        self.levels = _levels(width, height, 6)

    def best_level_for_downsample(self, downsample: float) -> int:
        fits = [i for i, lv in enumerate(self.levels) if lv.downsample <= downsample * 1.01]
        return max(fits, default=0)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(200, 2000),
    height=st.integers(200, 2000),
    mpp0=st.sampled_from([0.23, 0.25, 0.5, 0.9]),
    target_mpp=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    tile_size=st.integers(16, 96),
    overlap=st.sampled_from([1, 2]),
)
def test_grid_covers_tissue_exactly_once_in_bounds(
    width, height, mpp0, target_mpp, tile_size, overlap
) -> None:
    """Every tissue cell lands in a kept tile: exactly one without overlap, away from the flush
    last column and row."""
    tiling = TilingConfig(
        tile_size=tile_size,
        stride=tile_size // overlap if overlap > 1 else None,
        target_mpp=target_mpp,
        min_tissue_fraction=0.0,
    )
    geometry = working_geometry(_StubSlide(width, height), mpp0, tiling)
    xs, ys = tile_origins(width, height, geometry.extent, geometry.step)
    e, step = geometry.extent, geometry.step
    if len(xs) == 0:
        assert width < e or height < e
        return
    assert (xs >= 0).all() and (ys >= 0).all()
    assert (xs + e <= width).all() and (ys + e <= height).all()  # in bounds
    assert xs.max() + e == width and ys.max() + e == height  # the far edges are reached
    x_end, y_end = width, height
    count = np.zeros((height, width), np.uint8)
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        count[y : y + e, x : x + e] += 1
    assert (count >= 1).all()  # no hole anywhere
    assert count.max() <= (math.ceil(e / step) + 1) ** 2  # the flush tiles add one at most
    if overlap == 1:
        # stride == tile size: only the flush last column and row overlap their neighbours.
        assert count[: height - e, : width - e].max() == 1
    rng = np.random.default_rng(width * height)
    ds = 8.0
    mask = rng.random((int(np.ceil(height / ds)), int(np.ceil(width / ds)))) < 0.05
    kept = coverage(mask, xs, ys, e, ds) > 0
    kx, ky = xs[kept], ys[kept]
    for cy, cx in zip(*np.nonzero(mask), strict=True):
        x0, y0 = cx * ds, cy * ds
        if x0 + ds <= x_end and y0 + ds <= y_end:
            inside = int(((kx <= x0) & (x0 < kx + e) & (ky <= y0) & (y0 < ky + e)).sum())
            assert inside >= 1
            if overlap == 1 and x0 + ds <= width - e and y0 + ds <= height - e:
                assert inside == 1


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    ds=st.integers(1, 6),
    extent_cells=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_coverage_equals_brute_force(shape, ds, extent_cells, seed) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.4
    extent = extent_cells * ds
    xs, ys = tile_origins(shape[1] * ds, shape[0] * ds, extent, extent)
    got = coverage(mask, xs, ys, extent, ds)
    for value, x, y in zip(got, xs, ys, strict=True):
        cells = mask[y // ds : y // ds + extent_cells, x // ds : x // ds + extent_cells]
        assert value == pytest.approx(cells.mean())


# --- one slide, end to end -----------------------------------------------------------------


def _slide_file(path: Path, array: np.ndarray, mpp: float | None = 0.25) -> Path:
    image = pyvips.Image.new_from_array(array)
    kwargs = {"xres": 1000 / mpp, "yres": 1000 / mpp} if mpp else {}
    if path.suffix == ".png":
        image.pngsave(str(path))
    else:
        image.tiffsave(
            str(path),
            tile=True,
            pyramid=True,
            compression="jpeg",
            Q=90,
            tile_width=256,
            tile_height=256,
            **kwargs,
        )
    return path


def _row(path: Path, domain: str = "pathology", annotation: str | None = None) -> dict:
    source = SlideSource(path.stem, str(path), "normal", "normal", "train", annotation)
    row = register_slide(source, "site", domain)
    assert row["status"] == "ok", row["reason"]
    return row


def _tissue_slide(path: Path, seed: int = 0, size: int = 4096) -> Path:
    rng = np.random.default_rng(seed)
    array = np.full((size, size, 3), 238, np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, size - 1200, 2)
        array[y : y + 1000, x : x + 1000] = (190, 100, 165)
    return _slide_file(path, array)


def test_all_glass_slide_is_no_tissue_not_an_error(tmp_path: Path) -> None:
    row = _row(_slide_file(tmp_path / "glass.tif", np.full((2048, 2048, 3), 236, np.uint8)))
    result = tile_slide(row, TilingConfig(), "pathology", tmp_path / "tiles", tmp_path / "masks")
    assert (result.status, result.tiles) == ("no_tissue", 0)
    assert pl.read_parquet(result.manifest).height == 0
    assert Path(result.mask_png).exists()


def test_no_tissue_reason_says_what_the_mask_found_and_what_to_change(tmp_path: Path) -> None:
    tinted = np.full((2048, 2048, 3), (236, 232, 238), np.uint8)  # glass with a colour cast
    glass = _row(_slide_file(tmp_path / "glass.tif", tinted))
    result = tile_slide(glass, TilingConfig(), "pathology", tmp_path / "t1", tmp_path / "m1")
    assert "found no tissue" in result.reason and "min_object_um2" in result.reason
    # A thin strip of tissue: masked, but no tile is mostly tissue.
    array = tinted.copy()
    array[1000:1080, :] = (190, 100, 165)
    strip = _row(_slide_file(tmp_path / "strip.tif", array))
    tiling = TilingConfig(min_tissue_fraction=0.9, min_object_um2=0)
    result = tile_slide(strip, tiling, "pathology", tmp_path / "t2", tmp_path / "m2")
    assert result.status == "no_tissue"
    assert "the best tile is" in result.reason and "min_tissue_fraction=0.9" in result.reason
    marker = json.loads((tmp_path / "t2" / "strip.done.json").read_text())
    assert marker["reason"] == result.reason


def test_tiles_carry_lesion_fraction_from_asap_xml(tmp_path: Path) -> None:
    from vadflow.tasks.slides.annotations import write_asap_xml

    path = _slide_file(tmp_path / "t.tif", np.full((2048, 2048, 3), (190, 100, 165), np.uint8))
    square = np.array([[0, 0], [1024, 0], [1024, 1024], [0, 1024]], float)
    xml = write_asap_xml(tmp_path / "t.xml", [square])
    row = _row(path, annotation=str(xml))
    result = tile_slide(row, TilingConfig(), "pathology", tmp_path / "tiles", tmp_path / "masks")
    tiles = pl.read_parquet(result.manifest)
    assert tiles.height == 16 * 16  # 128-px tiles (64 px at 0.5 um/px) on a 2048-px slide
    inside = tiles.filter((pl.col("x") < 1024) & (pl.col("y") < 1024))
    assert (inside["label_fraction"] == 1.0).all()
    assert tiles.filter(pl.col("x") >= 1024)["label_fraction"].max() == 0.0


def test_industrial_whole_image_or_foreground(tmp_path: Path) -> None:
    array = np.full((256, 256, 3), 235, np.uint8)
    array[64:192, 64:192] = 80  # a dark part in the middle
    row = _row(_slide_file(tmp_path / "part.png", array, mpp=None), "industrial")
    whole = TilingConfig(tile_size=32, target_mpp=None, foreground_mask=False)
    fg = TilingConfig(tile_size=32, target_mpp=None, foreground_mask=True)
    n_whole = tile_slide(row, whole, "industrial", tmp_path / "a", tmp_path / "ma").tiles
    n_fg = tile_slide(row, fg, "industrial", tmp_path / "b", tmp_path / "mb").tiles
    assert (n_whole, n_fg) == (64, 16)


def test_manifest_is_deterministic_and_unchanged_slides_are_skipped(tmp_path: Path) -> None:
    row = _row(_tissue_slide(tmp_path / "s.tif"))
    tiling = TilingConfig()
    a = tile_slides([row], tiling, "pathology", tmp_path / "a", tmp_path / "ma")[0]
    b = tile_slides([row], tiling, "pathology", tmp_path / "b", tmp_path / "mb")[0]
    assert a.tiles > 0
    assert_frame_equal(pl.read_parquet(a.manifest), pl.read_parquet(b.manifest))
    assert pl.read_parquet(a.manifest)["tile_id"][0].startswith("s:")
    marker = tmp_path / "a" / "s.done.json"
    before = marker.stat().st_mtime_ns
    again = tile_slides([row], tiling, "pathology", tmp_path / "a", tmp_path / "ma")[0]
    assert again == a and marker.stat().st_mtime_ns == before  # not re-tiled
    # A changed setting or a changed slide (hash) means tiling again.
    changed = TilingConfig(min_tissue_fraction=0.9)
    assert finished_tiling(row, changed, tmp_path / "a") is None
    assert finished_tiling({**row, "sha256": "0" * 64}, tiling, tmp_path / "a") is None
    tile_slides([row], changed, "pathology", tmp_path / "a", tmp_path / "ma")
    assert marker.stat().st_mtime_ns != before


def test_half_written_slide_is_redone(tmp_path: Path) -> None:
    """A kill between the manifest and the marker: no marker, so the slide is tiled again."""
    row = _row(_tissue_slide(tmp_path / "s.tif"))
    tiling = TilingConfig()
    good = tile_slides([row], tiling, "pathology", tmp_path / "ref", tmp_path / "m")[0]
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "s.parquet").write_bytes(b"PAR1 half a file")
    (tiles / ".s.parquet.123.tmp").write_bytes(b"left by a killed writer")
    assert finished_tiling(row, tiling, tiles) is None
    redone = tile_slides([row], tiling, "pathology", tiles, tmp_path / "m")[0]
    assert_frame_equal(pl.read_parquet(redone.manifest), pl.read_parquet(good.manifest))


def test_a_failing_slide_does_not_stop_the_batch(tmp_path: Path) -> None:
    good = _row(_tissue_slide(tmp_path / "s.tif"))
    gone = {**good, "slide_id": "gone", "uri": str(tmp_path / "gone.tif")}
    results = tile_slides([gone, good], TilingConfig(), "pathology", tmp_path / "t", tmp_path / "m")
    assert [r.status for r in results] == ["failed", "ok"]
    assert "gone" in results[0].reason
