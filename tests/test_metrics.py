"""Evaluation metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vadflow.tasks.evaluation.camelyon import EvaluationMask
from vadflow.tasks.evaluation.froc import FP_RATES, froc, label_lesions, lesion_candidates
from vadflow.tasks.evaluation.metrics import (
    UndefinedMetricWarning,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
    roc_points,
    threshold_at_fpr,
)
from vadflow.tasks.evaluation.pro import area_to, mvtec_metrics, pro_curve, pro_score

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


def test_lesion_candidates_capped_to_the_strongest_at_a_lesion_scale() -> None:
    from vadflow.tasks.scoring.aggregate import candidate_spacing

    rng = np.random.default_rng(1)
    heatmap = rng.random((60, 80))  # noise: hundreds of local maxima
    every = lesion_candidates(heatmap, 16.0, threshold=0.5)
    capped = lesion_candidates(heatmap, 16.0, threshold=0.5, max_candidates=10)
    assert len(every) > 100 and capped == every[:10]
    # 100 um at 0.25 um/px and downsample 16 is 25 heatmap px: few candidates survive.
    spacing = candidate_spacing(100.0, 0.25, 16.0)
    assert spacing == 25 and candidate_spacing(0.5, 0.25, 16.0) == 1
    assert candidate_spacing(64.0, None, 8.0) == 8  # no MPP: the radius is in level-0 px
    sparse = lesion_candidates(heatmap, 16.0, threshold=0.5, min_distance=spacing)
    assert 1 <= len(sparse) <= (60 // 25 + 1) * (80 // 25 + 1)
    rows = [round(y / 16 - 0.5) for _, y, _ in sparse]
    cols = [round(x / 16 - 0.5) for x, _, _ in sparse]
    for i in range(len(sparse)):
        for j in range(i):
            assert max(abs(rows[i] - rows[j]), abs(cols[i] - cols[j])) >= spacing
    with pytest.raises(ValueError, match="max_candidates"):
        lesion_candidates(heatmap, 16.0, threshold=0.5, max_candidates=0)


def test_lesion_candidates_of_a_float32_heatmap_equal_its_float64_copy() -> None:
    rng = np.random.default_rng(0)
    heatmap = rng.random((40, 60)).astype(np.float32)
    heatmap[3:8, 3:8] = 0.05
    heatmap[5, 5] = np.float32(0.1)  # a peak of its own: above 0.1 in float64, not in float32
    heatmap[:, :3] = np.nan
    for threshold in (0.1, 0.5, 0.9):
        wide = lesion_candidates(heatmap.astype(np.float64), 16.0, threshold)
        assert lesion_candidates(heatmap, 16.0, threshold) == wide


@pytest.mark.parametrize("min_distance", [1, 2, 3, 5])
def test_candidate_suppression_by_buckets_equals_comparing_every_pair(min_distance: int) -> None:
    from vadflow.tasks.scoring.aggregate import _suppress_near

    rng = np.random.default_rng(min_distance)
    rows = rng.uniform(0, 60, 3000).round(1)  # centres of mass land between cells
    cols = rng.uniform(0, 60, 3000).round(1)
    values = rng.integers(0, 50, 3000) / 50  # ties, like plateaus of equal maxima
    points = sorted(zip(rows, cols, values, strict=True), key=lambda t: -t[2])
    kept: list = []
    for r, c, p in points:  # the reference: every kept point, every time
        if all(max(abs(r - kr), abs(c - kc)) >= min_distance for kr, kc, _ in kept):
            kept.append((r, c, p))
    assert _suppress_near(points, min_distance) == kept


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


# ---------------------------------------------------------------- Camelyon16 FROC, exact


def _itc_slide() -> EvaluationMask:
    """Lesion 1 at level-0 [16, 48)^2 counts; lesion 2 at [80, 112)^2 is an ITC."""
    labels = np.zeros((8, 8), dtype=np.int32)
    labels[1:3, 1:3] = 1
    labels[5:7, 5:7] = 2
    return EvaluationMask(labels, 16.0, frozenset({2}))


def test_froc_hits_on_itcs_are_neither_tp_nor_fp() -> None:
    candidates = {
        "tumor_1": [
            (90.0, 90.0, 0.95),  # on the ITC: ignored, not even an operating point
            (120.0, 10.0, 0.5),  # outside: FP
            (20.0, 20.0, 0.6),  # lesion 1: TP
        ],
        "normal_1": [(10.0, 10.0, 0.7)],  # FP
        # normal_2: no detections, still one of the three slides
    }
    result = froc(candidates, {"tumor_1": _itc_slide()}, ["normal_1", "normal_2"])
    assert (result.n_lesions, result.n_itc, result.n_slides) == (1, 1, 3)
    assert (result.n_ignored, result.n_false_positives) == (1, 2)
    # Thresholds 0.7 -> (1/3 FP, sens 0); 0.6 -> (1/3, 1); 0.5 -> (2/3, 1).
    assert list(result.thresholds) == [0.7, 0.6, 0.5]
    assert list(result.sensitivity) == [0.0, 1.0, 1.0]
    assert result.avg_fps == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    # Curve (0,0) (1/3,0) (1/3,1) (2/3,1): at 1/4 still 0, from 1/2 on 1.
    assert result.sensitivities == (0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert result.score == pytest.approx(5 / 6)

    # The same labels without the ITC rule: the 0.95 hit is a detected second lesion.
    plain = froc(candidates, {"tumor_1": (_itc_slide().labels, 16.0)}, ["normal_1", "normal_2"])
    assert (plain.n_lesions, plain.n_itc, plain.n_ignored) == (2, 0, 0)
    # (0,0) (0,.5) (1/3,.5) (1/3,1) (2/3,1): 0.5 at 1/4 FPs, 1 from 1/2 on.
    assert plain.score == pytest.approx((0.5 + 5) / 6)


def test_froc_only_itcs_is_nan() -> None:
    labels = np.zeros((4, 4), np.int32)
    labels[1, 1] = 1
    with pytest.warns(UserWarning, match="only isolated tumour cells"):
        result = froc({}, {"t": EvaluationMask(labels, 1.0, frozenset({1}))}, [])
    assert math.isnan(result.score) and result.n_itc == 1


def test_froc_duplicate_hits_keep_the_best_in_any_order() -> None:
    candidates = {"tumor_1": [(40.0, 40.0, 0.3), (120.0, 10.0, 0.5), (20.0, 20.0, 0.9)]}
    result = froc(candidates, {"tumor_1": _two_lesion_slide()}, [])
    # A's best hit is 0.9 (listed last); the 0.3 hit is ignored: thresholds 0.9 and 0.5 only.
    assert list(result.thresholds) == [0.9, 0.5]
    assert list(result.sensitivity) == [0.5, 0.5]
    assert result.n_ignored == 1 and result.n_false_positives == 1
    assert result.sensitivities == (0.5,) * 6


def test_froc_empty_slides_count_and_miss() -> None:
    one_lesion = np.zeros((8, 8), np.int32)
    one_lesion[4:6, 4:6] = 1
    masks = {"tumor_1": _two_lesion_slide(), "tumor_2": (one_lesion, 16.0)}
    result = froc({"tumor_1": [(20.0, 20.0, 0.9)]}, masks, ["normal_1"])
    # 3 lesions on 3 slides; tumor_2 and normal_1 have no detections at all.
    assert (result.n_lesions, result.n_slides) == (3, 3)
    assert result.sensitivities == pytest.approx((1 / 3,) * 6)
    # No detections anywhere: only the (0, 0) point, sensitivity 0 everywhere.
    nothing = froc({}, masks, ["normal_1"])
    assert nothing.thresholds.size == 0 and nothing.score == 0.0


def test_froc_ties_form_one_operating_point_and_interpolate() -> None:
    candidates = {
        "tumor_1": [(20.0, 20.0, 0.8), (120.0, 10.0, 0.8), (90.0, 90.0, 0.4)],
        "normal_1": [(5.0, 5.0, 0.4)],
    }
    masks = {"tumor_1": _two_lesion_slide()}
    result = froc(candidates, masks, ["normal_1"])
    # A TP and an FP share 0.8: one point (1/2 FP, 1/2); then 0.4: (1, 1).
    assert list(result.thresholds) == [0.8, 0.4]
    assert list(result.avg_fps) == [0.5, 1.0] and list(result.sensitivity) == [0.5, 1.0]
    # Linear reading along (0,0) (1/2,1/2) (1,1): 1/4 FPs -> 1/4.
    assert result.sensitivities == pytest.approx((0.25, 0.5, 1, 1, 1, 1))
    assert result.score == pytest.approx(4.75 / 6)
    step = froc(candidates, masks, ["normal_1"], interpolation="step")
    assert step.sensitivities == (0.0, 0.5, 1.0, 1.0, 1.0, 1.0)
    xs, ys = result.curve()
    assert list(xs) == [0.0, 0.5, 1.0] and list(ys) == [0.0, 0.5, 1.0]


def _official_froc_score(slides: list[tuple[bool, np.ndarray, list[int], list, float]]) -> float:
    """A line-by-line port of Camelyon16 Evaluation_FROC.py (compute_FP_TP_Probs, computeFROC)."""
    all_fps, all_tps, n_tumours = [], [], []
    for is_tumor, mask, itcs, cands, ds in slides:
        max_label = int(mask.max())
        fp_probs, tp_probs = [], np.zeros((max_label,), dtype=np.float64)
        for x, y, p in cands:
            if not is_tumor:
                fp_probs.append(p)
                continue
            hit = int(mask[int(y // ds), int(x // ds)])
            if hit == 0:
                fp_probs.append(p)
            elif hit not in itcs and p > tp_probs[hit - 1]:
                tp_probs[hit - 1] = p
        all_fps += fp_probs
        all_tps += list(tp_probs)
        n_tumours.append(max_label - len(itcs))
    all_probs = sorted(set(all_fps + all_tps))
    total_fps, total_tps = [], []
    for thresh in all_probs[1:]:
        total_fps.append((np.asarray(all_fps) >= thresh).sum())
        total_tps.append((np.asarray(all_tps) >= thresh).sum())
    total_fps.append(0)
    total_tps.append(0)
    fps = np.asarray(total_fps) / float(len(slides))
    sens = np.asarray(total_tps) / float(sum(n_tumours))
    return float(np.mean(np.interp([0.25, 0.5, 1, 2, 4, 8], fps[::-1], sens[::-1])))


@pytest.mark.parametrize("seed", range(8))
def test_froc_matches_the_official_script(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = 8.0
    slides, candidates, masks, normals = [], {}, {}, []
    for index in range(int(rng.integers(2, 6))):
        name = f"s{index}"
        is_tumour = index == 0 or rng.random() < 0.5
        labels = label_lesions(rng.random((12, 12)) < 0.15) if is_tumour else np.zeros((12, 12))
        n = int(labels.max())
        itcs = [i for i in range(1, n + 1) if rng.random() < 0.3]
        # Probabilities on a coarse grid, so ties between TPs and FPs happen.
        cands = [
            (float(rng.uniform(0, 96)), float(rng.uniform(0, 96)), float(rng.integers(1, 20)) / 20)
            for _ in range(int(rng.integers(0, 15)))
        ]
        slides.append((is_tumour, labels, itcs, cands, ds))
        candidates[name] = cands
        if is_tumour:
            masks[name] = EvaluationMask(labels.astype(np.int32), ds, frozenset(itcs))
        else:
            normals.append(name)
    # A tumour slide with one lesion and no detections: a missed lesion, as the official
    # script needs for its all_probs[1:] to drop only the placeholder 0.
    missed = np.zeros((12, 12), np.int32)
    missed[3:6, 3:6] = 1
    slides.append((True, missed, [], [], ds))
    masks["missed"] = EvaluationMask(missed, ds)
    result = froc(candidates, masks, normals)
    assert result.score == pytest.approx(_official_froc_score(slides), abs=1e-12)


# ---------------------------------------------------------------- pixel metrics, PRO


def test_pixel_f1_max_and_roc_points() -> None:
    mask = np.array([[1, 0], [0, 0]], dtype=bool)
    amap = np.array([[0.9, 0.1], [0.2, 0.95]])
    # Pooled: 0.95 (neg) 0.9 (pos): best F1 at 0.9 with P=1/2, R=1 -> 2/3.
    assert pixel_f1_max([mask], [amap]) == (pytest.approx(2 / 3), 0.9)
    assert pixel_f1_max([mask], [amap], [np.array([[1, 1], [1, 0]], bool)])[0] == 1.0
    fpr, tpr = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]))


def _pro_row(r1_second: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One row: region R1 = px 0-1, region R2 = px 3, ten normal pixels."""
    mask = np.array([[1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)
    scores = [0.9, r1_second, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.15, 0.12, 0.11, 0.05, 0.01]
    return mask, np.array([scores])


def test_pro_hand_computed() -> None:
    mask, amap = _pro_row()
    # t=.9: PRO (1/2 + 0)/2 = .25, FPR 0; .8: FPR .1; .7: PRO .75; .6: FPR .2; .5: PRO 1;
    # .4: FPR .3. Area to .3 = .25*.1 + .75*.1 + 1*.1 = .2, normalised 2/3.
    assert pro_score([mask], [amap]) == pytest.approx(0.2 / 0.3)
    curve = pro_curve([mask], [amap], max_fpr=None)
    assert curve.fpr[:7] == pytest.approx([0, 0, 0.1, 0.1, 0.2, 0.2, 0.3])
    assert curve.pro[:7] == pytest.approx([0, 0.25, 0.25, 0.75, 0.75, 1, 1])
    assert (curve.fpr[-1], curve.pro[-1]) == (1.0, 1.0)
    assert (curve.n_regions, curve.n_normal_pixels) == (2, 10)
    # The cut curve stops at the first point past 0.3 and integrates the same.
    cut = pro_curve([mask], [amap], max_fpr=0.25)
    assert cut.fpr[-1] == pytest.approx(0.3) and cut.fpr.size == 7
    # To 0.25: .025 + .075 + 1 * .05 = .15.
    assert pro_score([mask], [amap], max_fpr=0.25) == pytest.approx(0.15 / 0.25)


def test_pro_ties_merge_into_one_point() -> None:
    mask, amap = _pro_row(r1_second=0.6)  # R1's second pixel ties with a normal pixel at .6
    # (.1, .75) -> (.2, 1) in one step: .025 + (.75 + 1) / 2 * .1 + .1 = .2125.
    assert pro_score([mask], [amap]) == pytest.approx(0.2125 / 0.3)


def test_pro_perfect_inverted_and_split_over_images() -> None:
    mask, amap = _pro_row()
    assert pro_score([mask], [mask.astype(float)]) == 1.0
    assert pro_score([mask], [1.0 - mask]) == 0.0
    # The same pixels split over two images pool to the same number.
    assert pro_score([mask[:, :4], mask[:, 4:]], [amap[:, :4], amap[:, 4:]]) == pytest.approx(
        0.2 / 0.3
    )


def test_pro_undefined_is_nan() -> None:
    with pytest.warns(UndefinedMetricWarning, match="no anomalous region"):
        assert math.isnan(pro_score([np.zeros((2, 2), bool)], [np.zeros((2, 2))]))
    with pytest.warns(UndefinedMetricWarning, match="no normal pixel"):
        assert math.isnan(pro_score([np.ones((2, 2), bool)], [np.zeros((2, 2))]))


def _brute_pro(masks, maps, valid, max_fpr: float) -> float:
    """Every threshold by hand: mean per-region overlap and pooled FPR, then the area."""
    regions, ok_scores, all_scores = [], [], []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        keep = valid[i] if valid is not None else np.ones(mask.shape, bool)
        labelled = label_lesions(mask)
        for r in range(1, labelled.max() + 1):
            if (sel := (labelled == r) & keep).any():
                regions.append(amap[sel])
        ok_scores.append(amap[(labelled == 0) & keep])
        all_scores.append(amap[keep])
    ok = np.concatenate(ok_scores)
    xs, ys = [0.0], [0.0]
    for t in np.unique(np.concatenate(all_scores))[::-1]:
        xs.append(float(np.mean(ok >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return area_to(np.array([*xs, 1.0]), np.array([*ys, 1.0]), max_fpr) / max_fpr


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_pro_matches_brute_force(seed: int, max_fpr: float) -> None:
    rng = np.random.default_rng(seed)
    masks = [rng.random((9, 11)) < 0.2 for _ in range(3)]
    # Scores on a coarse grid (ties), higher inside defects on average.
    maps = [np.round(rng.random(m.shape) + 0.5 * m, 1) for m in masks]
    valid = [rng.random(m.shape) < 0.9 for m in masks] if seed % 2 else None
    expected = _brute_pro(masks, maps, valid, max_fpr)
    assert pro_score(masks, maps, valid, max_fpr) == pytest.approx(expected, abs=1e-12)


def test_mvtec_metrics_set() -> None:
    good = np.zeros((4, 4), bool)
    bad = good.copy()
    bad[1:3, 1:3] = True
    maps = [np.full((4, 4), 0.1), np.where(bad, 0.9, 0.2)]
    metrics = mvtec_metrics([good, bad], maps)
    assert metrics == {
        "image_auroc": 1.0,
        "image_f1_max": 1.0,
        "pixel_auroc": 1.0,
        "pixel_f1_max": 1.0,
        "pro": 1.0,
    }
