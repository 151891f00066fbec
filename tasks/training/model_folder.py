"""The files the train stage writes into a model folder, beside the detector's own
`config.json` and `weights.pt` (and `stain.json`, tasks/training/stain.py).

A light module: tracking reads these names without importing the training code.
"""

from __future__ import annotations

EXAMPLE_FILE = "example_tiles.npy"  # two training tiles: the MLflow model's input example
FIT_REPORT_FILE = "fit_report.json"  # the TrainedModel record, as JSON
