"""Variational autoencoders for square RGB tiles: pure nn.Modules, no training or scoring.

Both VAEs reuse ae_l2's convolutional encoder and decoder stacks (`ConvAutoencoder`), so the
three reconstruction families differ only in their bottleneck: a deterministic grid (ae_l2,
ae_ssim), a dense Gaussian vector (`DenseVAE`), a spatial Gaussian grid (`SpatialVAE`, in the
spatial_vae family).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from vadflow.tasks.detectors.ae_l2.torch_model import ConvAutoencoder

# exp(logvar) must neither overflow nor vanish in bf16/fp32; the posterior never needs a
# variance outside [e^-12, e^8] for inputs in [0, 1].
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0


class GaussianVAE(nn.Module, ABC):
    """Encoder to a diagonal Gaussian posterior q(z|x), decoder p(x|z) giving the pixel means.

    `forward` samples z by the reparameterisation trick in training mode and takes the
    posterior mean in eval mode, so validation losses and residual maps are deterministic.
    """

    tile_size: int

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one tile's latent, without the batch dimension."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> posterior mean and log-variance, each (B, *latent_shape)."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) -> reconstruction means (B, 3, S, S) in [0, 1]."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (reconstruction (B, 3, S, S), mu, logvar (B, *latent_shape))."""
        if x.shape[-2:] != (self.tile_size, self.tile_size):
            raise ValueError(
                f"this VAE was built for {self.tile_size}px tiles, got {tuple(x.shape)}"
            )
        mu, logvar = self.encode(x)
        # Reparameterisation: z = mu + sigma * eps keeps the sample differentiable in mu, sigma.
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.decode(z), mu, logvar


class DenseVAE(GaussianVAE):
    """Conv encoder -> flatten -> dense `latent_dim`-d Gaussian -> dense -> conv decoder.

    The dense bottleneck is the classic VAE: every tile is one point in a small vector space,
    which forces a global summary of the tile and makes reconstructions blurry but robust.
    """

    def __init__(
        self,
        tile_size: int = 64,
        base_channels: int = 32,
        latent_dim: int = 128,
        bottleneck: int = 4,
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        # ae_l2's widths double per stage from base_channels up to max_channels; the dense
        # layers sit on the widest, last stage. (A bad tile/bottleneck pair is refused by
        # ConvAutoencoder with a clear message.)
        stages = (tile_size // max(bottleneck, 1)).bit_length() - 1
        width = min(base_channels * 2 ** max(stages - 1, 0), max_channels)
        backbone = ConvAutoencoder(tile_size, base_channels, width, bottleneck, max_channels)
        self.tile_size = tile_size
        self.latent_dim = latent_dim
        self.grid = (width, bottleneck, bottleneck)
        flat = width * bottleneck * bottleneck
        # Without ae_l2's linear 1x1 projection: the dense layer is the projection here.
        self.encoder = backbone.encoder[:-1]  # (B, 3, S, S) -> (B, width, g, g)
        self.to_posterior = nn.Linear(flat, 2 * latent_dim)
        # Linear: the decoder's first conv, norm and activation follow straight after.
        self.from_latent = nn.Linear(latent_dim, flat)
        self.decoder = backbone.decoder  # (B, width, g, g) -> logits (B, 3, S, S)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.latent_dim,)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x).flatten(1)  # (B, width * g * g)
        mu, logvar = self.to_posterior(features).chunk(2, dim=1)  # each (B, latent_dim)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        grid = self.from_latent(z).view(-1, *self.grid)  # (B, latent_dim) -> (B, width, g, g)
        return torch.sigmoid(self.decoder(grid))  # (B, 3, S, S)
