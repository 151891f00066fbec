"""AnoGAN's networks: a DCGAN generator and discriminator in one module, so one state_dict
holds everything scoring needs."""

from __future__ import annotations

from torch import nn

from vadflow.tasks.detectors.components.gan_parts import DCGANDiscriminator, DCGANGenerator


class AnoGANModel(nn.Module):
    """DCGAN pair for square RGB tiles; batch norm in both, as in DCGAN and AnoGAN."""

    def __init__(self, tile_size: int = 64, latent_dim: int = 64, base_channels: int = 32) -> None:
        super().__init__()
        self.generator = DCGANGenerator(latent_dim, tile_size, base_channels, norm="batch")
        self.discriminator = DCGANDiscriminator(tile_size, base_channels, norm="batch")
