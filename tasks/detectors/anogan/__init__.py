"""anogan: DCGAN on normal tiles, scored by iterative latent search (Schlegl et al. 2017)."""

from vadflow.tasks.detectors.anogan.detector import AnoGANConfig, AnoGANDetector, DCGANTrainer
from vadflow.tasks.detectors.anogan.torch_model import AnoGANModel

__all__ = ["AnoGANConfig", "AnoGANDetector", "AnoGANModel", "DCGANTrainer"]
