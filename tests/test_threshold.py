"""The calibrated threshold holds on data it never saw.

An ae_l2 detector trains on normal tiles; its threshold is calibrated on other normal tiles
(`threshold_at_fpr`, the quantile evaluation uses) and stored with the model
(`calibration.json`); the reloaded model and threshold then score held-out normal tiles and
tiles with planted defects. Every tile is its own generated image (a 32 px synthetic fabric),
so tiles are independent and binomial error bars are honest.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vadflow.tasks.detectors.registry import create_detector, load_detector
from vadflow.tasks.evaluation.calibration import Calibration, read_calibration, write_calibration
from vadflow.tasks.evaluation.evaluate import heatmap_value_range
from vadflow.tasks.evaluation.metrics import threshold_at_fpr
from vadflow.tasks.synth.industrial import make_industrial_site

pytestmark = [pytest.mark.slow]  # trains a model (~25 s on 2 busy cores)

TARGET_FPR = 0.05
N_TRAIN, N_VAL, N_HELD_OUT, N_PER_DEFECT = 400, 500, 500, 50
# The flagged share of held-out normals varies twice: the threshold is a quantile of N_VAL
# scores (its true exceedance has variance ~ p(1-p)/N_VAL) and the held-out share is binomial
# (~ p(1-p)/N_HELD_OUT). Three standard deviations of both: 0.041 here, so the share must stay
# under 0.091 (a threshold at the median or the minimum of normal scores flags 0.5 or ~1.0).
MARGIN = 3 * math.sqrt(TARGET_FPR * (1 - TARGET_FPR) * (1 / N_VAL + 1 / N_HELD_OUT))
MIN_DETECTED = 0.8


def _images(folder: Path) -> np.ndarray:
    """Every PNG in `folder` as one (N, 32, 32, 3) uint8 batch, in name order."""
    return np.stack(
        [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    )


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("threshold")
    line = make_industrial_site(
        root,
        "line",
        n_train=N_TRAIN + N_VAL,
        n_test_good=N_HELD_OUT,
        n_test_per_defect=N_PER_DEFECT,
        image_size=32,  # one image is one tile
        seed=5,
    )
    good = _images(line / "fabric" / "train" / "good")
    train, val = good[:N_TRAIN], good[N_TRAIN:]  # val: normal, never trained on
    detector = create_detector(
        "ae_l2", tile_size=32, epochs=5, base_channels=8, seed=0, device="cpu"
    )
    detector.fit(train, val)
    model_dir = detector.save(root / "model")
    out = detector.score(val)
    threshold = threshold_at_fpr(out.tile_score.numpy(), TARGET_FPR)
    value_range = heatmap_value_range([out.anomaly_map.numpy()])
    write_calibration(model_dir, Calibration(threshold, TARGET_FPR, value_range))
    return {"line": line, "model_dir": model_dir}


def _flagged(model_dir: Path, tiles: np.ndarray) -> np.ndarray:
    """Which tiles the saved model calls anomalous at its stored threshold."""
    calibration = read_calibration(model_dir)
    assert calibration is not None and calibration.calibrated
    scores = load_detector(model_dir).score(tiles).tile_score.numpy()
    return scores > calibration.threshold


def test_held_out_normals_are_flagged_at_about_the_target_rate(calibrated) -> None:
    held_out = _images(calibrated["line"] / "fabric" / "test" / "good")
    assert len(held_out) == N_HELD_OUT
    share = _flagged(calibrated["model_dir"], held_out).mean()
    assert share <= TARGET_FPR + MARGIN, (share, TARGET_FPR, MARGIN)
    # Not trivially conservative either: a threshold above every normal would pass the line
    # above and no longer be calibrated at the target rate.
    assert share >= TARGET_FPR - MARGIN, (share, TARGET_FPR, MARGIN)


@pytest.mark.parametrize("defect", ["scratch", "stain"])
def test_most_planted_defects_are_flagged(calibrated, defect: str) -> None:
    tiles = _images(calibrated["line"] / "fabric" / "test" / defect)
    masks = _images(calibrated["line"] / "fabric" / "ground_truth" / defect)
    assert len(tiles) == N_PER_DEFECT and (masks > 0).any(axis=(1, 2, 3)).all()  # each planted
    detected = _flagged(calibrated["model_dir"], tiles).mean()
    assert detected >= MIN_DETECTED, (defect, detected)
