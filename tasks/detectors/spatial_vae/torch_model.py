"""Spatial VAE (Baur et al. 2018): a Gaussian latent that is a feature grid, not a vector."""

from __future__ import annotations

import torch
from torch import nn

from vadflow.tasks.detectors.ae_l2.torch_model import ConvAutoencoder
from vadflow.tasks.detectors.vae.torch_model import LOGVAR_MAX, LOGVAR_MIN, GaussianVAE


class SpatialVAE(GaussianVAE):
    """ae_l2's conv encoder and decoder, with a `latent_channels` x g x g Gaussian bottleneck.

    Fully convolutional: each latent cell sees and reconstructs only its part of the tile, so
    the model keeps the autoencoder's spatial detail (a dense VAE blurs fine texture), while the
    KL term still keeps every cell close to the prior, so a defect has no code of its own.
    """

    def __init__(
        self,
        tile_size: int = 64,
        base_channels: int = 32,
        latent_channels: int = 8,
        bottleneck: int = 8,
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        backbone = ConvAutoencoder(
            tile_size, base_channels, latent_channels, bottleneck, max_channels
        )
        self.tile_size = tile_size
        self.grid = (latent_channels, bottleneck, bottleneck)
        # ae_l2's last encoder layer is a linear 1x1 projection to the latent; here it projects
        # to twice the channels, the posterior's mean and log-variance per cell.
        width = backbone.encoder[-1].in_channels
        self.encoder = nn.Sequential(
            *backbone.encoder[:-1], nn.Conv2d(width, 2 * latent_channels, kernel_size=1)
        )
        self.decoder = backbone.decoder  # (B, latent_channels, g, g) -> logits (B, 3, S, S)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.grid

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.encoder(x)  # (B, 2 * latent_channels, g, g)
        mu, logvar = stats.chunk(2, dim=1)  # each (B, latent_channels, g, g)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))  # (B, latent_channels, g, g) -> (B, 3, S, S)
