"""Convolutional autoencoder for square RGB tiles: a pure nn.Module, no training or scoring."""

from __future__ import annotations

import math

import torch
from torch import nn


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, dividing `channels`.

    GroupNorm rather than BatchNorm so a tile's reconstruction does not depend on what else is
    in its batch, and train and eval behave the same (scores stream in arbitrary batches).
    """
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    # Nearest upsampling + conv instead of a transposed conv: no checkerboard pattern, which
    # would otherwise show up as periodic residual on every normal tile.
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ConvAutoencoder(nn.Module):
    """Strided-conv encoder to a `bottleneck` x `bottleneck` latent grid, mirrored decoder.

    The number of stages follows from the tile size (32 px -> 3 stages, 256 px -> 6 at a 4x4
    bottleneck), so every tile size squeezes through the same small latent.
    """

    def __init__(
        self,
        tile_size: int = 64,
        base_channels: int = 32,
        latent_channels: int = 64,
        bottleneck: int = 4,
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        stages = math.log2(tile_size / bottleneck) if tile_size >= bottleneck > 0 else -1.0
        if stages < 1 or not stages.is_integer():
            raise ValueError(
                f"tile_size {tile_size} must be bottleneck {bottleneck} times a power of two"
            )
        self.tile_size = tile_size
        widths = [min(base_channels * 2**i, max_channels) for i in range(int(stages))]

        encoder: list[nn.Module] = []
        c_in = 3
        for width in widths:
            encoder.append(_down(c_in, width))
            c_in = width
        # Linear 1x1 projection: the bottleneck's width is the capacity knob.
        encoder.append(nn.Conv2d(c_in, latent_channels, kernel_size=1))
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [
            nn.Conv2d(latent_channels, widths[-1], kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(_groups(widths[-1]), widths[-1]),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        # Each upsampling stage ends with the width the encoder had at that resolution, so the
        # decoder costs about what the encoder does instead of several times more.
        last = max(base_channels // 2, 8)
        for c_hi, c_lo in zip(widths[::-1], [*widths[::-1][1:], last], strict=True):
            decoder.append(_up(c_hi, c_lo))
        decoder.append(nn.Conv2d(last, 3, kernel_size=3, padding=1))
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> reconstruction (B, 3, S, S) in [0, 1]."""
        if x.shape[-2:] != (self.tile_size, self.tile_size):
            raise ValueError(
                f"this autoencoder was built for {self.tile_size}px tiles, got {tuple(x.shape)}"
            )
        z = self.encoder(x)  # (B, latent, bottleneck, bottleneck)
        return torch.sigmoid(self.decoder(z))  # (B, 3, S, S)
