"""The decision threshold a model carries: `calibration.json` beside its weights.

Written when a model is evaluated on its own site's held-out normal slides (the (1 - target
FPR) quantile of their slide scores, `tasks.evaluation.metrics.threshold_at_fpr`), so scoring
new, unlabelled slides later predicts with the threshold the model was calibrated with instead
of re-deriving one from data that may hold no normals.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """A model's operating point and the heatmap scale its overlays are drawn on."""

    threshold: float  # slide score above which a slide is called anomalous; NaN: none
    target_fpr: float  # share of normal slides the threshold was set to flag
    heatmap_value_range: tuple[float, float]  # (median, max) of held-out normal heatmaps

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
    }
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
        return Calibration(
            threshold=float(record["threshold"]),
            target_fpr=float(record["target_fpr"]),
            heatmap_value_range=(float(low), float(high)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: unreadable calibration ({exc}); re-run the nightly flow to recalibrate "
            "the model, or delete the file to score without a threshold"
        ) from exc
