"""Tissue masks and the tile grid, on small arrays."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.tiling.grid import coverage, tile_origins
from tasks.tiling.mask import tissue_mask


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
def test_grid_covers_without_overlap_or_spill(width, height, extent, overlap) -> None:
    step = max(1, int(extent * overlap))
    xs, ys = tile_origins(width, height, extent, step)
    assert (xs >= 0).all() and (ys >= 0).all()
    assert (xs + extent <= width).all() and (ys + extent <= height).all()
    assert len(set(zip(xs.tolist(), ys.tolist(), strict=True))) == len(xs)
    if width >= extent and height >= extent:
        # Every pixel not covered lies in the strip narrower than one step at the far edges.
        assert xs.max() + extent > width - step and ys.max() + extent > height - step
        if step == extent:
            assert len(xs) == (width // extent) * (height // extent)
    else:
        assert len(xs) == 0


def test_coverage_is_area_fraction() -> None:
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # top-left quarter at 4 px per cell
    xs, ys = np.array([0, 16, 0]), np.array([0, 0, 8])
    fractions = coverage(mask, xs, ys, extent=16, ds=4)
    np.testing.assert_allclose(fractions, [1.0, 0.0, 0.5])
