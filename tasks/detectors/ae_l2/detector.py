"""ae_l2: a convolutional autoencoder trained with an L2 reconstruction loss.

Trained on normal tiles only, it learns to reproduce normal tissue (or a normal surface) and
fails on what it never saw; the squared residual is the anomaly map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vadflow.tasks.detectors.ae_l2.torch_model import ConvAutoencoder
from vadflow.tasks.detectors.base import (
    EpochCallback,
    FitReport,
    autocast_for,
    check_tile_size,
    gaussian_smooth,
    top_fraction_mean,
)
from vadflow.tasks.detectors.components.latent_density import (
    LatentScoredDetector,
    check_score_option,
)
from vadflow.tasks.detectors.components.training import Trainer, TrainSettings
from vadflow.tasks.detectors.registry import register


@dataclass(frozen=True)
class AEL2Config:
    """Hyperparameters of ae_l2; saved as config.json beside the weights."""

    tile_size: int = 64  # 32, 64, 128 or 256 px; tiles of another size are refused
    base_channels: int = 32  # encoder width at the first stage, doubling per stage (max 256)
    latent_channels: int = 16
    bottleneck: int = 8  # latent grid is bottleneck x bottleneck; tile_size / bottleneck = 2^k
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    min_delta: float = 1e-3  # relative val-loss improvement that resets patience
    grad_clip: float = 1.0
    seed: int = 0
    augment: bool = True  # random flips in training
    robust_trim_fraction: float = 0.0  # >0: trimmed loss for contaminated training sets
    robust_warmup_epochs: int = 2  # plain epochs before the trim starts
    device: str = "auto"
    map_smoothing_sigma: float = 1.0  # Gaussian sigma in px on the residual map; 0 = none
    score_top_fraction: float = 0.1  # tile score = mean of this top fraction; 0 = max
    # "residual", "latent" (distance of each bottleneck cell's code to the nearest normal
    # code) or "combined" (both, standardised on the validation tiles); see latent_density.py.
    score: str = "residual"
    latent_top_fraction: float = 1.0  # latent tile score = mean of this top fraction of its map

    def __post_init__(self) -> None:
        check_score_option(self.score)
        if not 0.0 <= self.score_top_fraction <= 1.0:
            raise ValueError(f"score_top_fraction must be in [0, 1], got {self.score_top_fraction}")
        if not 0.0 <= self.latent_top_fraction <= 1.0:
            raise ValueError(
                f"latent_top_fraction must be in [0, 1], got {self.latent_top_fraction}"
            )
        if self.map_smoothing_sigma < 0:
            raise ValueError(f"map_smoothing_sigma must be >= 0, got {self.map_smoothing_sigma}")


def reconstruction_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Per-tile mean squared error (b,), in float32 even when the forward pass ran in bf16.

    Per tile, so the trainer can trim the worst tiles in robust mode; its mean is the batch MSE.
    """
    squared = F.mse_loss(model(batch).float(), batch.float(), reduction="none")  # (b, 3, H, W)
    return squared.flatten(1).mean(dim=1)  # (b,)


@register("ae_l2")
class AEL2Detector(LatentScoredDetector):
    """Autoencoder + per-pixel L2 residual, or the density of its bottleneck codes.

    Anomaly map: squared residual averaged over RGB, blurred with `map_smoothing_sigma`.
    Tile score: mean of the top `score_top_fraction` (10 %) of the map's pixels, chosen on the
    generated-texture test (32 px, defects of a few pixels; tile AUROC over 3 defect kinds):
    the plain max scored 0.72-0.80, because on normal tiles the single worst pixel is a nucleus edge
    the autoencoder cannot place exactly, so it is noise; the whole-tile mean scored ~0.95 on
    8 px defects but fell to ~0.85 when they shrank to 5 px, as small defects drown in the
    average; the top 10 % held 0.98 and 0.92. With a 1 px blur the ranking is the same.
    With `score` "latent" or "combined", each cell of the bottleneck grid is scored by the
    distance of its code to the nearest normal cell's, upsampled to the tile; the latent tile
    score is the mean of the top `latent_top_fraction` of that map (latent_density.py).
    """

    config_cls = AEL2Config
    config: AEL2Config

    def __init__(self, config: AEL2Config | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        # Seeded construction without touching the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = ConvAutoencoder(
                tile_size=cfg.tile_size,
                base_channels=cfg.base_channels,
                latent_channels=cfg.latent_channels,
                bottleneck=cfg.bottleneck,
            )
        self.model.to(self.device)
        self.init_density(cfg.latent_channels)

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 1,
        resume_from: Path | None = None,
    ) -> FitReport:
        """Train on normal tiles (see `Trainer.fit` for checkpoints, resume and early
        stopping), then fit the latent density on `train` and its standardisation on `val`."""
        check_tile_size(self.family, self.config.tile_size, train=train, val=val)
        trainer = Trainer(
            self.model, reconstruction_loss, TrainSettings.from_config(self.config), self.device
        )
        report = trainer.fit(
            train,
            val,
            on_epoch=on_epoch,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume_from=resume_from,
        )
        return self.fit_density(train, val, report)

    def _codes(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device):
            codes = self.model.encoder(batch)  # (b, latent_channels, bottleneck, bottleneck)
        return codes.float()

    def _residual_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device):
            recon = self.model(batch)  # (b, 3, H, W)
        residual = (recon.float() - batch) ** 2  # (b, 3, H, W)
        anomaly_map = residual.mean(dim=1, keepdim=True)  # (b, 1, H, W)
        anomaly_map = gaussian_smooth(anomaly_map, self.config.map_smoothing_sigma)
        return anomaly_map, top_fraction_mean(anomaly_map, self.config.score_top_fraction)
