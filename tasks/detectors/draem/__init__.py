"""draem: a segmenter trained on normal tiles with synthetic anomalies (DRAEM), no pretrained
weights."""

from vadflow.tasks.detectors.draem.detector import DraemConfig, DraemDetector, DraemTrainer
from vadflow.tasks.detectors.draem.synthetic import AnomalySynthesis, synthesise
from vadflow.tasks.detectors.draem.torch_model import DraemNet

__all__ = [
    "AnomalySynthesis",
    "DraemConfig",
    "DraemDetector",
    "DraemNet",
    "DraemTrainer",
    "synthesise",
]
