"""Lesion candidates from slide heatmaps, and a FROC-style lesion-detection summary.

This is a *FROC-style summary*, not yet the official Camelyon16 evaluation. It follows the
Camelyon16 counting rules (a candidate inside a lesion is a hit for that lesion, each lesion is
counted once at the highest probability that hits it, further hits in the same lesion are
neither true nor false positives, every candidate outside all lesions is a false positive;
sensitivity read at 1/4, 1/2, 1, 2, 4 and 8 average false positives per slide; the score is the
mean of those six sensitivities). What it does *not* do yet is build the Camelyon16 evaluation
mask: lesions are the plain 8-connected regions of the annotation mask (``label_lesions``),
without the 75 um dilation (merging of nearby tumour cells) or the exclusion of isolated tumour
cells. That belongs in a replacement for ``label_lesions``; ``froc`` only needs a labelled
integer mask and its downsample, so the rule change does not touch the counting here.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

Candidate = tuple[float, float, float]  # (x, y, p): level-0 px, probability

_EIGHT = np.ones((3, 3), dtype=bool)


def label_lesions(mask: np.ndarray) -> np.ndarray:
    """Label each 8-connected region of a binary lesion mask 1..n (0 = no lesion).

    Hook for the Camelyon16 evaluation-mask rules (75 um dilation, ITC exclusion), which will
    build on this; ``froc`` takes whatever labelled mask it is given.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"lesion mask must be 2-D, got shape {mask.shape}")
    labelled, _ = ndimage.label(mask.astype(bool), structure=_EIGHT)
    return labelled.astype(np.int32)


def lesion_candidates(
    heatmap: np.ndarray, downsample: float, threshold: float, min_distance: int = 2
) -> list[Candidate]:
    """Lesion candidates (x, y, p) from a slide heatmap, strongest first.

    A candidate is a local maximum of the heatmap above ``threshold`` (strictly greater), where
    "local" means the largest value within ``min_distance`` heatmap pixels (Chebyshev). A flat
    plateau gives one candidate at its centre, and every 8-connected region above threshold
    gives at least its own maximum even when a stronger neighbouring region suppresses it.
    Candidates closer than ``min_distance`` to a stronger one are dropped. Heatmap pixel
    (row, col) covers level-0 [col*ds, (col+1)*ds) x [row*ds, (row+1)*ds), so candidates are
    reported at pixel centres: x = (col + 0.5) * ds, y = (row + 0.5) * ds.
    """
    hm = np.asarray(heatmap, dtype=np.float64)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {hm.shape}")
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance}")
    above = np.isfinite(hm) & (hm > threshold)
    if not above.any():
        return []
    masked = np.where(above, hm, -np.inf)
    window = 2 * min_distance + 1
    peaks = above & (
        masked == ndimage.maximum_filter(masked, size=window, mode="constant", cval=-np.inf)
    )

    points: list[tuple[float, float, float]] = []  # (row, col, p)
    # Plateaus: one point per 8-connected group of equal maxima, at its centre of mass.
    plateau, n_plateau = ndimage.label(peaks, structure=_EIGHT)
    if n_plateau:
        idx = np.arange(1, n_plateau + 1)
        centres = ndimage.center_of_mass(peaks, plateau, idx)
        values = ndimage.maximum(masked, plateau, idx)
        points += [(r, c, float(v)) for (r, c), v in zip(centres, values, strict=True)]
    # Regions above threshold with no surviving peak still get their own maximum.
    regions, n_regions = ndimage.label(above, structure=_EIGHT)
    has_peak = np.zeros(n_regions + 1, dtype=bool)
    has_peak[np.unique(regions[peaks])] = True
    for region in np.flatnonzero(~has_peak[1:]) + 1:
        r, c = ndimage.maximum_position(masked, regions, region)
        points.append((float(r), float(c), float(hm[r, c])))

    # Greedy suppression, strongest first, so equal peaks a pixel or two apart count once.
    points.sort(key=lambda t: -t[2])
    kept: list[tuple[float, float, float]] = []
    for r, c, p in points:
        if all(max(abs(r - kr), abs(c - kc)) >= min_distance for kr, kc, _ in kept):
            kept.append((r, c, p))
    return [((c + 0.5) * downsample, (r + 0.5) * downsample, p) for r, c, p in kept]


@dataclass(frozen=True, eq=False)
class FrocResult:
    """FROC summary: ``score`` is the mean sensitivity at the six ``fp_rates``.

    ``thresholds``, ``sensitivity`` and ``avg_fps`` are the curve, one point per distinct
    candidate probability, highest threshold first.
    """

    score: float
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    thresholds: np.ndarray
    sensitivity: np.ndarray
    avg_fps: np.ndarray
    n_lesions: int
    n_slides: int

    def points(self) -> dict[float, float]:
        """Sensitivity by average false positives per slide, e.g. for logging to MLflow."""
        return dict(zip(self.fp_rates, self.sensitivities, strict=True))


def _lesion_at(labelled: np.ndarray, downsample: float, x: float, y: float) -> int:
    col, row = int(np.floor(x / downsample)), int(np.floor(y / downsample))
    if 0 <= row < labelled.shape[0] and 0 <= col < labelled.shape[1]:
        return int(labelled[row, col])
    return 0  # off the mask: cannot be inside a lesion


def froc(
    candidates_per_slide: Mapping[str, Sequence[Candidate]],
    lesion_masks: Mapping[str, tuple[np.ndarray, float]],
    normal_slides: Sequence[str],
) -> FrocResult:
    """FROC over a set of slides (see the module docstring for what is and is not Camelyon16).

    ``lesion_masks`` maps each tumour slide to (labelled lesion mask, its downsample from
    level 0), e.g. from ``label_lesions``; ``normal_slides`` have no lesions, so all their
    candidates are false positives (a normal slide may also appear in ``lesion_masks`` with an
    empty mask). Slides without candidates count towards the number of slides. Sensitivity
    at a given average-FP rate f is the highest sensitivity among the operating points
    (thresholds) whose average FPs per slide are <= f (a step reading of the curve; the
    Camelyon16 script interpolates linearly instead). A candidate slide with no
    ground truth raises ValueError; with no lesions at all the score is NaN with a warning.
    """
    normal = set(normal_slides)
    # A normal slide may come with an (empty) lesion mask; one with lesions is a contradiction.
    both = sorted(s for s in normal & set(lesion_masks) if np.any(lesion_masks[s][0]))
    if both:
        raise ValueError(f"slides {both} are listed as normal but their masks have lesions")
    lesion_masks = {s: m for s, m in lesion_masks.items() if s not in normal}
    unknown = set(candidates_per_slide) - normal - set(lesion_masks)
    if unknown:
        raise ValueError(
            f"candidates for slides {sorted(unknown)} with no ground truth; add them to "
            "normal_slides or lesion_masks"
        )
    n_slides = len(normal | set(lesion_masks))

    # Per lesion the best probability that hits it; per FP its probability.
    lesion_best: dict[tuple[str, int], float] = {}
    fp_probs: list[float] = []
    n_lesions = 0
    for slide, (labelled, ds) in lesion_masks.items():
        labelled = np.asarray(labelled)
        ids = np.unique(labelled)
        ids = ids[ids > 0]
        n_lesions += ids.size
        for lesion in ids:
            lesion_best[(slide, int(lesion))] = -np.inf
        for x, y, p in candidates_per_slide.get(slide, ()):
            lesion = _lesion_at(labelled, ds, x, y)
            if lesion:
                key = (slide, lesion)
                lesion_best[key] = max(lesion_best[key], float(p))
            else:
                fp_probs.append(float(p))
    for slide in normal:
        fp_probs += [float(p) for _, _, p in candidates_per_slide.get(slide, ())]

    tp_probs = np.array([p for p in lesion_best.values() if p > -np.inf])
    fps = np.asarray(fp_probs)
    thresholds = np.unique(np.concatenate([tp_probs, fps]))[::-1]  # descending
    # Counts of probabilities >= each threshold, by sorted search.
    tp_sorted, fp_sorted = np.sort(tp_probs), np.sort(fps)
    tp_count = tp_sorted.size - np.searchsorted(tp_sorted, thresholds, side="left")
    fp_count = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")
    avg_fps = fp_count / max(n_slides, 1)

    if n_lesions == 0:
        warnings.warn(
            "FROC is undefined without lesions (only normal slides); reporting NaN",
            UserWarning,
            stacklevel=2,
        )
        sens_curve = np.full(thresholds.shape, np.nan)
        sens_at = tuple(float("nan") for _ in FP_RATES)
        score = float("nan")
    else:
        sens_curve = tp_count / n_lesions
        # The "threshold above everything" point (0 FPs, 0 sensitivity) is always reachable.
        sens_at = tuple(float(max([0.0, *sens_curve[avg_fps <= rate]])) for rate in FP_RATES)
        score = float(np.mean(sens_at))
    return FrocResult(
        score=score,
        fp_rates=FP_RATES,
        sensitivities=sens_at,
        thresholds=thresholds,
        sensitivity=sens_curve,
        avg_fps=avg_fps,
        n_lesions=int(n_lesions),
        n_slides=n_slides,
    )
