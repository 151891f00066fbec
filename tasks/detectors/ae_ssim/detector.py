"""ae_ssim: the ae_l2 autoencoder trained on, and scored by, structural dissimilarity.

Bergmann et al. (2018), "Improving unsupervised defect segmentation by applying structural
similarity to autoencoders": an L2-trained autoencoder reconstructs edges slightly blurred or
shifted, so its residual lights up on every normal edge, while defects of low contrast but wrong
structure hide. Training and scoring on 1 - SSIM over an 11x11 Gaussian window (sigma 1.5) makes
the model care about local structure, and the map then shows structure that is missing or new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vadflow.tasks.detectors.ae_l2.detector import seeded_autoencoder
from vadflow.tasks.detectors.ae_ssim.ssim import ssim_dissimilarity
from vadflow.tasks.detectors.base import autocast_for
from vadflow.tasks.detectors.components.anomaly_maps import AutoencoderConfig, map_and_score
from vadflow.tasks.detectors.components.training import TrainedDetector, Trainer, TrainSettings
from vadflow.tasks.detectors.registry import register


@dataclass(frozen=True)
class AESSIMConfig(AutoencoderConfig):
    """Hyperparameters of ae_ssim (training, map and score fields from AutoencoderConfig);
    saved as config.json beside the weights."""

    latent_channels: int = 16
    bottleneck: int = 8  # latent grid is bottleneck x bottleneck; tile_size / bottleneck = 2^k
    ssim_window: int = 11  # px, odd; Bergmann et al. use 11
    ssim_sigma: float = 1.5  # Gaussian weighting of the window, px
    ssim_channels: str = "gray"  # "gray" (luma, as Bergmann et al.) or "rgb" (per channel)
    # The SSIM window already averages over ~7 px, so no extra blur by default.
    map_smoothing_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ssim_channels not in ("gray", "rgb"):
            raise ValueError(f"ssim_channels must be 'gray' or 'rgb', got {self.ssim_channels!r}")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ValueError(f"ssim_window must be odd and >= 3, got {self.ssim_window}")
        if self.ssim_window > self.tile_size:
            raise ValueError(
                f"ssim_window {self.ssim_window} is larger than tile_size {self.tile_size}"
            )
        if self.ssim_sigma <= 0:
            raise ValueError(f"ssim_sigma must be > 0, got {self.ssim_sigma}")


class SSIMLoss:
    """Per-tile mean structural dissimilarity (b,), the ae_ssim training loss."""

    def __init__(self, config: AESSIMConfig) -> None:
        self.channels = config.ssim_channels
        self.window = config.ssim_window
        self.sigma = config.ssim_sigma

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        dissimilarity = ssim_dissimilarity(
            model(batch), batch, channels=self.channels, window=self.window, sigma=self.sigma
        )  # (b, 1, H, W)
        return dissimilarity.flatten(1).mean(dim=1)  # (b,)


@register("ae_ssim")
class AESSIMDetector(TrainedDetector):
    """Autoencoder + 1 - local SSIM.

    Anomaly map: 1 - SSIM between tile and reconstruction (per channel and averaged, or on luma).
    Tile score: mean of the top `score_top_fraction` of the map, for the reason ae_l2 gives:
    the single worst pixel on a normal tile is texture noise, a whole-tile mean drowns small
    defects.
    Luma is the default: on the generated H&E-like texture (32 px, 10 epochs) it scored tile
    AUROC 0.90 against 0.69 per channel. A single channel of stroma is nearly flat, so its local
    variance is mostly pixel noise, and SSIM's structure term then compares noise with noise.
    """

    config_cls = AESSIMConfig
    config: AESSIMConfig

    def __init__(self, config: AESSIMConfig | None = None) -> None:
        super().__init__(config)
        self.model = seeded_autoencoder(self.config).to(self.device)

    def make_trainer(self) -> Trainer:
        settings = TrainSettings.from_config(self.config)
        return Trainer(self.model, SSIMLoss(self.config), settings, self.device)

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        with autocast_for(self.device):
            recon = self.model(batch)  # (b, 3, H, W)
        anomaly_map = ssim_dissimilarity(
            recon.float(),
            batch,
            channels=cfg.ssim_channels,
            window=cfg.ssim_window,
            sigma=cfg.ssim_sigma,
        )  # (b, 1, H, W)
        return map_and_score(anomaly_map, cfg.map_smoothing_sigma, cfg.score_top_fraction)
