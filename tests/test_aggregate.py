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


def _slide_features_before_streaming(heatmap, thresholds, value_range=None, tissue=None):
    """`slide_features` as it was before it went strip-wise (whole-slide float64 copies and
    regionprops on the largest region's box), kept to hold the new one to the same values."""
    from scipy import ndimage
    from skimage.measure import regionprops

    eight = np.ones((3, 3), dtype=bool)
    hm = np.asarray(heatmap, dtype=np.float64)
    values = normalise_heatmap(hm, value_range) if value_range is not None else hm
    finite = np.isfinite(values)
    tissue_mask = finite if tissue is None else np.asarray(tissue).astype(bool) & finite
    n_tissue = int(tissue_mask.sum())
    inside = values[tissue_mask]
    out = {
        "max": float(inside.max()) if inside.size else 0.0,
        "mean": float(inside.mean()) if inside.size else 0.0,
        "q99": float(np.quantile(inside, 0.99)) if inside.size else 0.0,
    }
    filled = np.where(tissue_mask, values, -np.inf)
    for t in thresholds:
        above = filled > t
        labelled, n_regions = ndimage.label(above, structure=eight)
        sfx = f"t{float(t):g}".replace("-", "m")
        area = int(above.sum())
        out[f"area_{sfx}"] = float(area)
        out[f"tissue_fraction_{sfx}"] = area / n_tissue if n_tissue else 0.0
        out[f"n_regions_{sfx}"] = float(n_regions)
        largest = dict.fromkeys(("area", "major_axis", "eccentricity", "extent"), 0.0)
        largest |= {"mean": 0.0, "max": 0.0}
        if n_regions:
            sizes = np.bincount(labelled.ravel(), minlength=n_regions + 1)
            sizes[0] = 0
            big_label = int(np.argmax(sizes))
            box = ndimage.find_objects(labelled, max_label=big_label)[big_label - 1]
            (big,) = regionprops(
                (labelled[box] == big_label).astype(np.int32), intensity_image=values[box]
            )
            largest = {
                "area": float(big.area),
                "major_axis": float(big.axis_major_length),
                "eccentricity": float(big.eccentricity),
                "extent": float(big.extent),
                "mean": float(big.intensity_mean),
                "max": float(big.intensity_max),
            }
        out |= {f"largest_{k}_{sfx}": v for k, v in largest.items()}
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strip_rows", [3, 512])
def test_slide_features_equal_the_whole_slide_float64_version(seed, strip_rows, monkeypatch):
    from scipy import ndimage

    from vadflow.tasks.scoring import aggregate

    monkeypatch.setattr(aggregate, "FEATURE_STRIP_ROWS", strip_rows)  # strips must not matter
    rng = np.random.default_rng(seed)
    # Smooth noise: regions of many shapes and sizes, some touching strip borders.
    hm = ndimage.gaussian_filter(rng.random((41, 53)), 1.5).astype(np.float32) * 4 - 1
    hm[rng.random(hm.shape) < 0.1] = np.nan  # unscored cells
    tissue = rng.random(hm.shape) > 0.2
    low, high = float(np.nanmin(hm)), float(np.nanmax(hm))
    cases = [
        {"thresholds": (0.5, 0.9), "value_range": (low, high)},
        {"thresholds": (float(np.nanquantile(hm, 0.6)), 10.0), "tissue": tissue},
        {"thresholds": (0.2,), "value_range": (low + 0.3, high - 0.3), "tissue": tissue},
    ]
    for case in cases:
        want = _slide_features_before_streaming(hm, **case)
        got = slide_features(hm, **case)
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
        assert want[f"n_regions_t{case['thresholds'][0]:g}"] > 1  # the case has regions


def test_slide_features_q99_is_numpys_on_ties_and_tiny_tissue() -> None:
    hm = np.array([[1.0, 1.0, 1.0, 2.0], [np.nan, 3.0, 3.0, 3.0]], dtype=np.float32)
    for tissue in (None, np.array([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)):
        want = _slide_features_before_streaming(hm, (0.5,), tissue=tissue)
        assert slide_features(hm, (0.5,), tissue=tissue) == pytest.approx(want, rel=1e-12)


def _heatmap_regions_before_bounding(heatmap, downsample, threshold):
    """`heatmap_regions` before regions were capped: every region outlined (find_objects over
    the label image), then sorted strongest first."""
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    from vadflow.tasks.scoring.aggregate import _ring_area

    hm = np.asarray(heatmap)
    above = np.isfinite(hm) & (hm > np.float64(threshold))
    labelled, _ = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    regions = []
    for index, box in enumerate(ndimage.find_objects(labelled), start=1):
        own = np.pad(labelled[box] == index, 1).astype(np.float64)
        rings = []
        for contour in find_contours(own, 0.5, fully_connected="high"):
            contour = approximate_polygon(contour, tolerance=0)
            rows = contour[:, 0] - 1 + box[0].start
            cols = contour[:, 1] - 1 + box[1].start
            rings.append(np.column_stack([(cols + 0.5) * downsample, (rows + 0.5) * downsample]))
        rings.sort(key=lambda r: -abs(_ring_area(r)))
        values = hm[box][labelled[box] == index].astype(np.float64)
        regions.append(
            (index, rings, values.size * downsample**2, float(values.max()), values.mean())
        )
    regions.sort(key=lambda r: -r[3])
    return regions


@pytest.mark.parametrize("strip_rows", [4, 512])
def test_strongest_regions_are_the_first_of_every_region(strip_rows, monkeypatch) -> None:
    from scipy import ndimage

    from vadflow.tasks.scoring import aggregate

    monkeypatch.setattr(aggregate, "FEATURE_STRIP_ROWS", strip_rows)
    rng = np.random.default_rng(7)
    hm = ndimage.gaussian_filter(rng.random((48, 60)), 1.0).astype(np.float32)
    hm[5:9, 5:9] = 0.9  # equal maxima in two regions: label (raster) order breaks the tie
    hm[30:33, 40:44] = 0.9
    hm[rng.random(hm.shape) < 0.05] = np.nan
    threshold = float(np.nanquantile(hm, 0.7))
    want = _heatmap_regions_before_bounding(hm, 8.0, threshold)
    assert len(want) > 10
    every = aggregate.strongest_regions(hm, 8.0, threshold)
    assert every.total == len(want) and every.omitted == 0
    for region, (label, rings, area, peak, mean) in zip(every.regions, want, strict=True):
        assert region.label == label and region.area == area
        assert region.max_probability == peak and region.mean_probability == mean
        assert len(region.holes) + 1 == len(rings)
        for got, ring in zip((region.outline, *region.holes), rings, strict=True):
            assert np.array_equal(got, ring)
    capped = aggregate.strongest_regions(hm, 8.0, threshold, max_regions=5)
    assert capped.total == len(want) and capped.omitted == len(want) - 5
    assert [r.label for r in capped.regions] == [w[0] for w in want[:5]]
    assert [r.label for r in heatmap_regions(hm, 8.0, threshold, 5)] == [w[0] for w in want[:5]]
    with pytest.raises(ValueError, match="max_regions"):
        aggregate.strongest_regions(hm, 8.0, threshold, max_regions=-1)
