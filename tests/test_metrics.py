"""Evaluation metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluation.froc import FP_RATES, froc, label_lesions, lesion_candidates
from tasks.evaluation.metrics import (
    UndefinedMetricWarning,
    f1_max,
    image_auroc,
    pixel_auroc,
    threshold_at_fpr,
)

LABELS = [False, False, False, True, True]


def test_image_auroc_perfect_inverted_random() -> None:
    assert image_auroc(LABELS, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert image_auroc(LABELS, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    # Pairs (pos, neg): 0.5 beats {0.4} and ties 0.5 (half), 0.2 beats none -> (1 + 0.5) / 6.
    assert image_auroc(LABELS, [0.4, 0.5, 0.6, 0.5, 0.2]) == pytest.approx(1.5 / 6)
    rng = np.random.default_rng(0)
    labels = rng.random(4000) < 0.3
    assert image_auroc(labels, rng.random(4000)) == pytest.approx(0.5, abs=0.03)


def test_image_auroc_one_class_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetricWarning, match="all 3 samples are normal"):
        assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))


def test_pixel_auroc_pools_only_valid_pixels() -> None:
    mask = np.array([[1, 0], [0, 0]], dtype=bool)
    amap = np.array([[0.9, 0.1], [0.2, 0.95]])  # background pixel (1,1) outranks the lesion
    assert pixel_auroc([mask], [amap]) == pytest.approx(2 / 3)
    valid = np.array([[1, 1], [1, 0]], dtype=bool)  # (1,1) is glass: not counted
    assert pixel_auroc([mask], [amap], [valid]) == 1.0
    # Pooled over images: the second image's normal pixel 0.95 beats the first's lesion 0.9.
    mask2, amap2 = np.zeros((1, 2), bool), np.array([[0.95, 0.0]])
    assert pixel_auroc([mask, mask2], [amap, amap2], [valid, np.ones((1, 2), bool)]) == (
        pytest.approx(3 / 4)
    )


def test_pixel_auroc_shape_mismatch_names_image() -> None:
    ok = np.zeros((2, 2), bool)
    with pytest.raises(ValueError, match="image 1"):
        pixel_auroc([ok, ok], [np.zeros((2, 2)), np.zeros((3, 2))])
    with pytest.raises(ValueError, match="image 0: valid"):
        pixel_auroc([ok], [np.zeros((2, 2))], [np.ones((2, 3), bool)])


def test_f1_max() -> None:
    f1, threshold = f1_max(LABELS, [0.1, 0.2, 0.3, 0.8, 0.9])
    assert (f1, threshold) == (1.0, 0.8)
    # Scores 0.9 (pos) 0.7 (neg) 0.6 (pos): at t=0.6, P=2/3, R=1, F1=0.8 beats t=0.9 (F1=2/3).
    f1, threshold = f1_max([1, 0, 1, 0], [0.9, 0.7, 0.6, 0.1])
    assert f1 == pytest.approx(0.8) and threshold == 0.6


def test_threshold_at_fpr_is_quantile_not_min() -> None:
    scores = np.arange(100, dtype=float)  # 0..99
    assert threshold_at_fpr(scores, 0.05) == pytest.approx(94.05)
    assert np.mean(scores > threshold_at_fpr(scores, 0.05)) == pytest.approx(0.05)
    assert threshold_at_fpr(scores, 0.5) == pytest.approx(49.5)
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr(scores, 0.0)
    with pytest.raises(ValueError, match="no normal"):
        threshold_at_fpr([], 0.1)


def test_label_lesions_uses_8_connectivity() -> None:
    mask = np.array(
        [
            [1, 0, 0, 0],
            [0, 1, 0, 0],  # diagonal neighbour of (0,0): same lesion
            [0, 0, 0, 1],
        ]
    )
    labelled = label_lesions(mask)
    assert labelled.max() == 2
    assert labelled[0, 0] == labelled[1, 1] != labelled[2, 3]


def test_lesion_candidates_local_maxima_in_level0() -> None:
    heatmap = np.zeros((10, 10))
    heatmap[2, 3] = 0.9  # a peak
    heatmap[2, 4] = 0.7  # its shoulder: not a separate candidate
    heatmap[7, 7] = heatmap[7, 8] = 0.6  # a plateau: one candidate at its centre
    heatmap[0, 9] = 0.4  # below threshold
    cands = lesion_candidates(heatmap, downsample=32.0, threshold=0.5)
    assert cands == [
        ((3 + 0.5) * 32, (2 + 0.5) * 32, 0.9),
        ((7.5 + 0.5) * 32, (7 + 0.5) * 32, 0.6),
    ]
    assert lesion_candidates(heatmap, 32.0, threshold=0.95) == []


def test_lesion_candidates_region_suppressed_by_neighbour_still_counts() -> None:
    heatmap = np.zeros((1, 6))
    heatmap[0, 0] = 0.9
    heatmap[0, 2] = 0.6  # separate region (gap at col 1) inside the 0.9 peak's window
    cands = lesion_candidates(heatmap, 1.0, threshold=0.5, min_distance=2)
    assert [p for _, _, p in cands] == [0.9, 0.6]


def _two_lesion_slide() -> tuple[np.ndarray, float]:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:3, 1:3] = True  # lesion A: level-0 [16, 48) at downsample 16
    mask[5:7, 5:7] = True  # lesion B: level-0 [80, 112)
    return label_lesions(mask), 16.0


def test_froc_counts_each_lesion_once_and_fps_outside() -> None:
    candidates = {
        "tumor_1": [
            (20.0, 20.0, 0.9),  # hits A
            (40.0, 40.0, 0.6),  # hits A again: neither TP nor FP
            (120.0, 10.0, 0.8),  # outside both lesions: FP
            (90.0, 90.0, 0.3),  # hits B
        ]
    }
    result = froc(candidates, {"tumor_1": _two_lesion_slide()}, normal_slides=[])
    assert result.n_lesions == 2 and result.n_slides == 1
    # Operating points by threshold: 0.9 -> (FP 0, sens 1/2), 0.8 -> (1, 1/2), 0.3 -> (1, 1).
    # The second hit on A (0.6) is ignored, so it is not even an operating point.
    assert list(result.thresholds) == [0.9, 0.8, 0.3]
    assert list(result.avg_fps) == [0, 1, 1]
    assert list(result.sensitivity) == [0.5, 0.5, 1.0]
    assert result.fp_rates == FP_RATES
    assert result.sensitivities == (0.5, 0.5, 1.0, 1.0, 1.0, 1.0)
    assert result.score == pytest.approx(5 / 6)
    assert 0.0 <= result.score <= 1.0


def test_froc_normal_slides_add_fps_and_dilute_rate() -> None:
    candidates = {
        "tumor_1": [(20.0, 20.0, 0.9), (90.0, 90.0, 0.3)],
        "normal_1": [(10.0, 10.0, 0.5)],
    }
    result = froc(
        candidates, {"tumor_1": _two_lesion_slide()}, normal_slides=["normal_1", "normal_2"]
    )
    assert result.n_slides == 3
    # 0.9 -> (0, 1/2); 0.5 -> (1/3, 1/2); 0.3 -> (1/3, 1).
    assert result.sensitivities == (0.5, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert result.points()[0.25] == 0.5
    # A normal slide may also carry an empty lesion mask; one with lesions is an error.
    empty = (np.zeros((8, 8), np.int32), 16.0)
    masks = {"tumor_1": _two_lesion_slide(), "normal_1": empty, "normal_2": empty}
    assert froc(candidates, masks, ["normal_1", "normal_2"]).sensitivities == (result.sensitivities)
    with pytest.raises(ValueError, match="normal but"):
        froc(candidates, {"normal_1": _two_lesion_slide()}, ["normal_1"])
    with pytest.raises(ValueError, match="ghost"):
        froc({"ghost": []}, {"tumor_1": _two_lesion_slide()}, normal_slides=[])


def test_froc_without_lesions_is_nan() -> None:
    with pytest.warns(UserWarning, match="without lesions"):
        result = froc({"n": [(1.0, 1.0, 0.5)]}, {}, normal_slides=["n"])
    assert math.isnan(result.score)
