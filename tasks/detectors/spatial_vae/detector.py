"""spatial_vae: a VAE with a fully convolutional (spatial) latent, after Baur et al. (2018).

Baur et al., "Deep autoencoding models for unsupervised anomaly segmentation in brain MR
images", found a spatial latent reconstructs much sharper than a dense one while staying a
proper VAE; for tissue, where the texture is fine and position carries no meaning, that is the
better trade. Training (ELBO, KL warm-up, robust mode) and scoring (residual or reconstruction
probability) are the vae family's; only the bottleneck differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from vadflow.tasks.detectors.registry import register
from vadflow.tasks.detectors.spatial_vae.torch_model import SpatialVAE
from vadflow.tasks.detectors.vae.detector import VAEConfigBase, VAEDetector
from vadflow.tasks.detectors.vae.torch_model import GaussianVAE


@dataclass(frozen=True)
class SpatialVAEConfig(VAEConfigBase):
    """Hyperparameters of spatial_vae; saved as config.json beside the weights."""

    latent_channels: int = 8  # Gaussian channels per latent cell
    bottleneck: int = 8  # latent grid is bottleneck x bottleneck; tile_size / it = 2^k


@register("spatial_vae")
class SpatialVAEDetector(VAEDetector):
    """Spatial-latent VAE; fit, maps and scores as in `VAEDetector`."""

    config_cls = SpatialVAEConfig
    config: SpatialVAEConfig

    def _build_model(self) -> GaussianVAE:
        cfg = self.config
        return SpatialVAE(
            tile_size=cfg.tile_size,
            base_channels=cfg.base_channels,
            latent_channels=cfg.latent_channels,
            bottleneck=cfg.bottleneck,
        )
