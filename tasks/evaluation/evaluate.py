"""Turn slide heatmaps into predictions and metrics against whatever ground truth exists.

The decision threshold is calibrated on held-out normal (`val`) slides only, at the site's
target false-positive rate, so it never depends on test labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from tasks.evaluation.froc import froc, label_lesions, lesion_candidates
from tasks.evaluation.metrics import f1_max, image_auroc, pixel_auroc, threshold_at_fpr
from tasks.slides.ground_truth import ground_truth_mask

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Per-slide table (slide_id, split, label, score, predicted) and summary metrics."""

    table: pl.DataFrame
    metrics: dict[str, float]
    threshold: float
    froc_points: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)


def slide_threshold(val_scores: list[float], target_fpr: float) -> float:
    """Threshold on slide scores from held-out normal slides; NaN when there are none."""
    finite = [s for s in val_scores if np.isfinite(s)]
    if not finite:
        log.warning("no held-out normal slides scored: predictions have no calibrated threshold")
        return float("nan")
    return float(threshold_at_fpr(np.asarray(finite), target_fpr))


def evaluate_site(
    slides: pl.DataFrame,
    scores: dict[str, tuple[float, str]],
    heatmap_downsample: int,
    target_fpr: float,
    with_froc: bool,
) -> Evaluation:
    """Metrics over the test slides of one model.

    `scores` maps slide_id -> (slide score, heatmap .npy path), for val and test slides.
    """
    rows = slides.filter(pl.col("slide_id").is_in(list(scores)))
    val_scores = [scores[s][0] for s in rows.filter(pl.col("split") == "val")["slide_id"]]
    threshold = slide_threshold(val_scores, target_fpr)
    test = rows.filter(pl.col("split") == "test").sort("slide_id")
    table = test.select("slide_id", "split", "label", "category").with_columns(
        pl.Series("score", [scores[s][0] for s in test["slide_id"]], dtype=pl.Float64)
    )
    table = table.with_columns(
        predicted=pl.when(pl.lit(np.isfinite(threshold)))
        .then(pl.col("score") > threshold)
        .otherwise(None)
    )
    known = table.filter(pl.col("label") != "unknown")
    labels = (known["label"] == "anomalous").to_numpy()
    metrics: dict[str, float] = {
        "n_test_slides": float(test.height),
        "n_test_anomalous": float(labels.sum()),
        "threshold": threshold,
    }
    if known.height:
        metrics["slide_auroc"] = image_auroc(labels, known["score"].to_numpy())
        metrics["slide_f1_max"] = f1_max(labels, known["score"].to_numpy())[0]
        if np.isfinite(threshold):
            predicted = known["score"].to_numpy() > threshold
            metrics["slide_sensitivity"] = _rate(predicted[labels])
            metrics["slide_specificity"] = _rate(~predicted[~labels])

    truths, maps, valid = [], [], []
    lesion_masks, candidates = {}, {}
    annotated = test.filter(pl.col("label") != "unknown")
    for row in annotated.iter_rows(named=True):
        heatmap = np.load(scores[row["slide_id"]][1])
        truth = ground_truth_mask(
            row["annotation_uri"], row["width"], row["height"], heatmap_downsample
        )[: heatmap.shape[0], : heatmap.shape[1]]
        truths.append(truth > 0.5)
        maps.append(np.nan_to_num(heatmap, nan=0.0))
        valid.append(np.isfinite(heatmap))
        if with_froc:
            lesion_masks[row["slide_id"]] = (label_lesions(truth > 0.5), heatmap_downsample)
            floor = threshold if np.isfinite(threshold) else float(np.nanmedian(heatmap))
            candidates[row["slide_id"]] = lesion_candidates(
                np.nan_to_num(heatmap, nan=0.0), heatmap_downsample, floor * 0.5
            )
    has_truth = any(t.any() for t in truths)
    if has_truth:
        metrics["pixel_auroc"] = pixel_auroc(truths, maps, valid)
    froc_points: dict[str, float] = {}
    if with_froc and has_truth:
        normals = annotated.filter(pl.col("label") == "normal")["slide_id"].to_list()
        result = froc(candidates, lesion_masks, normals)
        metrics["froc"] = float(result.score)
        froc_points = {f"sens_at_{k}_fp": float(v) for k, v in _points(result).items()}
    return Evaluation(table, metrics, threshold, froc_points, candidates)


def _rate(flags: np.ndarray) -> float:
    return float(flags.mean()) if flags.size else float("nan")


def _points(result) -> dict[str, float]:
    return {str(fp).replace(".", "_"): s for fp, s in result.points().items()}
