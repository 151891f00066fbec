"""Size bombs are quarantined at registration, from the header alone, in milliseconds."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import pyvips
from hypothesis import given, settings
from hypothesis import strategies as st

from vadflow.tasks.site import LimitsConfig, TilingConfig
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.register import grid_count, register_slide, run_tile_budget_problem
from vadflow.tasks.tiling.grid import grid_starts


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header says `width` x `height` (RGB, 8 bit) with one row of data: the
    shape of a decompression bomb, in a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    first_row = zlib.compress(b"\x00" + b"\x00" * (3 * width), 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", first_row)
        + chunk(b"IEND", b"")
    )  # fmt: skip
    return path


def _source(path: Path, label: str = "normal") -> SlideSource:
    return SlideSource(path.stem, str(path), label, "good", "test", None)


def test_a_png_declaring_40000_pixels_square_is_quarantined_before_decoding(
    tmp_path: Path,
) -> None:
    bomb = png_declaring(tmp_path / "bomb.png", 40_000, 40_000)
    assert bomb.stat().st_size < 200_000
    tiling = TilingConfig(tile_size=32, stride=16, target_mpp=None)
    started = time.monotonic()
    row = register_slide(_source(bomb), "line", "industrial", tiling=tiling, limits=LimitsConfig())
    assert time.monotonic() - started < 2.0
    assert row["status"] == "quarantined"
    assert "40,000 x 40,000 px (1,600 megapixels)" in row["reason"]
    assert "limits.max_mask_megapixels" in row["reason"] and "bomb.png" in row["reason"]


def test_too_many_tiles_is_quarantined_with_the_figures(tmp_path: Path) -> None:
    image = tmp_path / "wide.png"
    pyvips.Image.new_from_array(np.full((64, 4096, 3), 200, np.uint8)).pngsave(str(image))
    tiling = TilingConfig(tile_size=16, target_mpp=None)
    limits = LimitsConfig(max_tiles_per_slide=500)
    row = register_slide(_source(image), "line", "industrial", tiling=tiling, limits=limits)
    assert row["status"] == "quarantined"
    assert "4,096 x 64 px makes 1,024 tiles of 16 px every 16 px" in row["reason"]
    fits = LimitsConfig(max_tiles_per_slide=1024)
    row = register_slide(_source(image), "line", "industrial", tiling=tiling, limits=fits)
    assert row["status"] == "ok"


def test_a_run_past_its_tile_budget_stops_naming_the_largest_slides() -> None:
    tiling = TilingConfig(tile_size=64, target_mpp=0.5)
    rows = [
        {"slide_id": f"s{i}", "width": 64_000 * (i + 1), "height": 64_000, "mpp": 0.25}
        for i in range(4)
    ]  # s0: 500 x 500 = 250,000 positions of 128 px, s3: 2,000 x 500
    assert run_tile_budget_problem(rows, tiling, LimitsConfig()) is None
    problem = run_tile_budget_problem(rows, tiling, LimitsConfig(max_tiles_per_run=2_000_000))
    assert problem is not None
    assert "the 4 slides to tile hold 2,500,000 tile positions" in problem
    assert "largest: s3 (1,000,000), s2 (750,000), s1 (500,000)" in problem


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 5000), extent=st.integers(1, 300), step=st.integers(1, 300))
def test_the_tile_count_is_the_grid_the_tiler_cuts(length: int, extent: int, step: int) -> None:
    assert grid_count(length, extent, step) == len(grid_starts(length, extent, step))


@pytest.mark.parametrize("mpp", [0.243, 0.25])
def test_a_whole_camelyon16_slide_fits_the_default_limits(mpp: float) -> None:
    """The largest Camelyon16 slides (about 100,000 x 220,000 px) at the default tiling."""
    from vadflow.tasks.slides.register import tile_count_problem

    row = {"width": 100_000, "height": 220_000, "mpp": mpp}
    assert tile_count_problem(row, TilingConfig(), LimitsConfig()) is None
