"""From a slide heatmap to slide-level evidence: features, a random-forest score, lesion points.

Three readings of one heatmap, as in the Camelyon16 winners' pipeline (Wang et al. 2016,
"Deep Learning for Identifying Metastatic Breast Cancer"):

- ``slide_features``: geometric and intensity features of the regions above thresholds;
- ``cross_validated_forest``: a random forest on those features, trained by stratified
  cross-validation so every labelled slide gets an out-of-fold probability (an honest score to
  evaluate), plus a forest fitted on all labelled slides for new ones;
- ``lesion_candidates``: local maxima as (x, y, p) in level-0 pixels, the Camelyon16 lesion
  submission format; ``heatmap_regions``: outlines of the regions above a threshold
  (``strongest_regions``: only the strongest few, and how many there are in all).

Each works in strips of heatmap rows or per region's bounding box on the float32 heatmap, so
a whole slide's heatmap (12,500 x 6,250 at Camelyon size) costs itself, a bool mask and a
label image, never float64 copies of it.

The slide score "max of the heatmap" (Liu et al. 2017) is ``heatmap_max``.
Heatmap convention (``tasks.scoring.heatmap``): pixel (row, col) covers level-0
[col*ds, (col+1)*ds) x [row*ds, (row+1)*ds); NaN where no tile was scored (background).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from numpy.typing import ArrayLike
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedKFold

from vadflow.tasks.records import Candidate  # (x, y, p): level-0 px, probability

_EIGHT = np.ones((3, 3), dtype=bool)

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.9)  # Wang et al.: 0.5 and 0.9 of probability


def heatmap_max(heatmap: np.ndarray) -> float:
    """Slide score = the largest finite heatmap value (Liu et al. 2017); NaN if none is finite."""
    hm = np.asarray(heatmap, dtype=np.float64)
    finite = hm[np.isfinite(hm)]
    return float(finite.max()) if finite.size else float("nan")


def _check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    low, high = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"value_range must be finite with high > low, got {value_range}")
    return low, high


def normalise_heatmap(heatmap: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Map ``value_range`` (low, high) linearly to [0, 1], clipping outside; NaN stays NaN.

    Use one range for every slide of a run (e.g. from held-out normal slides), never per slide:
    a per-slide range would stretch every normal slide's own maximum to 1.
    """
    low, high = _check_range(value_range)
    hm = np.asarray(heatmap, dtype=np.float64)
    return np.clip((hm - low) / (high - low), 0.0, 1.0)


def _suffix(threshold: float) -> str:
    return f"t{threshold:g}".replace("-", "m")


FEATURE_STRIP_ROWS = 512  # heatmap rows per pass of slide_features: bounds its float64 scratch


def _row_strips(rows: int):
    """(start, stop) of consecutive strips of ``FEATURE_STRIP_ROWS`` rows covering `rows`."""
    step = FEATURE_STRIP_ROWS  # read at call time, so a test can make strips tiny
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class _StripValues:
    """A heatmap read a strip at a time as slide_features sees it: float64, normalised when
    a value range is given, and the strip's tissue (given mask, finite cells only).

    Each strip is computed from the float32 heatmap the same way the whole-slide float64 copy
    was, so values are bit-identical while only a strip is ever float64."""

    def __init__(
        self,
        heatmap: np.ndarray,
        value_range: tuple[float, float] | None,
        tissue: np.ndarray | None,
    ) -> None:
        self.heatmap = heatmap
        self.value_range = value_range
        self.tissue = tissue

    def values(self, rows: slice, cols: slice = slice(None)) -> np.ndarray:
        part = np.asarray(self.heatmap[rows, cols], dtype=np.float64)  # (strip, W)
        if self.value_range is not None:
            return normalise_heatmap(part, self.value_range)
        return part

    def strips(self):
        """(start, stop, values, tissue) per strip of rows."""
        for start, stop in _row_strips(self.heatmap.shape[0]):
            values = self.values(slice(start, stop))
            inside = np.isfinite(values)
            if self.tissue is not None:
                inside &= self.tissue[start:stop].astype(bool)
            yield start, stop, values, inside


def _top_values(source: _StripValues, keep: int) -> np.ndarray:
    """The `keep` largest tissue values of the heatmap, ascending, gathered strip by strip
    (a running partition: never more than `keep` plus one strip's values are held)."""
    best = np.empty(0, dtype=np.float64)
    for _, _, values, inside in source.strips():
        pool = np.concatenate([best, values[inside]])
        if pool.size > keep:
            pool = np.partition(pool, pool.size - keep)[pool.size - keep :]
        best = pool
    return np.sort(best)


def _streamed_quantile(source: _StripValues, n: int, q: float) -> float:
    """``np.quantile(tissue values, q)`` (linear method) without a copy of the tissue values:
    only the order statistics it interpolates between are kept (for q99, the top 1 %)."""
    index = q * (n - 1)  # numpy's virtual index for the linear method
    below = math.floor(index)
    top = _top_values(source, n - below)  # ascending: top[0] has rank `below`
    a, b = float(top[0]), float(top[min(1, top.size - 1)])
    t = index - below
    # numpy's _lerp: from the nearer end, so q = 1 gives exactly the maximum.
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _largest_region(
    source: _StripValues, labelled: np.ndarray, label: int, pixel_area: float
) -> dict[str, float]:
    """regionprops' area, major axis, eccentricity, extent and intensity mean and max of one
    labelled region, computed in strips of its bounding box: its mask, coordinates and values
    are never whole-slide (or whole-box) arrays, however large the region is."""
    rows = labelled.shape[0]
    top, bottom, left, right = rows, -1, labelled.shape[1], -1
    for start, stop in _row_strips(rows):
        own = labelled[start:stop] == label
        if own.any():
            hit_rows = np.flatnonzero(own.any(axis=1))
            hit_cols = np.flatnonzero(own.any(axis=0))
            top, bottom = min(top, start + int(hit_rows[0])), start + int(hit_rows[-1])
            left, right = min(left, int(hit_cols[0])), max(right, int(hit_cols[-1]))
    cols = slice(left, right + 1)
    # Pass 1: count, centroid (box-local, as regionprops' moments are), intensity.
    count, row_sum, col_sum, value_sum, value_max = 0, 0.0, 0.0, 0.0, -math.inf
    for start, stop in _row_strips(bottom + 1 - top):
        strip = slice(top + start, top + stop)
        r, c = np.nonzero(labelled[strip, cols] == label)
        values = source.values(strip, cols)[r, c]
        count += r.size
        row_sum += float((r + start).sum())
        col_sum += float(c.sum())
        value_sum += float(values.sum())
        value_max = max(value_max, float(values.max(initial=-math.inf)))
    row_mean, col_mean = row_sum / count, col_sum / count
    # Pass 2: second central moments about that centroid (skimage's moments_central, order 2).
    mu20 = mu02 = mu11 = 0.0
    for start, stop in _row_strips(bottom + 1 - top):
        r, c = np.nonzero(labelled[top + start : top + stop, cols] == label)
        dr, dc = r + start - row_mean, c - col_mean
        mu20 += float(np.dot(dr, dr))
        mu02 += float(np.dot(dc, dc))
        mu11 += float(np.dot(dr, dc))
    # skimage's inertia tensor of a 2-D image and its eigenvalues, largest first.
    tensor = np.array([[mu02, -mu11], [-mu11, mu20]]) / count
    small, large = np.clip(np.linalg.eigvalsh(tensor), 0, None)
    box_area = (bottom + 1 - top) * (right + 1 - left)
    return {
        "area": float(count) * pixel_area,
        "major_axis": 4 * math.sqrt(large) * math.sqrt(pixel_area),
        "eccentricity": math.sqrt(1 - small / large) if large != 0 else 0.0,
        "extent": count / box_area,
        "mean": value_sum / count,
        "max": value_max,
    }


def slide_features(
    heatmap: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    value_range: tuple[float, float] | None = None,
    tissue: np.ndarray | None = None,
    pixel_area: float = 1.0,
) -> dict[str, float]:
    """Wang et al. (2016) slide features of one heatmap, every value finite.

    With ``value_range`` the heatmap is first normalised to [0, 1] (``normalise_heatmap``) and
    ``thresholds`` are fractions of that range (0.5 = half way); without it, thresholds are
    absolute heatmap values. Tissue is ``tissue`` where given, else every finite heatmap pixel.
    A pixel is "above" a threshold when its value is strictly greater. Per threshold t
    (suffix ``_t0.5``): ``area`` (pixels above, times ``pixel_area``, e.g. um^2 per heatmap
    pixel), ``tissue_fraction`` (area above / tissue area), ``n_regions`` (8-connected),
    and of the largest region: ``largest_area``, ``largest_major_axis`` (regionprops, in
    heatmap pixels times sqrt(pixel_area)), ``largest_eccentricity``, ``largest_extent``
    (area / bounding-box area), ``largest_mean`` and ``largest_max`` (values inside it).
    Regardless of t: ``max``, ``mean`` and ``q99`` over tissue. Without regions the
    region features are 0, so a forest can use the rows as they are.

    Memory is the float32 heatmap, one bool mask and one label image at a time: values are
    made float64 (and normalised) a strip of rows at a time, q99 keeps only the top 1 % of
    the values, and the largest region is measured in strips of its bounding box.
    """
    hm = np.asarray(heatmap)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {hm.shape}")
    if value_range is not None:
        value_range = _check_range(value_range)
    tissue_mask = None
    if tissue is not None:
        tissue_mask = np.asarray(tissue)
        if tissue_mask.shape != hm.shape:
            raise ValueError(f"tissue mask shape {tissue_mask.shape} != heatmap {hm.shape}")
    source = _StripValues(hm, value_range, tissue_mask)
    n_tissue, total, peak = 0, 0.0, -math.inf
    for _, _, values, inside in source.strips():
        picked = values[inside]
        n_tissue += picked.size
        total += float(picked.sum())
        peak = max(peak, float(picked.max(initial=-math.inf)))
    out: dict[str, float] = {
        "max": peak if n_tissue else 0.0,
        "mean": total / n_tissue if n_tissue else 0.0,
        "q99": _streamed_quantile(source, n_tissue, 0.99) if n_tissue else 0.0,
    }
    for t in thresholds:
        above = np.zeros(hm.shape, dtype=bool)
        for start, stop, values, inside in source.strips():
            np.greater(values, t, out=above[start:stop], where=inside)
        labelled, n_regions = ndimage.label(above, structure=_EIGHT)
        sfx = _suffix(float(t))
        area = int(np.count_nonzero(above))
        del above
        out[f"area_{sfx}"] = float(area) * pixel_area
        out[f"tissue_fraction_{sfx}"] = area / n_tissue if n_tissue else 0.0
        out[f"n_regions_{sfx}"] = float(n_regions)
        largest = {"area": 0.0, "major_axis": 0.0, "eccentricity": 0.0, "extent": 0.0}
        largest |= {"mean": 0.0, "max": 0.0}
        if n_regions:
            # Largest by area; ties go to the lowest label (first in raster order). Counted
            # strip by strip: bincount casts its input to int64, a strip's worth at a time.
            sizes = np.zeros(n_regions + 1, dtype=np.int64)
            for start, stop in _row_strips(hm.shape[0]):
                sizes += np.bincount(labelled[start:stop].ravel(), minlength=n_regions + 1)
            sizes[0] = 0
            largest = _largest_region(source, labelled, int(np.argmax(sizes)), pixel_area)
        del labelled
        out |= {f"largest_{k}_{sfx}": v for k, v in largest.items()}
    return out


def feature_table(
    heatmaps: Mapping[str, np.ndarray],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    value_range: tuple[float, float] | None = None,
    pixel_area: float = 1.0,
) -> pl.DataFrame:
    """One row of ``slide_features`` per slide, with a leading ``slide_id`` column, by slide id."""
    rows = [
        {
            "slide_id": slide_id,
            **slide_features(
                heatmaps[slide_id], thresholds, value_range=value_range, pixel_area=pixel_area
            ),
        }
        for slide_id in sorted(heatmaps)
    ]
    if not rows:
        return pl.DataFrame(schema={"slide_id": pl.String})
    return pl.DataFrame(rows)


def _matrix(features: pl.DataFrame, names: Sequence[str] | None = None) -> np.ndarray:
    names = list(names) if names is not None else _feature_names(features)
    missing = sorted(set(names) - set(features.columns))
    if missing:
        raise ValueError(f"feature table lacks columns {missing}; build it with feature_table")
    x = features.select(names).to_numpy().astype(np.float64)
    if not np.all(np.isfinite(x)):
        bad = [n for n, ok in zip(names, np.isfinite(x).all(axis=0), strict=True) if not ok]
        raise ValueError(f"feature columns {bad} have non-finite values")
    return x


def _feature_names(features: pl.DataFrame) -> list[str]:
    return [c for c in features.columns if c != "slide_id"]


@dataclass(frozen=True, eq=False)
class SlideForest:
    """A random-forest slide classifier and its honest (out-of-fold) probabilities.

    ``oof_probability[i]`` is P(tumour) for ``slide_ids[i]`` from the forest of the one fold
    that did not see that slide; ``model`` is refitted on all labelled slides for new slides.
    """

    slide_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    oof_probability: np.ndarray
    n_splits: int
    model: RandomForestClassifier

    def predict(self, features: pl.DataFrame) -> np.ndarray:
        """P(tumour) for slides the forest has not seen (rows of a ``feature_table``)."""
        proba = self.model.predict_proba(_matrix(features, self.feature_names))
        return proba[:, list(self.model.classes_).index(True)]


def _forest(seed: int, n_estimators: int) -> RandomForestClassifier:
    return RandomForestClassifier(
        n_estimators=n_estimators,
        min_samples_leaf=1,
        class_weight="balanced",  # tumour slides are the minority in Camelyon16 (111 of 270)
        random_state=seed,
        n_jobs=1,
    )


def cross_validated_forest(
    features: pl.DataFrame,
    labels: Mapping[str, bool] | ArrayLike,
    *,
    n_splits: int = 5,
    seed: int = 0,
    n_estimators: int = 300,
) -> SlideForest:
    """Random forest on slide features, scored by stratified k-fold cross-validation.

    ``features`` is a ``feature_table``; ``labels`` maps slide_id -> tumour (True) or is an
    array in the table's row order. Folds are ``StratifiedKFold(shuffle=True,
    random_state=seed)``, reduced to the smaller class's count when it has fewer slides than
    ``n_splits``; forests use ``random_state=seed``, so results are reproducible. Needs at
    least two slides of each class (ValueError otherwise, naming the counts).
    """
    if "slide_id" not in features.columns:
        raise ValueError("feature table needs a slide_id column; build it with feature_table")
    slide_ids = features["slide_id"].to_list()
    if isinstance(labels, Mapping):
        missing = [s for s in slide_ids if s not in labels]
        if missing:
            raise ValueError(f"no label for slides {missing[:5]} ({len(missing)} in all)")
        y = np.array([bool(labels[s]) for s in slide_ids])
    else:
        y = np.asarray(labels).astype(bool).ravel()
        if y.size != len(slide_ids):
            raise ValueError(f"{y.size} labels for {len(slide_ids)} slides")
    names = _feature_names(features)
    x = _matrix(features, names)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    folds = min(n_splits, n_pos, n_neg)
    if folds < 2:
        raise ValueError(
            f"cross-validation needs >= 2 slides of each class; got {n_pos} tumour and "
            f"{n_neg} normal. Score slides with heatmap_max instead."
        )
    if folds < n_splits:
        warnings.warn(
            f"only {min(n_pos, n_neg)} slides in the smaller class: {folds}-fold instead of "
            f"{n_splits}-fold cross-validation",
            UserWarning,
            stacklevel=2,
        )
    oof = np.full(y.size, np.nan)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y):
        forest = _forest(seed, n_estimators).fit(x[train], y[train])
        oof[test] = forest.predict_proba(x[test])[:, list(forest.classes_).index(True)]
    model = _forest(seed, n_estimators).fit(x, y)
    return SlideForest(tuple(slide_ids), tuple(names), oof, folds, model)


def candidate_spacing(suppress_um: float, mpp: float | None, downsample: float) -> int:
    """Heatmap pixels between two candidates for a suppression radius in microns (at least 1);
    without an MPP (industrial images) the radius is read as level-0 pixels."""
    level0_px = suppress_um / mpp if mpp else suppress_um
    return max(1, math.ceil(level0_px / downsample))


def _on_grid(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A (h, w) mask resized (nearest) to a heatmap grid `shape` covering the same slide."""
    if mask.ndim != 2:
        raise ValueError(f"exclusion mask must be 2-D, got shape {mask.shape}")
    if mask.shape == shape:
        return mask
    rows = np.minimum(
        ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1
    )
    return mask[rows[:, None], cols[None, :]]


def lesion_candidates(
    heatmap: np.ndarray,
    downsample: float,
    threshold: float,
    min_distance: int = 2,
    max_candidates: int | None = None,
    exclude: np.ndarray | None = None,
) -> list[Candidate]:
    """Lesion candidates (x, y, p) from a slide heatmap, strongest first.

    ``exclude`` is a bool mask (any size: it is resized to the heatmap's grid, nearest) of
    where no candidate may be, such as the artefact QC mask; those cells count as below the
    threshold, so an artefact neither gives a candidate nor suppresses one beside it.

    A candidate is a local maximum of the heatmap above ``threshold`` (strictly greater), where
    "local" means the largest value within ``min_distance`` heatmap pixels (Chebyshev). A flat
    plateau gives one candidate at its centre, and every 8-connected region above threshold
    gives at least its own maximum even when a stronger neighbouring region suppresses it.
    Candidates closer than ``min_distance`` to a stronger one are dropped, and only the
    ``max_candidates`` strongest are kept (None: all). Heatmap pixel (row, col) covers level-0
    [col*ds, (col+1)*ds) x [row*ds, (row+1)*ds), so candidates are reported at pixel centres:
    x = (col + 0.5) * ds, y = (row + 0.5) * ds. Use ``candidate_spacing`` to turn a lesion
    scale in microns into ``min_distance``.

    Work and memory scale with the heatmap and its peaks, not with sorting it: the local-maximum
    filter runs in strips of rows, plateau centres are sums over peak coordinates, and the
    maximum of a region without a peak is looked up inside that region's bounding box
    (``ndimage.find_objects``); a tie there goes to the first cell in raster order.
    """
    hm = np.asarray(heatmap)
    if hm.dtype not in (np.float32, np.float64):  # heatmaps are float32: no float64 copy of them
        hm = hm.astype(np.float64)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {hm.shape}")
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance}")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1 or None, got {max_candidates}")
    # A float64 scalar: compared at full precision, cast in the ufunc's buffers, not by a copy.
    above = np.isfinite(hm) & (hm > np.float64(threshold))
    if exclude is not None:
        above &= ~_on_grid(np.asarray(exclude, dtype=bool), hm.shape)
    if not above.any():
        return []
    peaks = _local_maxima(hm, above, min_distance)

    points: list[tuple[float, float, float]] = []  # (row, col, p)
    # Plateaus: one point per 8-connected group of equal maxima, at its centre of mass. Peaks
    # are sparse, so the sums run over their coordinates (in raster order, as a bincount over
    # the whole label image would add them) instead of over every pixel.
    plateau, n_plateau = ndimage.label(peaks, structure=_EIGHT)
    peak_rows, peak_cols = np.nonzero(peaks)
    group = plateau[peak_rows, peak_cols]
    del plateau, peaks  # a label image the size of the heatmap: not kept beside the next one
    if n_plateau:
        size = np.bincount(group, minlength=n_plateau + 1)[1:]
        row_mean = np.bincount(group, weights=peak_rows.astype(float), minlength=n_plateau + 1)
        col_mean = np.bincount(group, weights=peak_cols.astype(float), minlength=n_plateau + 1)
        # Equal values within a plateau (adjacent peaks bound each other), so any is its max.
        value = np.full(n_plateau + 1, -np.inf, dtype=hm.dtype)
        np.maximum.at(value, group, hm[peak_rows, peak_cols])
        points += [
            (float(r), float(c), float(v))
            for r, c, v in zip(
                row_mean[1:] / size, col_mean[1:] / size, value[1:].tolist(), strict=True
            )
        ]
    # Regions above threshold with no surviving peak still get their own maximum (the first
    # in raster order on a tie). Only their cells are gathered and sorted, not the heatmap.
    regions, n_regions = ndimage.label(above, structure=_EIGHT)
    has_peak = np.zeros(n_regions + 1, dtype=bool)
    has_peak[0] = True  # background
    has_peak[regions[peak_rows, peak_cols]] = True
    if not has_peak.all():
        cells = np.flatnonzero(~has_peak[regions])  # raster order
        label = regions.ravel()[cells]
        del regions
        value = hm.ravel()[cells]
        order = np.lexsort((cells, -value, label))  # by region, strongest, then first
        first = order[np.r_[True, label[order][1:] != label[order][:-1]]]  # one per region
        rows, cols = np.divmod(cells[first], hm.shape[1])
        points += [
            (float(r), float(c), float(v))
            for r, c, v in zip(rows.tolist(), cols.tolist(), value[first].tolist(), strict=True)
        ]

    # Greedy suppression, strongest first, so equal peaks a pixel or two apart count once.
    points.sort(key=lambda t: -t[2])
    kept = _suppress_near(points, min_distance)[:max_candidates]
    return [((c + 0.5) * downsample, (r + 0.5) * downsample, p) for r, c, p in kept]


LOCAL_MAX_STRIP_ROWS = 512  # heatmap rows per maximum-filter pass: bounds its scratch arrays


def _local_maxima(hm: np.ndarray, above: np.ndarray, min_distance: int) -> np.ndarray:
    """Cells of `above` equal to the largest `above` value within `min_distance` (Chebyshev).

    Computed in strips of rows with a halo of `min_distance` rows on each side, so the
    scratch arrays (the masked values and their maximum filter) are a strip, not the slide;
    the maximum is exact, so the result is the whole-image filter's.
    """
    rows = hm.shape[0]
    window = 2 * min_distance + 1
    peaks = np.zeros_like(above)
    for start in range(0, rows, LOCAL_MAX_STRIP_ROWS):
        stop = min(rows, start + LOCAL_MAX_STRIP_ROWS)
        lo, hi = max(0, start - min_distance), min(rows, stop + min_distance)
        masked = np.where(above[lo:hi], hm[lo:hi], -np.inf)
        local = ndimage.maximum_filter(masked, size=window, mode="constant", cval=-np.inf)
        inner = slice(start - lo, stop - lo)
        peaks[start:stop] = above[start:stop] & (masked[inner] == local[inner])
    return peaks


def _suppress_near(
    points: list[tuple[float, float, float]], min_distance: int
) -> list[tuple[float, float, float]]:
    """Keep each (row, col, p), strongest first, unless a kept one is closer than `min_distance`
    (Chebyshev).

    Only points with another point within `min_distance` can be dropped or drop one, and on a
    heatmap they are few (distinct local maxima are farther apart than that), so a k-d tree
    finds them at once and only they go through the greedy pass; every other point is kept.
    """
    if len(points) < 2:
        return list(points)
    from scipy.spatial import cKDTree

    coords = np.array([(r, c) for r, c, _ in points], dtype=np.float64)
    # Radius `min_distance` inclusive: a superset of the pairs closer than it; the greedy
    # pass below applies the exact strict test to them.
    pairs = cKDTree(coords).query_pairs(float(min_distance), p=np.inf, output_type="ndarray")
    crowded = np.zeros(len(points), dtype=bool)
    crowded[pairs.ravel()] = True
    if not crowded.any():
        return list(points)
    crowded_at = np.flatnonzero(crowded)
    keep = ~crowded
    keep[crowded_at] = ~_suppress_greedy([points[i] for i in crowded_at], min_distance)
    return [point for point, kept in zip(points, keep.tolist(), strict=True) if kept]


def _suppress_greedy(points: list[tuple[float, float, float]], min_distance: int) -> np.ndarray:
    """Which of `points` (strongest first) the greedy suppression drops, as a bool array. Kept
    points sit in buckets of `min_distance` cells, so a point is compared with the 3 x 3
    buckets around it only."""
    buckets: dict[tuple[int, int], list[tuple[float, float]]] = {}
    dropped = np.zeros(len(points), dtype=bool)
    for i, (r, c, _) in enumerate(points):
        br, bc = int(r // min_distance), int(c // min_distance)
        near = (
            (kr, kc)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            for kr, kc in buckets.get((br + dr, bc + dc), ())
        )
        if all(max(abs(r - kr), abs(c - kc)) >= min_distance for kr, kc in near):
            buckets.setdefault((br, bc), []).append((r, c))
        else:
            dropped[i] = True
    return dropped


@dataclass(frozen=True, eq=False)
class Region:
    """One 8-connected heatmap region above a threshold, outlined in level-0 pixels.

    ``outline`` and each of ``holes`` are closed (K, 2) rings of (x, y), first point = last.
    ``area`` is in level-0 square pixels (heatmap pixels times downsample squared).
    """

    label: int
    outline: np.ndarray
    holes: tuple[np.ndarray, ...]
    area: float
    max_probability: float
    mean_probability: float


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@dataclass(frozen=True, eq=False)
class SlideRegions:
    """The regions a slide exports: the ``max_regions`` strongest of ``total`` regions above
    the threshold, strongest first (``omitted``: how many weaker ones were left out)."""

    regions: tuple[Region, ...]
    total: int

    @property
    def omitted(self) -> int:
        return self.total - len(self.regions)


def strongest_regions(
    heatmap: np.ndarray, downsample: float, threshold: float, max_regions: int | None = None
) -> SlideRegions:
    """``heatmap_regions``, only the ``max_regions`` strongest outlined (None: all), and how
    many there are in all.

    The regions' maxima and bounding boxes are gathered in strips of rows over the label
    image (no per-region Python work, no sort of the heatmap), so a noisy heatmap with a
    million regions costs the label image and a few numbers per region; outlines are traced
    only for the kept regions, each inside its own bounding box.
    """
    hm = np.asarray(heatmap)
    if hm.dtype not in (np.float32, np.float64):  # heatmaps are float32: no float64 copy
        hm = hm.astype(np.float64)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {hm.shape}")
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    if max_regions is not None and max_regions < 0:
        raise ValueError(f"max_regions must be >= 0 or None, got {max_regions}")
    above = np.zeros(hm.shape, dtype=bool)
    for start, stop in _row_strips(hm.shape[0]):
        part = hm[start:stop]
        above[start:stop] = np.isfinite(part) & (part > np.float64(threshold))  # full precision
    labelled, n = ndimage.label(above, structure=_EIGHT)
    del above
    # Per label (index 0: background): its maximum and bounding box, strip by strip.
    peak = np.full(n + 1, -np.inf)
    top = np.full(n + 1, hm.shape[0], dtype=np.int64)
    bottom = np.full(n + 1, -1, dtype=np.int64)
    left = np.full(n + 1, hm.shape[1], dtype=np.int64)
    right = np.full(n + 1, -1, dtype=np.int64)
    for start, stop in _row_strips(hm.shape[0]):
        rows, cols = np.nonzero(labelled[start:stop])
        label = labelled[start:stop][rows, cols]
        np.maximum.at(peak, label, hm[start:stop][rows, cols])
        rows += start
        np.minimum.at(top, label, rows)
        np.maximum.at(bottom, label, rows)
        np.minimum.at(left, label, cols)
        np.maximum.at(right, label, cols)
    # Strongest first; a stable sort keeps equal maxima in label (raster) order.
    kept = np.argsort(-peak[1:], kind="stable")[:max_regions] + 1
    regions: list[Region] = []
    for index in kept.tolist():
        box = (slice(top[index], bottom[index] + 1), slice(left[index], right[index] + 1))
        mask = labelled[box] == index
        own = np.pad(mask, 1).astype(np.float64)  # closed contours
        rings = []
        for contour in find_contours(own, 0.5, fully_connected="high"):
            contour = approximate_polygon(contour, tolerance=0)  # (K, 2) row, col
            rows = contour[:, 0] - 1 + box[0].start
            cols = contour[:, 1] - 1 + box[1].start
            rings.append(np.column_stack([(cols + 0.5) * downsample, (rows + 0.5) * downsample]))
        # The outer boundary encloses the most area; every other ring is a hole.
        rings.sort(key=lambda r: -abs(_ring_area(r)))
        values = hm[box][mask].astype(np.float64)  # this region only
        regions.append(
            Region(
                label=index,
                outline=rings[0],
                holes=tuple(rings[1:]),
                area=float(values.size) * downsample**2,
                max_probability=float(values.max()),
                mean_probability=float(values.mean()),
            )
        )
    return SlideRegions(tuple(regions), n)


def heatmap_regions(
    heatmap: np.ndarray, downsample: float, threshold: float, max_regions: int | None = None
) -> list[Region]:
    """Outlines of the 8-connected regions of the heatmap strictly above ``threshold``.

    Each outline runs half way between pixel centres (marching squares at 0.5 on the region's
    own mask, diagonal neighbours joined), so a heatmap pixel is inside the polygon exactly
    when it belongs to the region: rasterising the outlines at the same downsample, pixel
    centres tested, gives the region back. Collinear vertices are dropped. Coordinates are
    level-0: heatmap (row, col) maps to x = (col + 0.5) * ds, y = (row + 0.5) * ds, as for
    ``lesion_candidates``. Strongest region (by max value) first; with ``max_regions`` only
    that many (``strongest_regions`` also says how many were left out).
    """
    return list(strongest_regions(heatmap, downsample, threshold, max_regions).regions)
