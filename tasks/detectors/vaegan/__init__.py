"""vaegan: AnoVAEGAN, a spatial VAE with an adversarially trained decoder (Baur et al. 2018)."""

from vadflow.tasks.detectors.vaegan.detector import (
    AnoVAEGANConfig,
    AnoVAEGANDetector,
    VAEGANTrainer,
)
from vadflow.tasks.detectors.vaegan.torch_model import AnoVAEGANModel, SpatialVAE

__all__ = ["AnoVAEGANConfig", "AnoVAEGANDetector", "AnoVAEGANModel", "SpatialVAE", "VAEGANTrainer"]
