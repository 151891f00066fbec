"""Slide aggregation: Wang et al. heatmap features, the cross-validated forest, regions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vadflow.tasks.evaluation.metrics import image_auroc
from vadflow.tasks.scoring.aggregate import (
    cross_validated_forest,
    feature_table,
    heatmap_max,
    heatmap_regions,
    normalise_heatmap,
    slide_features,
)


def test_slide_features_hand_computed() -> None:
    hm = np.full((10, 10), 0.1)
    hm[:, 8:] = np.nan  # glass: not tissue
    hm[2:5, 2:5] = 0.8  # a 3x3 square above 0.5
    hm[3, 3] = 1.0
    hm[7, 1] = 0.6  # a single pixel above 0.5
    f = slide_features(hm, thresholds=(0.5, 0.9))
    assert (f["max"], f["q99"] <= 1.0) == (1.0, True)
    assert f["area_t0.5"] == 10 and f["n_regions_t0.5"] == 2
    assert f["tissue_fraction_t0.5"] == pytest.approx(10 / 80)
    assert f["largest_area_t0.5"] == 9 and f["largest_extent_t0.5"] == 1.0
    assert f["largest_eccentricity_t0.5"] == pytest.approx(0.0, abs=1e-9)  # a square
    assert f["largest_max_t0.5"] == 1.0 and f["largest_mean_t0.5"] == pytest.approx(7.4 / 9)
    assert f["area_t0.9"] == 1 and f["n_regions_t0.9"] == 1
    assert all(math.isfinite(v) for v in f.values())
    # Areas scale with the pixel area (e.g. um^2 per heatmap pixel).
    assert slide_features(hm, (0.5,), pixel_area=4.0)["largest_area_t0.5"] == 36


def test_slide_features_with_a_shared_range_and_no_regions() -> None:
    hm = np.array([[0.0, 2.0], [4.0, 10.0]])
    assert normalise_heatmap(hm, (2.0, 6.0)).tolist() == [[0.0, 0.0], [0.5, 1.0]]
    f = slide_features(hm, (0.4,), value_range=(2.0, 6.0))
    assert f["area_t0.4"] == 2 and f["max"] == 1.0
    empty = slide_features(np.zeros((4, 4)), (0.5,))
    assert empty["n_regions_t0.5"] == 0 and empty["largest_eccentricity_t0.5"] == 0.0
    with pytest.raises(ValueError, match="high > low"):
        normalise_heatmap(hm, (1.0, 1.0))
    assert math.isnan(heatmap_max(np.full((2, 2), np.nan))) and heatmap_max(hm) == 10.0


def _synthetic_heatmaps(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Normal slides: low noise. Tumour slides: the same noise plus one bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:48]
    heatmaps, labels = {}, {}
    for i in range(n):
        hm = rng.uniform(0.0, 0.35, (48, 48))
        tumour = i % 2 == 1
        if tumour:
            cy, cx, r = rng.integers(10, 38), rng.integers(10, 38), rng.uniform(2, 6)
            hm = np.maximum(
                hm, rng.uniform(0.6, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
            )
        else:
            # A few hot pixels, so the maximum alone is not a perfect separator.
            hot = rng.integers(0, 48, (2, 3))
            hm[hot[0], hot[1]] = rng.uniform(0.5, 0.9, 3)
        hm[:, :4] = np.nan  # glass
        heatmaps[f"slide_{i:02d}"] = hm
        labels[f"slide_{i:02d}"] = tumour
    return heatmaps, labels


def test_forest_out_of_fold_auroc_on_separable_heatmaps() -> None:
    heatmaps, labels = _synthetic_heatmaps(40, seed=0)
    table = feature_table(heatmaps)
    assert table.height == 40 and table.columns[0] == "slide_id"
    forest = cross_validated_forest(table, labels, n_splits=5, seed=0, n_estimators=100)
    y = [labels[s] for s in forest.slide_ids]
    assert forest.n_splits == 5 and np.all(np.isfinite(forest.oof_probability))
    assert image_auroc(y, forest.oof_probability) >= 0.95
    # Deterministic under the seed; and the refitted model scores new slides.
    again = cross_validated_forest(table, labels, n_splits=5, seed=0, n_estimators=100)
    assert np.array_equal(forest.oof_probability, again.oof_probability)
    new, new_labels = _synthetic_heatmaps(10, seed=1)
    proba = forest.predict(feature_table(new))
    assert image_auroc([new_labels[s] for s in sorted(new)], proba) >= 0.9


def test_forest_needs_two_of_each_class() -> None:
    heatmaps, labels = _synthetic_heatmaps(6, seed=0)
    table = feature_table(heatmaps)
    with pytest.warns(UserWarning, match="3-fold"):
        assert cross_validated_forest(table, labels, n_estimators=10).n_splits == 3
    only_one = {s: (s == "slide_01") for s in labels}
    with pytest.raises(ValueError, match="1 tumour and 5 normal"):
        cross_validated_forest(table, only_one, n_estimators=10)
    with pytest.raises(ValueError, match="no label"):
        cross_validated_forest(table, {"slide_00": True}, n_estimators=10)


def test_heatmap_regions_outline_the_pixels() -> None:
    from skimage.measure import points_in_poly

    hm = np.zeros((10, 12))
    hm[2:4, 4:7] = 0.9  # a 2x3 block
    hm[6:9, 1:4] = 0.7
    hm[7, 2] = 0.0  # with a one-pixel hole
    regions = heatmap_regions(hm, 16.0, 0.5)
    assert [r.max_probability for r in regions] == [0.9, 0.7]
    block, ring = regions
    # Level-0 footprint of the block: x [64, 112), y [32, 64).
    assert block.outline[:, 0].min() == 64 and block.outline[:, 0].max() == 112
    assert block.outline[:, 1].min() == 32 and block.outline[:, 1].max() == 64
    assert np.array_equal(block.outline[0], block.outline[-1]) and block.area == 6 * 256
    assert len(ring.holes) == 1 and ring.area == 8 * 256
    # Every pixel centre is inside its region's outline, and outside the hole.
    rows, cols = np.mgrid[0:10, 0:12]
    centres = np.column_stack([(cols.ravel() + 0.5) * 16, (rows.ravel() + 0.5) * 16])
    inside = points_in_poly(centres, ring.outline) & ~points_in_poly(centres, ring.holes[0])
    assert np.array_equal(inside.reshape(10, 12), (hm == 0.7))
    assert heatmap_regions(hm, 16.0, 0.95) == []


def _lesion_candidates_before_streaming(heatmap, downsample, threshold, min_distance, exclude):
    """The whole-image algorithm `lesion_candidates` replaced (an argsort of every pixel inside
    `ndimage.maximum` / `maximum_position`), kept to hold the new one to the same output."""
    from scipy import ndimage

    from vadflow.tasks.scoring.aggregate import _EIGHT, _on_grid, _suppress_near

    hm = np.asarray(heatmap)
    above = np.isfinite(hm) & (hm > np.float64(threshold))
    if exclude is not None:
        above &= ~_on_grid(np.asarray(exclude, dtype=bool), hm.shape)
    if not above.any():
        return []
    masked = np.where(above, hm, -np.inf)
    window = 2 * min_distance + 1
    peaks = above & (
        masked == ndimage.maximum_filter(masked, size=window, mode="constant", cval=-np.inf)
    )
    points = []
    plateau, n_plateau = ndimage.label(peaks, structure=_EIGHT)
    if n_plateau:
        idx = np.arange(1, n_plateau + 1)
        centres = ndimage.center_of_mass(peaks, plateau, idx)
        values = ndimage.maximum(masked, plateau, idx)
        points += [(r, c, float(v)) for (r, c), v in zip(centres, values, strict=True)]
    regions, n_regions = ndimage.label(above, structure=_EIGHT)
    has_peak = np.zeros(n_regions + 1, dtype=bool)
    has_peak[np.unique(regions[peaks])] = True
    peakless = np.flatnonzero(~has_peak[1:]) + 1
    if peakless.size:
        for r, c in ndimage.maximum_position(masked, regions, peakless):
            points.append((float(r), float(c), float(hm[r, c])))
    points.sort(key=lambda t: -t[2])
    kept = _suppress_near(points, min_distance)
    return [((c + 0.5) * downsample, (r + 0.5) * downsample, p) for r, c, p in kept]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("min_distance", [1, 2, 5])
def test_lesion_candidates_equal_the_whole_image_algorithm(dtype, min_distance, monkeypatch):
    from scipy import ndimage

    from vadflow.tasks.scoring import aggregate

    # Strips far smaller than the heatmap, so peaks near strip edges are tested too.
    monkeypatch.setattr(aggregate, "LOCAL_MAX_STRIP_ROWS", 37)
    rng = np.random.default_rng(min_distance)
    heat = ndimage.gaussian_filter(rng.random((230, 410)), 1.5).astype(dtype)
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    heat[rng.random(heat.shape) < 0.02] = np.nan  # scattered unscored cells
    heat[:20, :60] = np.nan  # glass
    heat[100:104, 200:207] = 0.97  # a plateau: one candidate at its centre
    heat[150:152, 40:41] = 0.95
    exclude = np.zeros((23, 41), dtype=bool)  # a coarse QC mask, resized to the heatmap
    exclude[5:8, 10:20] = True
    for threshold, mask in ((0.55, None), (0.6, exclude), (0.99, None)):
        expected = _lesion_candidates_before_streaming(heat, 16.0, threshold, min_distance, mask)
        got = aggregate.lesion_candidates(
            heat, 16.0, threshold, min_distance=min_distance, exclude=mask
        )
        assert got == expected
        if threshold < 0.9:
            assert len(got) > 20  # many peaks, plateaus and suppressed regions compared
