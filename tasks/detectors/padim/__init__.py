"""padim: PaDiM-style Gaussian per patch position over CNN features, Mahalanobis score."""

from tasks.detectors.padim.detector import PadimConfig, PadimDetector
from tasks.detectors.padim.torch_model import PadimModel

__all__ = ["PadimConfig", "PadimDetector", "PadimModel"]
