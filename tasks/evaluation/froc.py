"""Camelyon16 lesion-level FROC: exact counting over every distinct detection probability.

Official definition (Camelyon16 ``Evaluation_FROC.py``, ``compute_FP_TP_Probs`` and
``computeFROC``), reproduced here:

- detections are (x, y, p) in level-0 pixels; a detection at (x, y) hits the lesion whose
  evaluation-mask pixel is (floor(y / ds), floor(x / ds)) (see ``tasks.evaluation.camelyon``
  for the mask: 75 um merging, filled holes, 8-connected regions, ITCs);
- on a tumour slide, a detection outside every lesion is a false positive; a detection on an
  isolated-tumour-cell region (ITC) is ignored, neither true nor false positive; each other
  lesion is detected once, at the highest probability among the detections that hit it, and
  further hits on it are ignored (not false positives);
- on a normal slide every detection is a false positive;
- for every threshold t (each distinct probability), sensitivity = detected lesions with
  p >= t / all non-ITC lesions, and average FPs = false positives with p >= t / number of
  slides; with the point (0 FPs, sensitivity 0) the points form the FROC curve;
- the score is the mean of the sensitivities at 1/4, 1/2, 1, 2, 4 and 8 average FPs per slide,
  read off the curve by linear interpolation (``np.interp``, which clamps beyond the last
  point, as the official script does).

One documented difference: the official script drops the lowest distinct probability as a
threshold (``all_probs[1:]``, meant to skip the 0 it stores for missed lesions), which also
drops a real operating point when every lesion was hit. Here a missed lesion is simply never
detected, and every distinct probability is a threshold. When at least one lesion is missed
and all probabilities are positive, the two give the same curve and score.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from vadflow.tasks.evaluation.camelyon import EvaluationMask
from vadflow.tasks.scoring.aggregate import Candidate, lesion_candidates

__all__ = [
    "FP_RATES",
    "Candidate",
    "EvaluationMask",
    "FrocResult",
    "froc",
    "label_lesions",
    "lesion_candidates",  # lives in tasks.scoring.aggregate; re-exported for old imports
]

FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

_EIGHT = np.ones((3, 3), dtype=bool)

# What ``froc`` accepts per slide: an EvaluationMask, or (labelled mask, downsample) with no ITCs.
LesionMask = EvaluationMask | tuple[np.ndarray, float]


def label_lesions(mask: np.ndarray) -> np.ndarray:
    """Label each 8-connected region of a binary lesion mask 1..n (0 = no lesion).

    Plain labelling, without the Camelyon16 rules; for those use
    ``tasks.evaluation.camelyon.evaluation_mask``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"lesion mask must be 2-D, got shape {mask.shape}")
    labelled, _ = ndimage.label(mask.astype(bool), structure=_EIGHT)
    return labelled.astype(np.int32)


@dataclass(frozen=True, eq=False)
class FrocResult:
    """FROC summary: ``score`` is the mean sensitivity at the six ``fp_rates``.

    ``thresholds``, ``sensitivity`` and ``avg_fps`` are the curve, one point per distinct
    detection probability, highest threshold first (the (0, 0) point before the first is
    implied). ``n_lesions`` excludes ITCs; ``n_itc`` counts them; ``n_ignored`` counts
    detections that were neither true nor false positives (duplicate hits and ITC hits).
    """

    score: float
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    thresholds: np.ndarray
    sensitivity: np.ndarray
    avg_fps: np.ndarray
    n_lesions: int
    n_slides: int
    n_itc: int = 0
    n_ignored: int = 0
    n_false_positives: int = 0

    def points(self) -> dict[float, float]:
        """Sensitivity by average false positives per slide, e.g. for logging to MLflow."""
        return dict(zip(self.fp_rates, self.sensitivities, strict=True))

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(average FPs per slide, sensitivity) from the (0, 0) point on, for plotting."""
        return (
            np.concatenate([[0.0], self.avg_fps]).astype(np.float64),
            np.concatenate([[0.0], self.sensitivity]).astype(np.float64),
        )


def _as_mask(slide: str, value: LesionMask) -> EvaluationMask:
    if isinstance(value, EvaluationMask):
        return value
    try:
        labelled, ds = value
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"slide {slide}: lesion mask must be an EvaluationMask or (labelled, downsample)"
        ) from exc
    return EvaluationMask(np.asarray(labelled), float(ds))


def _lesion_at(labelled: np.ndarray, downsample: float, x: float, y: float) -> int:
    col, row = int(np.floor(x / downsample)), int(np.floor(y / downsample))
    if 0 <= row < labelled.shape[0] and 0 <= col < labelled.shape[1]:
        return int(labelled[row, col])
    return 0  # off the mask: cannot be inside a lesion


def froc(
    candidates_per_slide: Mapping[str, Sequence[Candidate]],
    lesion_masks: Mapping[str, LesionMask],
    normal_slides: Sequence[str],
    *,
    interpolation: Literal["linear", "step"] = "linear",
    fp_rates: Sequence[float] = FP_RATES,
) -> FrocResult:
    """Camelyon16 FROC over a set of slides (official definition in the module docstring).

    ``lesion_masks`` maps each tumour slide to its ``EvaluationMask`` (ITCs ignored) or to
    (labelled mask, downsample from level 0) (no ITCs). ``normal_slides`` have no lesions, so
    all their detections are false positives (a normal slide may also appear in
    ``lesion_masks`` with an empty mask). Every slide in either counts towards the number of
    slides, with or without detections. ``interpolation="linear"`` reads sensitivities as the
    official script does; ``"step"`` takes the best sensitivity among operating points with
    average FPs <= the rate (never above the curve's real points). A slide with detections
    but no ground truth raises ValueError; with no countable lesion (none, or only ITCs) the
    score is NaN with a warning.
    """
    if interpolation not in ("linear", "step"):
        raise ValueError(f"interpolation must be 'linear' or 'step', got {interpolation!r}")
    masks = {s: _as_mask(s, m) for s, m in lesion_masks.items()}
    normal = set(normal_slides)
    # A normal slide may come with an (empty) lesion mask; one with lesions is a contradiction.
    both = sorted(s for s in normal & set(masks) if np.any(masks[s].labels))
    if both:
        raise ValueError(f"slides {both} are listed as normal but their masks have lesions")
    masks = {s: m for s, m in masks.items() if s not in normal}
    unknown = set(candidates_per_slide) - normal - set(masks)
    if unknown:
        raise ValueError(
            f"candidates for slides {sorted(unknown)} with no ground truth; add them to "
            "normal_slides or lesion_masks"
        )
    n_slides = len(normal | set(masks))

    # Per lesion the best probability that hits it (None: missed); per FP its probability.
    lesion_best: dict[tuple[str, int], float | None] = {}
    fp_probs: list[float] = []
    n_itc = n_ignored = 0
    for slide, mask in masks.items():
        n_itc += len(mask.itc)
        for lesion in mask.lesion_ids:
            lesion_best[(slide, lesion)] = None
        for x, y, p in candidates_per_slide.get(slide, ()):
            lesion = _lesion_at(mask.labels, mask.downsample, x, y)
            if lesion == 0:
                fp_probs.append(float(p))
                continue
            key = (slide, lesion)
            if key not in lesion_best:  # an ITC
                n_ignored += 1
                continue
            best = lesion_best[key]
            if best is not None:
                n_ignored += 1  # every hit but the best one is ignored; count each once
            lesion_best[key] = float(p) if best is None else max(best, float(p))
    for slide in sorted(normal):
        fp_probs += [float(p) for _, _, p in candidates_per_slide.get(slide, ())]
    n_lesions = len(lesion_best)

    tp_probs = np.array([p for p in lesion_best.values() if p is not None], dtype=np.float64)
    fps = np.asarray(fp_probs, dtype=np.float64)
    if not (np.all(np.isfinite(tp_probs)) and np.all(np.isfinite(fps))):
        raise ValueError("detection probabilities must be finite")
    thresholds = np.unique(np.concatenate([tp_probs, fps]))[::-1]  # descending
    # Counts of probabilities >= each threshold, by sorted search.
    tp_sorted, fp_sorted = np.sort(tp_probs), np.sort(fps)
    tp_count = tp_sorted.size - np.searchsorted(tp_sorted, thresholds, side="left")
    fp_count = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")
    avg_fps = fp_count / max(n_slides, 1)

    rates = tuple(float(r) for r in fp_rates)
    if n_lesions == 0:
        what = "only isolated tumour cells" if n_itc else "only normal slides"
        warnings.warn(
            f"FROC is undefined without lesions ({what}); reporting NaN",
            UserWarning,
            stacklevel=2,
        )
        sens_curve = np.full(thresholds.shape, np.nan)
        sens_at = tuple(float("nan") for _ in rates)
        score = float("nan")
    else:
        sens_curve = tp_count / n_lesions
        # The "threshold above everything" point (0 FPs, 0 sensitivity) starts the curve.
        xs = np.concatenate([[0.0], avg_fps])
        ys = np.concatenate([[0.0], sens_curve])
        if interpolation == "linear":
            # xs is non-decreasing; at tied xs np.interp takes the last (highest) point.
            sens_at = tuple(float(v) for v in np.interp(rates, xs, ys))
        else:
            sens_at = tuple(float(ys[xs <= rate].max()) for rate in rates)
        score = float(np.mean(sens_at))
    return FrocResult(
        score=score,
        fp_rates=rates,
        sensitivities=sens_at,
        thresholds=thresholds,
        sensitivity=sens_curve,
        avg_fps=avg_fps,
        n_lesions=int(n_lesions),
        n_slides=n_slides,
        n_itc=int(n_itc),
        n_ignored=int(n_ignored),
        n_false_positives=int(fps.size),
    )
