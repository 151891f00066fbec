"""f-AnoGAN's networks: WGAN-GP generator and critic plus the encoder, in one module."""

from __future__ import annotations

import torch
from torch import nn

from vadflow.tasks.detectors.components.gan_parts import (
    ConvEncoder,
    DCGANDiscriminator,
    DCGANGenerator,
)


class FAnoGANModel(nn.Module):
    """Generator (batch norm, as in WGAN-GP's DCGAN), critic (layer norm: the gradient penalty
    is per sample), encoder image -> z (group norm, so a tile's code ignores its batch)."""

    def __init__(self, tile_size: int = 64, latent_dim: int = 64, base_channels: int = 32) -> None:
        super().__init__()
        self.generator = DCGANGenerator(latent_dim, tile_size, base_channels, norm="batch")
        self.critic = DCGANDiscriminator(tile_size, base_channels, norm="layer")
        self.encoder = ConvEncoder(latent_dim, tile_size, base_channels, norm="group")
        # Critic updates so far: WGAN-GP updates the generator every n_critic-th one, and a
        # buffer is saved in checkpoints, so a resumed run keeps the same rhythm.
        self.register_buffer("critic_steps", torch.zeros((), dtype=torch.long))
