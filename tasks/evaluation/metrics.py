"""Image-, pixel- and threshold-level metrics for anomaly scores.

Convention everywhere: a higher score means "more anomalous", and label True / mask True means
anomalous. Metrics that are undefined for the data given (one class only) return NaN with a
warning instead of raising, so one degenerate site never kills a nightly run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve


class UndefinedMetricWarning(UserWarning):
    """A metric could not be computed from the data given and was reported as NaN."""


def _labels_and_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"scores contain {int(np.sum(~np.isfinite(s)))} non-finite values; "
            "fix the detector output (NaN guard) before evaluating"
        )
    return y, s


def _one_class(y: np.ndarray, metric: str) -> bool:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        which = "anomalous" if n_pos == y.size else "normal"
        warnings.warn(
            f"{metric} is undefined: all {y.size} samples are {which}; reporting NaN. "
            "The evaluation set needs both normal and anomalous samples.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return True
    return False


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image (or slide / tile) scores against binary labels.

    Definition: the probability that a random anomalous sample scores higher than a random
    normal one, ties counting one half (sklearn's ``roc_auc_score``). Returns NaN, with an
    ``UndefinedMetricWarning``, when only one class is present.
    """
    y, s = _labels_and_scores(labels, scores)
    if _one_class(y, "image AUROC"):
        return float("nan")
    return float(roc_auc_score(y, s))


def pool_pixels(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valid: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel labels and scores of all images, flattened and concatenated: (labels, scores).

    Where ``valid`` is given, only pixels with valid True are kept. Per image, mask, map and
    valid must have the same shape; a mismatch raises ValueError naming the image index.
    Non-finite scores among the kept pixels raise ValueError.
    """
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    if valid is not None and len(valid) != len(masks):
        raise ValueError(f"got {len(valid)} valid masks for {len(masks)} images")
    ys: list[np.ndarray] = []
    ss: list[np.ndarray] = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask = np.asarray(mask)
        amap = np.asarray(amap)
        if mask.shape != amap.shape:
            raise ValueError(
                f"image {i}: mask shape {mask.shape} != anomaly map shape {amap.shape}; "
                "resize the map to the mask before evaluating"
            )
        keep = None
        if valid is not None:
            keep = np.asarray(valid[i]).astype(bool)
            if keep.shape != mask.shape:
                raise ValueError(
                    f"image {i}: valid mask shape {keep.shape} != mask shape {mask.shape}"
                )
        ys.append(mask.astype(bool)[keep] if keep is not None else mask.astype(bool).ravel())
        ss.append(amap[keep] if keep is not None else amap.ravel())
    if not ys:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float64)
    return _labels_and_scores(np.concatenate(ys), np.concatenate(ss))


def pixel_auroc(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valid: Sequence[np.ndarray] | None = None,
) -> float:
    """Pixel-level AUROC, pooling pixels over all images.

    Definition (MVTec AD): ROC AUC of the anomaly-map values against the ground-truth mask,
    over the union of all images' pixels (not a mean of per-image AUROCs, so large images weigh
    more). Where ``valid`` is given, only pixels with valid True count (e.g. tissue, so glass
    background does not inflate the score). Per image, mask, map and valid must have the same
    shape; a mismatch raises ValueError naming the image index. NaN with a warning for one
    class.
    """
    y, s = pool_pixels(masks, maps, valid)
    if y.size == 0:
        warnings.warn(
            "pixel AUROC of no images; reporting NaN", UndefinedMetricWarning, stacklevel=2
        )
        return float("nan")
    if _one_class(y, "pixel AUROC"):
        return float("nan")
    return float(roc_auc_score(y, s))


def pixel_f1_max(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valid: Sequence[np.ndarray] | None = None,
) -> tuple[float, float]:
    """Pixel-level F1-max over pooled pixels (``f1_max`` on ``pool_pixels``): (F1, threshold)."""
    y, s = pool_pixels(masks, maps, valid)
    if y.size == 0:
        warnings.warn("F1-max of no images; reporting NaN", UndefinedMetricWarning, stacklevel=2)
        return float("nan"), float("nan")
    return f1_max(y, s)


def roc_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve as (false-positive rate, true-positive rate), from (0, 0) to (1, 1).

    One point per distinct score (sklearn's ``roc_curve`` without dropping collinear points),
    for plotting; its trapezoid area is ``image_auroc``. Empty arrays, with a warning, for
    one class.
    """
    y, s = _labels_and_scores(labels, scores)
    if _one_class(y, "ROC curve"):
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold that reaches it.

    Definition: F1 = 2PR / (P + R) at each threshold of the precision-recall curve (a sample is
    predicted anomalous when score >= threshold); returns (max F1, its threshold). This is an
    oracle number (the threshold is chosen on the test labels), reported for comparison with
    the literature, never used to set an operating threshold. (NaN, NaN) for one class.
    """
    y, s = _labels_and_scores(labels, scores)
    if _one_class(y, "F1-max"):
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (P=1, R=0) point has no threshold; drop it so the arrays line up.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def threshold_at_fpr(normal_scores: ArrayLike, target_fpr: float) -> float:
    """Operating threshold that flags about ``target_fpr`` of normal samples.

    Definition: the (1 - target_fpr) quantile (numpy's linear interpolation) of scores from
    normal-only validation data; a sample is called anomalous when its score exceeds it. Never
    the minimum or maximum of the scores, which would make the false-positive rate depend on a
    single outlier.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("no normal validation scores to calibrate a threshold on")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"normal scores contain {int(np.sum(~np.isfinite(s)))} non-finite values")
    return float(np.quantile(s, 1.0 - target_fpr))
