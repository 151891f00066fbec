"""The decision threshold a model carries: `calibration.json` beside its weights.

Written when a model is evaluated on its own site's held-out normal slides (the (1 - target
FPR) quantile of their slide scores, `tasks.evaluation.metrics.threshold_at_fpr`), so scoring
new, unlabelled slides later predicts with the threshold the model was calibrated with instead
of re-deriving one from data that may hold no normals.

The threshold is on one kind of slide score (`slide_score`: tail, max or forest). A `tail`
threshold needs the normal tiles' reference (`tasks.scoring.tail.TailReference`) to turn a new
slide's tile scores into the same score, so the reference is saved too. Files written before
slide scores had kinds hold neither and read as `max` without a reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from vadflow.tasks.records import SlideScore
from vadflow.tasks.scoring.tail import (
    DEFAULT_ALPHA,
    SLIDE_SCORES,
    TailReference,
    scored_tiles,
    tail_slide_score,
)

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """A model's operating point, the slide score it applies to, and the heatmap scale its
    overlays are drawn on."""

    threshold: float  # slide score above which a slide is called anomalous; NaN: none
    target_fpr: float  # share of normal slides the threshold was set to flag
    heatmap_value_range: tuple[float, float]  # (median, max) of held-out normal heatmaps
    slide_score: str = "max"  # which slide score the threshold is on (tail, max, forest)
    tail_reference: TailReference | None = None  # held-out normal tiles, for `tail`
    alpha: float = DEFAULT_ALPHA  # tail: a tile is unlikely below this p-value
    keep_artefacts: bool = False  # tail: tiles flagged by artefact QC count

    @property
    def calibrated(self) -> bool:
        return math.isfinite(self.threshold)


def write_calibration(model_dir: str | Path, calibration: Calibration) -> Path:
    """Save the calibration beside the model's weights (it travels with the MLflow model)."""
    path = Path(model_dir) / CALIBRATION_FILE
    record = {
        "threshold": calibration.threshold,
        "target_fpr": calibration.target_fpr,
        "heatmap_value_range": list(calibration.heatmap_value_range),
        "slide_score": calibration.slide_score,
        "alpha": calibration.alpha,
        "keep_artefacts": calibration.keep_artefacts,
    }
    if calibration.tail_reference is not None:
        record["tail_reference"] = calibration.tail_reference.to_dict()
    path.write_text(json.dumps(record, indent=2))
    return path


def read_calibration(model_dir: str | Path) -> Calibration | None:
    """The model's calibration, or None when it was never calibrated (no file)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        low, high = record["heatmap_value_range"]
        slide_score = str(record.get("slide_score", "max"))
        if slide_score not in SLIDE_SCORES:
            raise ValueError(f"slide_score {slide_score!r} is not one of {', '.join(SLIDE_SCORES)}")
        reference = record.get("tail_reference")
        calibration = Calibration(
            threshold=float(record["threshold"]),
            target_fpr=float(record["target_fpr"]),
            heatmap_value_range=(float(low), float(high)),
            slide_score=slide_score,
            tail_reference=None if reference is None else TailReference.from_dict(reference),
            alpha=float(record.get("alpha", DEFAULT_ALPHA)),
            keep_artefacts=bool(record.get("keep_artefacts", False)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: unreadable calibration ({exc}); re-run the nightly flow to recalibrate "
            "the model, or delete the file to score without a threshold"
        ) from exc
    if calibration.slide_score == "tail" and calibration.tail_reference is None:
        raise ValueError(
            f"{path}: a `tail` threshold without the tail_reference it was set with; re-run "
            "the nightly flow to recalibrate the model"
        )
    return calibration


def calibrated_slide_score(score: SlideScore, calibration: Calibration | None) -> SlideScore:
    """`score` with the slide score its model's threshold is on: the tail score against the
    model's saved reference for a `tail` calibration; unchanged (the heatmap maximum) for a
    `max` one or a model never calibrated."""
    if calibration is None or calibration.slide_score != "tail":
        return score
    assert calibration.tail_reference is not None  # read_calibration refuses tail without one
    tiles = scored_tiles(pl.read_parquet(score.tile_scores), calibration.keep_artefacts)
    p_values = calibration.tail_reference.slide_p_values(tiles["score"].to_numpy())
    return replace(score, slide_score=tail_slide_score(p_values, calibration.alpha))
