"""padim: PaDiM-style Gaussian per patch position over CNN features, Mahalanobis score."""

from vadflow.tasks.detectors.padim.detector import PadimConfig, PadimDetector
from vadflow.tasks.detectors.padim.torch_model import PadimModel

__all__ = ["PadimConfig", "PadimDetector", "PadimModel"]
