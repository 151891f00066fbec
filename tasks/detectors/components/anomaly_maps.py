"""From a per-pixel difference to an anomaly map and a tile score, and the config fields that
steer it.

Every family that compares a tile with something (its reconstruction, the nearest normal patch,
the nearest normal code) ends the same way: average the difference over colour channels,
blur it with a Gaussian of `map_smoothing_sigma` px so single-pixel texture noise averages out,
and score the tile by the mean of the map's top `score_top_fraction` (`map_and_score`).

The config bases here extend `TrainingConfig`: `SmoothedMapConfig` (the blur only: anogan and
fanogan score tiles their own way), `ScoreMapConfig` (blur and top fraction) and
`AutoencoderConfig`, the fields ae_l2, ae_ssim, vae and spatial_vae share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vadflow.tasks.detectors.base import gaussian_smooth, top_fraction_mean
from vadflow.tasks.detectors.components.training import TrainingConfig


def check_fraction(name: str, value: float) -> None:
    """Refuse a fraction setting outside [0, 1], naming the field."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class SmoothedMapConfig(TrainingConfig):
    """Training fields plus the blur of the anomaly map."""

    map_smoothing_sigma: float = 1.0  # Gaussian sigma in px on the anomaly map; 0 = none

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.map_smoothing_sigma < 0:
            raise ValueError(f"map_smoothing_sigma must be >= 0, got {self.map_smoothing_sigma}")


@dataclass(frozen=True)
class ScoreMapConfig(SmoothedMapConfig):
    """The blurred map plus the tile score taken from it (`map_and_score`)."""

    score_top_fraction: float = 0.1  # tile score = mean of this top fraction of the map; 0 = max

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("score_top_fraction", self.score_top_fraction)


@dataclass(frozen=True)
class AutoencoderConfig(ScoreMapConfig):
    """The fields the autoencoder families (ae_l2, ae_ssim, vae, spatial_vae) share."""

    tile_size: int = 64  # 32, 64, 128 or 256 px; tiles of another size are refused
    base_channels: int = 32  # encoder width at the first stage, doubling per stage (max 256)
    robust_trim_fraction: float = 0.0  # >0: trimmed loss for contaminated training sets
    robust_warmup_epochs: int = 2  # plain epochs before the trim starts


def residual_map(per_pixel: torch.Tensor, sigma: float) -> torch.Tensor:
    """(b, C, H, W) per-pixel difference -> (b, 1, H, W) map: the channel mean, blurred."""
    anomaly_map = per_pixel.mean(dim=1, keepdim=True)  # (b, 1, H, W)
    return gaussian_smooth(anomaly_map, sigma)


def map_and_score(
    per_pixel: torch.Tensor, sigma: float, top_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, C, H, W) per-pixel difference -> anomaly map (b, 1, H, W) and tile score (b,), the
    mean of the map's top `top_fraction` (the maximum at 0)."""
    anomaly_map = residual_map(per_pixel, sigma)
    return anomaly_map, top_fraction_mean(anomaly_map, top_fraction)
