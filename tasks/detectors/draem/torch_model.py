"""DRAEM's two subnetworks, small enough for a CPU: a pure nn.Module, no training or scoring.

The reconstructive subnetwork is an autoencoder without skip connections, trained to return
the normal tile from a corrupted one; the discriminative subnetwork is a small U-Net that reads
the tile beside that reconstruction and segments where the two disagree in the way anomalies
do. With `reconstruction=False` the segmenter reads the tile alone (half the cost; a plain
synthetic-anomaly segmenter).
"""

from __future__ import annotations

import torch
from torch import nn

LEAK = 0.2


def _groups(channels: int) -> int:
    """GroupNorm groups, up to 8: a tile's output never depends on the rest of its batch."""
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.LeakyReLU(LEAK, inplace=True),
    )


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    # Nearest upsampling + conv: no transposed-conv checkerboard on every normal tile.
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _block(c_in, c_out))


def _check_size(tile_size: int, depth: int) -> None:
    if tile_size < 2**depth or tile_size % 2**depth:
        raise ValueError(f"tile_size {tile_size} must be a multiple of 2^{depth} = {2**depth}")


class Reconstructor(nn.Module):
    """Strided encoder to a (tile / 2^depth) grid and a mirrored decoder, no skips, so detail
    the normal tiles never had cannot pass straight through."""

    def __init__(self, tile_size: int = 64, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        _check_size(tile_size, depth)
        widths = [base_channels * 2**i for i in range(depth)]
        encoder: list[nn.Module] = []
        c_in = 3
        for width in widths:
            encoder.append(_block(c_in, width, stride=2))
            c_in = width
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = []
        for c_hi, c_lo in zip(widths[::-1], [*widths[::-1][1:], base_channels], strict=True):
            decoder.append(_up_block(c_hi, c_lo))
        decoder.append(nn.Conv2d(base_channels, 3, kernel_size=3, padding=1))
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> reconstruction (B, 3, S, S) in [0, 1]."""
        z = self.encoder((x - 0.5) / 0.25)  # (B, C, S / 2^depth, S / 2^depth)
        return torch.sigmoid(self.decoder(z))


class Segmenter(nn.Module):
    """A U-Net of `depth` halvings: (B, in_channels, S, S) -> anomaly logits (B, 1, S, S)."""

    def __init__(self, in_channels: int, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]  # per resolution, full first
        self.stem = _block(in_channels, widths[0])
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1], stride=2) for i in range(depth))
        self.up = nn.ModuleList(_up_block(widths[i + 1], widths[i]) for i in range(depth))
        # After concatenating the skip, one conv merges it back to the level's width.
        self.merge = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in range(depth))
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]  # (B, w0, S, S)
        for down in self.down:
            skips.append(down(skips[-1]))  # (B, w_{i+1}, S / 2^(i+1), ...)
        h = skips.pop()
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)  # (B, w_level, S / 2^level, ...)
            h = self.merge[level](torch.cat([h, skips[level]], dim=1))
        return self.head(h)  # (B, 1, S, S)


class DraemNet(nn.Module):
    """Reconstruct (optionally), then segment: tile -> (reconstruction or None, logits)."""

    def __init__(
        self,
        tile_size: int = 64,
        base_channels: int = 16,
        depth: int = 3,
        reconstruction: bool = True,
    ) -> None:
        super().__init__()
        _check_size(tile_size, depth)
        self.tile_size = tile_size
        self.reconstructor = (
            Reconstructor(tile_size, base_channels, depth) if reconstruction else None
        )
        self.segmenter = Segmenter(6 if reconstruction else 3, base_channels, depth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> (reconstruction (B, 3, S, S) or None, logits (B, 1, S, S))."""
        if x.shape[-2:] != (self.tile_size, self.tile_size):
            raise ValueError(
                f"this draem network was built for {self.tile_size}px tiles, got {tuple(x.shape)}"
            )
        if self.reconstructor is None:
            return None, self.segmenter((x - 0.5) / 0.25)
        recon = self.reconstructor(x)  # (B, 3, S, S)
        joint = torch.cat([x, recon], dim=1)  # (B, 6, S, S)
        return recon, self.segmenter((joint - 0.5) / 0.25)
