"""The padim module: patch features and one Gaussian per patch position."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vadflow.tasks.detectors.components.backbones import PatchFeatures, window_average


class PadimModel(nn.Module):
    """Patch features + Gaussians over a fixed random subset of their channels.

    Buffers (all in `state_dict()`): `channels` (d,) the channel subset, `mean` (P, d) and
    `precision` (P, d, d) per patch position P = h * w of the feature grid, or P = 1 when one
    Gaussian is `shared` by every position. `window` > 1 averages the features over a window x
    window neighbourhood of patches (stride 1) before they are compared.
    """

    channels: torch.Tensor
    mean: torch.Tensor
    precision: torch.Tensor

    def __init__(
        self,
        features: PatchFeatures,
        grid: int,
        n_features: int,
        *,
        shared: bool = False,
        window: int = 1,
    ) -> None:
        super().__init__()
        self.features = features
        self.grid = grid
        self.shared = shared
        self.window = window
        d = min(n_features, features.channels)
        positions = 1 if shared else grid * grid
        self.register_buffer("channels", torch.arange(d))
        self.register_buffer("mean", torch.zeros(positions, d))
        self.register_buffer("precision", torch.eye(d).repeat(positions, 1, 1))

    def selected_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P, d) float32 features of the chosen channels per position,
        window-averaged."""
        features = self.features(x).float()  # (B, C, h, w)
        if not self.shared and features.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"padim was fitted on a {self.grid}x{self.grid} feature grid (tiles of "
                f"{4 * self.grid} px) but got tiles of {tuple(x.shape[-2:])} px"
            )
        features = window_average(features[:, self.channels], self.window)  # (B, d, h, w)
        return features.flatten(2).transpose(1, 2)  # (B, P, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1, h, w) Mahalanobis distance of each patch to its position's
        Gaussian."""
        features = self.selected_features(x)  # (B, P, d)
        guard = (
            torch.autocast(device_type="cuda", enabled=False)
            if x.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with guard:  # a quadratic form in bf16 loses the small distances
            diff = features - self.mean  # (B, P, d)
            squared = torch.einsum("bpd,pde,bpe->bp", diff, self.precision, diff)  # (B, P)
        distance = squared.clamp_min(0).sqrt()
        height, width = -(-x.shape[-2] // 4), -(-x.shape[-1] // 4)  # the 1/4 patch grid
        return distance.view(len(x), 1, height, width)
