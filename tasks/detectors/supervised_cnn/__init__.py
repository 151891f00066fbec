"""supervised_cnn: tumour-vs-normal patch classifier with hard-negative mining (labelled tiles)."""

from vadflow.tasks.detectors.supervised_cnn.detector import (
    HardNegativeRound,
    PatchTrainer,
    SupervisedCNNConfig,
    SupervisedCNNDetector,
    epoch_index,
    mine_hard_negatives,
)
from vadflow.tasks.detectors.supervised_cnn.labelled import (
    LabelledTrainer,
    LabelsRequiredError,
    sigmoid,
    tile_logits,
    tile_probabilities,
)
from vadflow.tasks.detectors.supervised_cnn.torch_model import PatchClassifier

__all__ = [
    "HardNegativeRound",
    "LabelledTrainer",
    "LabelsRequiredError",
    "PatchClassifier",
    "SupervisedCNNConfig",
    "SupervisedCNNDetector",
    "PatchTrainer",
    "epoch_index",
    "mine_hard_negatives",
    "sigmoid",
    "tile_logits",
    "tile_probabilities",
]
