"""MVTec AD per-region overlap (PRO), computed exactly, and the MVTec AD metric set.

Official definition (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, and
the evaluation code released with it, ``compute_pro`` and ``trapezoid``):

- ground-truth regions are the 8-connected components of each image's defect mask, pooled
  over all test images; pixels outside every region are the normal ("OK") pixels;
- at threshold t a pixel is predicted anomalous when its score >= t. The per-region overlap
  of region C is |{p in C : score(p) >= t}| / |C|; PRO(t) is its mean over all regions, and
  FPR(t) is the fraction of OK pixels (of all images together) predicted anomalous;
- every distinct score is a threshold (points with equal scores are merged); the curve runs
  from (0, 0) through those points to (1, 1);
- the metric is the area under PRO(FPR) from FPR 0 to 0.3 (trapezoids, the end point
  interpolated linearly), divided by 0.3 so that a perfect detector scores 1.

Computed with one sort of the pooled pixels and cumulative sums: each region pixel carries
weight 1 / |its region|, each OK pixel a false-positive count of 1. Only pixels that can affect
the curve up to the integration limit are sorted (a linear-time partition finds the score at
which the FPR passes the limit), so large test sets stay cheap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from vadflow.tasks.evaluation.metrics import (
    UndefinedMetricWarning,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
)

PRO_MAX_FPR = 0.3

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True, eq=False)
class ProCurve:
    """The PRO curve: ``fpr`` and ``pro`` from (0, 0), one point per distinct threshold.

    ``thresholds[i]`` belongs to point i + 1 (the first point is the (0, 0) start). When the
    curve was cut at ``max_fpr`` it ends at the first point past it; otherwise at (1, 1).
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray
    n_regions: int
    n_normal_pixels: int
    max_fpr: float | None


def _regions(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], valid: Sequence[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pooled (scores, region weight 1/|C| or 0, is-OK flag) and the number of regions."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    if valid is not None and len(valid) != len(masks):
        raise ValueError(f"got {len(valid)} valid masks for {len(masks)} images")
    scores, weights, ok = [], [], []
    n_regions = 0
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask = np.asarray(mask).astype(bool)
        amap = np.asarray(amap, dtype=np.float64)
        if mask.shape != amap.shape or mask.ndim != 2:
            raise ValueError(
                f"image {i}: mask shape {mask.shape} and anomaly map shape {amap.shape} must "
                "be the same 2-D shape; resize the map to the mask before evaluating"
            )
        keep = np.ones(mask.shape, dtype=bool)
        if valid is not None:
            keep = np.asarray(valid[i]).astype(bool)
            if keep.shape != mask.shape:
                raise ValueError(f"image {i}: valid shape {keep.shape} != mask {mask.shape}")
        labelled, n = ndimage.label(mask, structure=_EIGHT)
        # Region sizes count valid pixels only; a region with none of them does not exist.
        sizes = np.bincount(labelled[keep], minlength=n + 1).astype(np.float64)
        present = sizes[1:] > 0
        n_regions += int(present.sum())
        inverse = np.zeros(n + 1)
        inverse[1:][present] = 1.0 / sizes[1:][present]
        lab = labelled[keep]
        s = amap[keep]
        if not np.all(np.isfinite(s)):
            raise ValueError(f"image {i}: anomaly map has {int(np.sum(~np.isfinite(s)))} NaN/inf")
        scores.append(s)
        weights.append(inverse[lab])
        ok.append(lab == 0)
    if not scores:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool), 0
    return np.concatenate(scores), np.concatenate(weights), np.concatenate(ok), n_regions


def pro_curve(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valid: Sequence[np.ndarray] | None = None,
    max_fpr: float | None = PRO_MAX_FPR,
) -> ProCurve | None:
    """Exact PRO curve over pooled images (definition in the module docstring).

    ``valid`` drops pixels (e.g. outside the object) from both regions and OK pixels. With
    ``max_fpr`` only the part of the curve needed to integrate up to it is computed. Returns
    None, with an ``UndefinedMetricWarning``, when there is no region or no OK pixel.
    """
    if max_fpr is not None and not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    scores, weights, ok, n_regions = _regions(masks, maps, valid)
    n_ok = int(ok.sum())
    if n_regions == 0 or n_ok == 0:
        what = "no anomalous region" if n_regions == 0 else "no normal pixel"
        warnings.warn(
            f"PRO is undefined with {what} in {len(masks)} images; reporting NaN",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return None
    cut = max_fpr is not None and max_fpr < 1.0
    if cut:
        # The k-th largest OK score is the highest threshold whose FPR exceeds max_fpr:
        # thresholds above it flag at most k - 1 <= max_fpr * n_ok OK pixels. The tiny bump
        # guards floor() against 0.3 * n landing just under an integer; a larger k is safe.
        k = math.floor(max_fpr * n_ok * (1 + 1e-12)) + 1
        if k <= n_ok:
            ok_scores = scores[ok]
            floor_score = np.partition(ok_scores, n_ok - k)[n_ok - k]
            keep = scores >= floor_score
            scores, weights, ok = scores[keep], weights[keep], ok[keep]
        else:
            cut = False
    order = np.argsort(-scores, kind="stable")  # (N,) descending scores
    sorted_scores = scores[order]
    fp_cum = np.cumsum(ok[order], dtype=np.int64)
    pro_cum = np.cumsum(weights[order])
    # One point per distinct score: the last pixel of each run of equal scores.
    last = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = fp_cum[last] / n_ok
    pro = np.minimum(pro_cum[last] / n_regions, 1.0)  # cumsum rounding can pass 1 by 1e-16
    thresholds = sorted_scores[last]
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    if not cut:
        fpr, pro = np.append(fpr, 1.0), np.append(pro, 1.0)
    return ProCurve(fpr, pro, thresholds, n_regions, n_ok, max_fpr if cut else None)


def area_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under pro(fpr) from 0 to ``max_fpr``, interpolating the end point.

    ``fpr`` must be non-decreasing and reach ``max_fpr`` (the MVTec AD ``trapezoid``).
    """
    x, y = np.asarray(fpr, dtype=np.float64), np.asarray(pro, dtype=np.float64)
    inside = int(np.searchsorted(x, max_fpr, side="right"))  # points with x <= max_fpr
    if inside == 0 or (inside == x.size and x[-1] < max_fpr):
        raise ValueError(f"the curve does not span [0, {max_fpr}]")
    xs, ys = x[:inside], y[:inside]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < max_fpr:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_end) * (max_fpr - x0)
    return area


def pro_score(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valid: Sequence[np.ndarray] | None = None,
    max_fpr: float = PRO_MAX_FPR,
) -> float:
    """Normalised PRO: area under the PRO curve up to ``max_fpr`` (0.3), divided by it.

    1.0 for a map that ranks every region pixel above every OK pixel; about ``max_fpr / 2``
    for a random one. NaN with a warning when undefined (no region or no OK pixel).
    """
    curve = pro_curve(masks, maps, valid, max_fpr)
    if curve is None:
        return float("nan")
    return area_to(curve.fpr, curve.pro, max_fpr) / max_fpr


def mvtec_metrics(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    labels: ArrayLike | None = None,
    valid: Sequence[np.ndarray] | None = None,
    max_fpr: float = PRO_MAX_FPR,
) -> dict[str, float]:
    """The MVTec AD metric set for one category, each as officially defined.

    Image score = max of its anomaly map (over valid pixels); image label = ``labels`` or,
    without them, whether the mask has any defect pixel. Returns ``image_auroc``,
    ``image_f1_max``, ``pixel_auroc``, ``pixel_f1_max`` and ``pro`` (normalised, to
    ``max_fpr``); undefined entries are NaN with a warning.
    """
    if labels is None:
        y = np.array([np.asarray(m).astype(bool).any() for m in masks])
    else:
        y = np.asarray(labels).astype(bool).ravel()
        if y.size != len(maps):
            raise ValueError(f"{y.size} image labels for {len(maps)} anomaly maps")
    image_scores = []
    for i, amap in enumerate(maps):
        amap = np.asarray(amap, dtype=np.float64)
        keep = np.asarray(valid[i]).astype(bool) if valid is not None else np.ones(amap.shape, bool)
        image_scores.append(float(amap[keep].max()) if keep.any() else float("nan"))
    return {
        "image_auroc": image_auroc(y, image_scores),
        "image_f1_max": f1_max(y, image_scores)[0],
        "pixel_auroc": pixel_auroc(masks, maps, valid),
        "pixel_f1_max": pixel_f1_max(masks, maps, valid)[0],
        "pro": pro_score(masks, maps, valid, max_fpr),
    }
