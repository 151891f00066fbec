"""padim: PaDiM-style Gaussian per patch position, Mahalanobis distance as the anomaly map.

Fit: get the patch features ready and standardise them (backbones.py, as for patch_knn: the
fixed texture filter bank by default, or a CNN), keep a seeded random subset of `n_features`
feature channels, and fit one Gaussian per position of the feature grid over the normal
training tiles. Each position's covariance is shrunk towards the covariance pooled over all
positions (`shrinkage`), then a small ridge is added, so it stays well conditioned with few
tiles: tiles of a texture are close to stationary, so the pooled estimate is a good target,
while positions at the border (padding) keep their own character. Score: Mahalanobis distance
of each patch to its position's Gaussian, upsampled to the tile and lightly smoothed; the tile
score is its maximum (on the hard synthetic site the maximum measured 0.83 tile AUROC, the
top 10 % 0.81, so padim keeps PaDiM's maximum).

Robust mode (`robust`, for training tiles that may hold anomalies): a trimmed Gaussian. After
the first fit, at each position the `contamination` fraction of training patches farthest from
it (Mahalanobis) is left out and the mean and covariance are fitted again on the rest, one
concentration step of the minimum covariance determinant estimator (Rousseeuw 1999).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vadflow.tasks.detectors.base import EpochCallback, FitReport, check_tile_size
from vadflow.tasks.detectors.components.backbones import (
    PatchFeatureDetector,
    PatchScoreConfig,
    new_features,
)
from vadflow.tasks.detectors.padim.torch_model import PadimModel
from vadflow.tasks.detectors.registry import register


@dataclass(frozen=True)
class PadimConfig(PatchScoreConfig):
    """Hyperparameters of padim (backbone, pretext and map fields from PatchScoreConfig)."""

    tile_size: int = 64  # the Gaussians are per position, so tiles of another size are refused
    n_features: int = 64  # random subset of the feature channels (all when there are fewer)
    shrinkage: float = 0.5  # weight of the pooled covariance in each position's covariance
    ridge: float = 0.01  # added to the diagonal, relative to the mean variance
    score_top_fraction: float = 0.0  # tile score = mean of this top fraction; 0 = max

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile_size < 8 or self.tile_size % 4:
            raise ValueError(f"tile_size must be a multiple of 4 and >= 8, got {self.tile_size}")
        if self.n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")


@register("padim")
class PadimDetector(PatchFeatureDetector):
    """One Gaussian per patch position over random feature channels; Mahalanobis anomaly map."""

    config_cls = PadimConfig
    config: PadimConfig
    model: PadimModel

    def __init__(self, config: PadimConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        grid = math.ceil(cfg.tile_size / 4)  # patch features are on a 1/4 grid
        self.model = PadimModel(new_features(cfg), grid, cfg.n_features)
        self.model.to(self.device)

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
    ) -> FitReport:
        """Pretext-train (or load) the backbone, then fit the per-position Gaussians."""
        check_tile_size(self.family, self.config.tile_size, train=train, val=val)
        if len(train) < 2:
            raise ValueError(f"padim needs at least 2 training tiles, got {len(train)}")
        return super().fit(train, val, on_epoch=on_epoch)

    def fit_normal_patches(self, features: torch.Tensor, train: np.ndarray) -> float:
        """Fit one Gaussian per feature-grid position; returns the mean Mahalanobis distance of
        (up to 256) training tiles' patches to their positions' Gaussians."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        d = self.model.channels.numel()
        channels = torch.randperm(features.shape[1], generator=generator)[:d].sort().values
        x = features[:, channels].flatten(2).permute(2, 0, 1).double()  # (P, N, d)
        mean, precision = self._gaussians(x)
        keep = x.shape[1] - int(cfg.contamination * x.shape[1])
        if cfg.robust and 2 <= keep < x.shape[1]:
            diff = x - mean[:, None]  # (P, N, d)
            squared = torch.einsum("pnd,pde,pne->pn", diff, precision, diff)  # (P, N)
            inliers = squared.topk(keep, dim=1, largest=False).indices  # (P, keep)
            x = torch.gather(x, 1, inliers[..., None].expand(-1, -1, d))  # (P, keep, d)
            mean, precision = self._gaussians(x)
        self.model.channels.copy_(channels)
        self.model.mean.copy_(mean.float())
        self.model.precision.copy_(precision.float())
        return float(self.score(train[:256]).anomaly_map.mean())

    def _gaussians(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position mean (P, d) and precision (P, d, d) of patches x (P, N, d), each
        covariance shrunk towards the pooled one and ridged."""
        cfg = self.config
        d = x.shape[2]
        mean = x.mean(dim=1)  # (P, d)
        centred = x - mean[:, None]
        covariance = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)  # (P, d, d)
        pooled = covariance.mean(dim=0, keepdim=True)  # (1, d, d)
        covariance = (1 - cfg.shrinkage) * covariance + cfg.shrinkage * pooled
        scale = pooled.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-12)
        covariance = covariance + cfg.ridge * scale * torch.eye(d, dtype=covariance.dtype)
        return mean, torch.linalg.inv(covariance)
