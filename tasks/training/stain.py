"""The stain reference a model is trained with, saved beside its weights.

Training fits it on the normal tiles of the site (every family, whatever it learns from) and
writes `stain.json`; scoring reads it and normalises each slide to it (tasks/scoring/run.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vadflow.tasks.normalise.stain import StainNormaliser, make_normaliser, normaliser_from_dict

STAIN_FILE = "stain.json"  # the stain reference fitted on this model's training tiles


def fit_stain_reference(method: str, normal: np.ndarray, model_dir: str | Path) -> StainNormaliser:
    """Fit `method` (none, reinhard, macenko) on normal tiles (B, H, W, 3) and save it."""
    normaliser = make_normaliser(method).fit(normal)
    (Path(model_dir) / STAIN_FILE).write_text(json.dumps(normaliser.to_dict()))
    return normaliser


def read_stain_reference(model_dir: str | Path) -> StainNormaliser | None:
    """The model's saved stain reference; None for a model saved without one."""
    path = Path(model_dir) / STAIN_FILE
    return normaliser_from_dict(json.loads(path.read_text())) if path.exists() else None
