"""Stitching tile maps into a slide heatmap."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vadflow.tasks.scoring.heatmap import HeatmapAccumulator, heatmap_shape


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
