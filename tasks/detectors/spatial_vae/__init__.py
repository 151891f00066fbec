"""spatial_vae: VAE with a fully convolutional latent (Baur et al. 2018)."""

from vadflow.tasks.detectors.spatial_vae.detector import SpatialVAEConfig, SpatialVAEDetector
from vadflow.tasks.detectors.spatial_vae.torch_model import SpatialVAE

__all__ = ["SpatialVAE", "SpatialVAEConfig", "SpatialVAEDetector"]
