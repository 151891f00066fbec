"""Raw anomaly scores as the calibrated probability people read, and the level a prediction
starts at.

Heatmaps keep raw scores (a padim map runs to 150, a patch_knn one to 4); what an export shows
beside each raw score is the model's calibrated anomaly probability: the share of its normal
validation tiles scoring below it (``TailReference.probability``, saved in the model's
``calibration.json``), strictly increasing in the raw score, so any ranking within a slide is
the same on either. A reference fitted with a slide baseline reads each slide after aligning
it (``ProbabilityScale.for_slide``), so across slides probabilities order as the aligned
scores the slide calls count, not as raw scores.

The *prediction cut* is the raw heatmap level above which a location is a prediction (a
QuPath detection, a coloured overlay pixel, a lesion region). It comes from the slide call the
model was calibrated for:

- ``max`` (the slide's hottest location against the threshold): the threshold itself, a raw
  heatmap level only ``target_fpr`` of normal slides reach anywhere;
- ``tail`` (a count of unlikely tiles): the level above which a tile counts as unlikely,
  probability ``1 - alpha``: the very tiles the slide call counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from vadflow.tasks.scoring.tail import TailReference


def raw_at_probability(reference: TailReference, probability: float) -> float:
    """The raw score whose calibrated probability is ``probability`` (the inverse of
    ``TailReference.probability``, tails included); ValueError outside (0, 1)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    knots, levels = np.asarray(reference.knots), np.asarray(reference.levels)
    if probability > levels[-1]:  # invert 1 - (1 - L) h / (h + (s - k))
        return float(
            knots[-1] + reference.high_scale * ((1.0 - levels[-1]) / (1.0 - probability) - 1.0)
        )
    if probability < levels[0]:  # invert L0 l / (l + (k0 - s))
        return float(knots[0] - reference.low_scale * (levels[0] / probability - 1.0))
    return float(np.interp(probability, levels, knots))


def prediction_cut(
    slide_score: str, threshold: float, reference: TailReference | None, alpha: float
) -> float:
    """The raw heatmap level above which a location is a prediction (see the module
    docstring); NaN when the model has no threshold it applies to."""
    if slide_score == "max":
        return float(threshold)
    if slide_score == "tail" and reference is not None:
        return raw_at_probability(reference, 1.0 - alpha)
    return math.nan


@dataclass(frozen=True)
class ProbabilityScale:
    """How a run's raw scores read as probabilities, and where predictions start.

    ``reference`` is None for a model calibrated before it carried one: ``probability`` is then
    NaN, and every export says the probability is unavailable rather than show a raw score
    as one. ``cut`` is the raw prediction level (NaN: no calibrated threshold).
    """

    reference: TailReference | None
    cut: float

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None, cut: float) -> ProbabilityScale:
        """From a reference as ``TailReference.to_dict`` wrote it (None: no reference)."""
        return cls(None if record is None else TailReference.from_dict(record), float(cut))

    @property
    def calibrated(self) -> bool:
        """Whether raw scores have a probability (the model carries a tail reference)."""
        return self.reference is not None

    @property
    def has_cut(self) -> bool:
        """Whether there is a calibrated prediction level."""
        return math.isfinite(self.cut)

    def probability(self, raw: ArrayLike) -> np.ndarray:
        """Calibrated probability of each raw score, in [0, 1]; NaN for NaN scores, and
        everywhere without a reference."""
        if self.reference is None:
            return np.full(np.shape(np.array(raw, ndmin=1)), np.nan)
        return self.reference.probability(raw)

    def probability_of(self, raw: float) -> float | None:
        """One raw score's probability, or None without a reference (or for a NaN score)."""
        if self.reference is None or not math.isfinite(raw):
            return None
        return float(self.reference.probability([raw])[0])

    @property
    def cut_probability(self) -> float | None:
        """The prediction level as a probability (None without a reference or a cut)."""
        return self.probability_of(self.cut) if self.has_cut else None

    def for_slide(self, tile_scores: ArrayLike, cut_is_tail: bool) -> ProbabilityScale:
        """This scale as one slide reads it. A reference fitted with a slide baseline compares
        each slide after aligning it (`TailReference.slide_offset`), so its probabilities and
        a tail prediction level move with the slide: an export shows the tiles the slide call
        counted. Unchanged without a baseline."""
        if self.reference is None or self.reference.baseline is None:
            return self
        offset = self.reference.slide_offset(tile_scores)
        cut = self.cut + offset if cut_is_tail else self.cut
        return ProbabilityScale(self.reference.shifted(offset), cut)

    def is_prediction(self, raw: float) -> bool:
        """Whether a raw score is above the prediction level; every score is, without one."""
        return not self.has_cut or raw > self.cut
