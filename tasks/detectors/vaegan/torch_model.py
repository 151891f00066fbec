"""AnoVAEGAN's networks: a spatial VAE (encoder, decoder) and a DCGAN discriminator."""

from __future__ import annotations

import math

import torch
from torch import nn

from vadflow.tasks.detectors.components.gan_parts import (
    DCGANDiscriminator,
    down_block,
    stage_widths,
    up_block,
)


class SpatialVAE(nn.Module):
    """Fully convolutional VAE: the latent is a `bottleneck` x `bottleneck` grid of Gaussians.

    Baur et al. 2018 keep the latent spatial so the decoder does not have to re-invent where
    things are, which sharpens reconstructions (and so residuals) against a dense bottleneck.
    """

    def __init__(
        self,
        tile_size: int = 64,
        base_channels: int = 32,
        latent_channels: int = 16,
        bottleneck: int = 8,
    ) -> None:
        super().__init__()
        stages = math.log2(tile_size / bottleneck) if tile_size >= bottleneck > 0 else -1.0
        if stages < 1 or not stages.is_integer():
            raise ValueError(
                f"tile_size {tile_size} must be bottleneck {bottleneck} times a power of two"
            )
        widths = [min(base_channels * 2**i, 256) for i in range(int(stages))]
        layers: list[nn.Module] = []
        c_in = 3
        for width in widths:
            # Group norm, not batch norm: a tile's reconstruction must not depend on its batch.
            layers.append(down_block(c_in, width, norm="group"))
            c_in = width
        self.encoder = nn.Sequential(*layers)
        self.to_moments = nn.Conv2d(c_in, 2 * latent_channels, kernel_size=1)  # mean, log-var
        last = max(base_channels // 2, 8)
        decoder: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1)]
        for c_hi, c_lo in zip(widths[::-1], [*widths[::-1][1:], last], strict=True):
            decoder.append(up_block(c_hi, c_lo, norm="group"))
        decoder.append(nn.Conv2d(last, 3, kernel_size=3, padding=1))
        self.decoder = nn.Sequential(*decoder)
        self.tile_size = tile_size

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> mean, log-variance, each (B, latent, b, b)."""
        moments = self.to_moments(self.encoder(x * 2.0 - 1.0))  # (B, 2 * latent, b, b)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-12.0, 8.0)  # keeps exp(logvar) finite in bf16 too

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))  # (B, latent, b, b) -> (B, 3, S, S)

    def forward(
        self, x: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction from a sampled z (or from the mean), and the posterior's moments."""
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode(z), mean, logvar


class AnoVAEGANModel(nn.Module):
    """Spatial VAE whose decoder doubles as a GAN generator against `discriminator`."""

    def __init__(
        self,
        tile_size: int = 64,
        base_channels: int = 32,
        latent_channels: int = 16,
        bottleneck: int = 8,
    ) -> None:
        super().__init__()
        stage_widths(tile_size, base_channels)  # the discriminator's size check
        self.vae = SpatialVAE(tile_size, base_channels, latent_channels, bottleneck)
        self.discriminator = DCGANDiscriminator(tile_size, base_channels, norm="batch")
