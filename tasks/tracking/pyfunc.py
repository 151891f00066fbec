"""The MLflow pyfunc wrapper around a detector's own `load` / `score`."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np


class DetectorModel(mlflow.pyfunc.PythonModel):
    """Input: uint8 tiles (B, H, W, 3). Output: one anomaly score per tile (B,)."""

    def load_context(self, context) -> None:
        from tasks.detectors import load_detector

        self.detector = load_detector(context.artifacts["detector"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        tiles = np.asarray(model_input, dtype=np.uint8)
        return self.detector.score(tiles).tile_score.numpy()
