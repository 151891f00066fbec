"""The prefetching tile loader hands out what the serial loop does, bounded and fail-safe."""

from __future__ import annotations

import threading
import time

import numpy as np
import polars as pl
import pytest
import pyvips

from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.slides.tiles import iter_tile_batches


@pytest.fixture(scope="module")
def slide_and_tiles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Slide, pl.DataFrame]:
    path = tmp_path_factory.mktemp("loader") / "slide.tif"
    rng = np.random.default_rng(3)
    array = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
    pyvips.Image.new_from_array(array).tiffsave(
        str(path), tile=True, pyramid=True, compression="jpeg"
    )
    xs, ys = np.meshgrid(np.arange(0, 320, 32), np.arange(0, 256, 32))
    tiles = pl.DataFrame(
        {
            "tile_id": [f"t{i}" for i in range(xs.size)],
            "x": xs.ravel(),
            "y": ys.ravel(),
            "extent": 32,
            "level": 0,
            "size": 32,
        }
    )
    return Slide(str(path)), tiles


def _collect(batches) -> tuple[list[list[str]], np.ndarray]:
    ids, pixels = [], []
    for rows, batch in batches:
        ids.append(rows["tile_id"].to_list())
        pixels.append(batch)
    return ids, np.concatenate(pixels)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetched_batches_equal_the_serial_loop(slide_and_tiles, prefetch: int) -> None:
    slide, tiles = slide_and_tiles
    serial_ids, serial = _collect(iter_tile_batches(slide, tiles, 7, prefetch=0))
    ids, pixels = _collect(iter_tile_batches(slide, tiles, 7, prefetch=prefetch))
    assert ids == serial_ids and len(ids) == -(-tiles.height // 7)
    np.testing.assert_array_equal(pixels, serial)


def test_transform_runs_in_the_loader(slide_and_tiles) -> None:
    slide, tiles = slide_and_tiles
    threads = set()

    def invert(batch: np.ndarray) -> np.ndarray:
        threads.add(threading.current_thread().name)
        return 255 - batch

    _, plain = _collect(iter_tile_batches(slide, tiles, 16, prefetch=0))
    _, inverted = _collect(iter_tile_batches(slide, tiles, 16, prefetch=2, transform=invert))
    np.testing.assert_array_equal(inverted, 255 - plain)
    assert threads and all(name.startswith("tile-loader") for name in threads)


def test_the_loader_stays_a_bounded_number_of_batches_ahead(slide_and_tiles) -> None:
    """A slow consumer: the loader decodes at most `prefetch` batches past the one handed out
    (plus the one it holds waiting for room)."""
    slide, tiles = slide_and_tiles
    loaded = []

    def count(batch: np.ndarray) -> np.ndarray:
        loaded.append(len(batch))
        return batch

    handed = 0
    for _ in iter_tile_batches(slide, tiles, 4, prefetch=2, transform=count):
        handed += 1
        time.sleep(0.05)  # a slow model: the loader fills the queue and waits
        assert len(loaded) <= handed + 2 + 1
    assert handed == len(loaded) == -(-tiles.height // 4)


def test_a_loader_error_is_raised_at_its_batch_and_closing_early_stops_it(
    slide_and_tiles,
) -> None:
    slide, tiles = slide_and_tiles
    calls = []

    def fail_third(batch: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("tile decode failed")
        return batch

    got = []
    with pytest.raises(OSError, match="tile decode failed"):
        for rows, _ in iter_tile_batches(slide, tiles, 8, prefetch=2, transform=fail_third):
            got.append(rows.height)
    assert got == [8, 8]
    before = threading.active_count()
    batches = iter_tile_batches(slide, tiles, 4, prefetch=2)
    next(batches)
    batches.close()  # the consumer stops after one batch: the loader thread ends too
    assert threading.active_count() <= before
    assert not any(t.name.startswith("tile-loader") for t in threading.enumerate())
