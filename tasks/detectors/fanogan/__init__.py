"""fanogan: WGAN-GP plus an izi_f-trained encoder; one pass to score (Schlegl et al. 2019)."""

from vadflow.tasks.detectors.fanogan.detector import FAnoGANConfig, FAnoGANDetector, WGANGPTrainer
from vadflow.tasks.detectors.fanogan.torch_model import FAnoGANModel

__all__ = ["FAnoGANConfig", "FAnoGANDetector", "FAnoGANModel", "WGANGPTrainer"]
