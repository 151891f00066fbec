"""Stitching tile maps into a slide heatmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vadflow.tasks.scoring.heatmap import (
    HeatmapAccumulator,
    HeatmapGeometry,
    HeatmapStrips,
    heatmap_shape,
    read_heatmap_tiff,
    write_heatmap_tiff,
)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(64, 600),
    height=st.integers(64, 600),
    value=st.floats(0.0, 10.0),
    step_frac=st.sampled_from([1.0, 0.5]),
)
def test_constant_maps_stitch_to_a_constant_heatmap(width, height, value, step_frac) -> None:
    extent, ds = 64, 8
    step = int(extent * step_frac)
    acc = HeatmapAccumulator(width, height, ds)
    for y in range(0, height - extent + 1, step):
        for x in range(0, width - extent + 1, step):
            acc.add(x, y, extent, torch.full((1, 16, 16), value))
    heat = acc.heatmap()
    assert heat.shape == heatmap_shape(width, height, ds)
    covered = np.isfinite(heat)
    assert covered.any()
    np.testing.assert_allclose(heat[covered], value, rtol=1e-5, atol=1e-6)


def test_overlap_is_averaged_and_position_kept() -> None:
    acc = HeatmapAccumulator(128, 64, 8)
    acc.add(0, 0, 64, torch.zeros(1, 8, 8))
    acc.add(32, 0, 64, torch.ones(1, 8, 8) * 2)
    heat = acc.heatmap()
    np.testing.assert_allclose(heat[:, :4], 0)
    np.testing.assert_allclose(heat[:, 4:8], 1)  # mean of 0 and 2
    np.testing.assert_allclose(heat[:, 8:12], 2)
    assert np.isnan(heat[:, 12:]).all()


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(64, 900),
    height=st.integers(64, 900),
    band=st.integers(1, 40),
    skip=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_strips_stack_into_the_whole_heatmap(width, height, band, skip, seed) -> None:
    """Tiles in grid order with a gap of skipped rows (glass): the strips HeatmapStrips hands
    out, stacked, are exactly the whole-array accumulator's heatmap, whatever its band."""
    extent, ds, step = 64, 8, 32
    rng = np.random.default_rng(seed)
    whole = HeatmapAccumulator(width, height, ds)
    stream = HeatmapStrips(width, height, ds, band_rows=band)
    strips = []
    for i, y in enumerate(range(0, height - extent + 1, step)):
        if skip and i % 6 < skip:
            continue
        for x in range(0, width - extent + 1, step):
            tile_map = torch.from_numpy(rng.random((1, 8, 8), dtype=np.float32))
            whole.add(x, y, extent, tile_map)
            strips += stream.add(x, y, extent, tile_map)
    strips += stream.close()
    assert all(s.dtype == np.float32 and s.shape[1] == whole.total.shape[1] for s in strips)
    np.testing.assert_array_equal(np.concatenate(strips), whole.heatmap())


def test_strips_refuse_a_tile_above_rows_already_handed_out() -> None:
    stream = HeatmapStrips(640, 640, 8, band_rows=4)
    assert stream.add(0, 320, 64, torch.zeros(1, 8, 8))  # rows 0-39 are final now
    with pytest.raises(ValueError, match="order of y"):
        stream.add(0, 0, 64, torch.zeros(1, 8, 8))


def test_heatmap_tiff_from_strips_equals_one_from_the_array(tmp_path) -> None:
    geometry = HeatmapGeometry("s1", 8, 8 * 700 - 3, 8 * 300 - 5, 0.25)
    rng = np.random.default_rng(0)
    heat = rng.random(geometry.shape, dtype=np.float32)
    heat[rng.random(heat.shape) < 0.3] = np.nan
    cuts = np.cumsum(rng.integers(1, 90, size=40))
    strips = np.split(heat, cuts[cuts < len(heat)])
    whole = write_heatmap_tiff(tmp_path / "whole.tif", heat, geometry, tile=128)
    streamed = write_heatmap_tiff(tmp_path / "streamed.tif", iter(strips), geometry, tile=128)
    level = 0
    while True:
        try:
            expected, g1 = read_heatmap_tiff(whole, level)
        except ValueError:
            break
        got, g2 = read_heatmap_tiff(streamed, level)
        np.testing.assert_array_equal(got, expected)
        assert g1 == g2
        level += 1
    assert level == 4  # 300 x 700 at tile 128: levels 0-3
    np.testing.assert_array_equal(read_heatmap_tiff(streamed)[0], heat)


def test_heatmap_tiff_from_too_few_strips_fails_and_leaves_no_file(tmp_path) -> None:
    geometry = HeatmapGeometry("s1", 8, 800, 800, None)
    heat = np.zeros(geometry.shape, dtype=np.float32)
    with pytest.raises(ValueError, match="s1: heatmap strips gave 60 rows"):
        write_heatmap_tiff(tmp_path / "s1.tif", iter([heat[:60]]), geometry, tile=32)
    assert list(tmp_path.iterdir()) == []
