"""draem: a from-scratch detector trained on normal tiles with synthetic anomalies.

For sites that cannot use ImageNet weights. DRAEM (Zavrtanik et al. 2021, 98.0 image AUROC on
MVTec AD without pretrained weights) turns anomaly detection into segmentation: normal tiles
are corrupted on the fly through Perlin-noise masks (`synthetic.py`), a reconstructive
subnetwork learns to return the normal tile, and a discriminative U-Net learns to segment the
corrupted region from the tile and its reconstruction (`torch_model.py`, `loss.py`). At
scoring time real anomalies take the place of the synthetic ones.

Anomaly map: the segmenter's logit per pixel, blurred with `map_smoothing_sigma` (DRAEM
averages its map over a window before taking the maximum, so one confident pixel does not
decide a tile). Tile score: the maximum of that map. Logits rather than probabilities so
confident tiles do not tie at 1.0 (a slide maximum over ties cannot rank slides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vadflow.tasks.detectors.base import autocast_for, build_seeded, gaussian_smooth
from vadflow.tasks.detectors.components.anomaly_maps import SmoothedMapConfig
from vadflow.tasks.detectors.components.training import (
    TrainedDetector,
    Trainer,
    TrainSettings,
)
from vadflow.tasks.detectors.draem.loss import DraemLoss
from vadflow.tasks.detectors.draem.synthetic import SOURCES, AnomalySynthesis
from vadflow.tasks.detectors.draem.torch_model import DraemNet
from vadflow.tasks.detectors.registry import register

# Validation anomalies come from their own stream, apart from the training draws.
VAL_SEED_OFFSET = 7919


@dataclass(frozen=True)
class DraemConfig(SmoothedMapConfig):
    """Hyperparameters of draem (training fields from TrainingConfig, the map blur from
    SmoothedMapConfig); saved as config.json beside the weights.

    The anomaly fields are `AnomalySynthesis`'s (see there), prefixed `anomaly_`.
    """

    tile_size: int = 64  # tiles of another size are refused
    base_channels: int = 16  # U-Net and reconstructor width at full resolution, doubling down
    depth: int = 3  # halvings in both subnetworks; tile_size must be a multiple of 2^depth
    reconstruction: bool = True  # False: the segmenter reads the tile alone (half the cost)
    recon_weight: float = 1.0  # weight of the reconstruction error beside the focal loss
    focal_gamma: float = 2.0
    epochs: int = 10
    lr: float = 2e-3
    batch_size: int = 32
    patience: int = 10
    map_smoothing_sigma: float = 2.0
    anomaly_probability: float = 0.5
    anomaly_sources: tuple[str, ...] = SOURCES
    anomaly_colour_match: float = 0.75
    anomaly_max_blend: float = 0.5
    anomaly_threshold: tuple[float, float] = (0.2, 0.5)
    anomaly_edge_softness: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.synthesis()  # refuses a bad anomaly setting now, not at the first training step
        if self.base_channels < 1 or self.depth < 1:
            raise ValueError(
                f"base_channels and depth must be >= 1, got {self.base_channels}, {self.depth}"
            )
        if self.recon_weight < 0 or self.focal_gamma < 0:
            raise ValueError(
                f"recon_weight and focal_gamma must be >= 0, got {self.recon_weight}, "
                f"{self.focal_gamma}"
            )

    def synthesis(self) -> AnomalySynthesis:
        """The anomaly settings as the synthesiser takes them."""
        return AnomalySynthesis(
            probability=self.anomaly_probability,
            sources=tuple(self.anomaly_sources),
            colour_match=self.anomaly_colour_match,
            max_blend=self.anomaly_max_blend,
            threshold=tuple(self.anomaly_threshold),  # type: ignore[arg-type]
            edge_softness=self.anomaly_edge_softness,
        )


class DraemTrainer(Trainer):
    """The shared loop with DRAEM's loss; validation anomalies are redrawn identically for
    every epoch, so early stopping compares epochs on one fixed validation set."""

    def __init__(self, module: DraemNet, config: DraemConfig, device: torch.device) -> None:
        settings = TrainSettings.from_config(config)
        self.val_seed = config.seed + VAL_SEED_OFFSET
        self.val_generator = torch.Generator().manual_seed(self.val_seed)
        super().__init__(module, self._placeholder_loss, settings, device)
        # The training anomalies draw from the loop's data generator (shuffling, augmentation),
        # which checkpoints save and resume restores.
        self.loss_fn = DraemLoss(
            config.synthesis(),
            gamma=config.focal_gamma,
            recon_weight=config.recon_weight if config.reconstruction else 0.0,
            train_generator=self.data_rng,
            val_generator=self.val_generator,
        )

    @staticmethod
    def _placeholder_loss(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("DraemTrainer sets its loss after the base constructor")

    def evaluate(self, tiles: np.ndarray) -> float:
        self.val_generator.manual_seed(self.val_seed)
        return super().evaluate(tiles)


@register("draem")
class DraemDetector(TrainedDetector):
    """Synthetic-anomaly segmenter (DRAEM): map = blurred segmentation logit, score = its max."""

    config_cls = DraemConfig
    config: DraemConfig
    score_range = (-math.inf, math.inf)  # logits

    def __init__(self, config: DraemConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.model = build_seeded(
            cfg.seed,
            lambda: DraemNet(
                tile_size=cfg.tile_size,
                base_channels=cfg.base_channels,
                depth=cfg.depth,
                reconstruction=cfg.reconstruction,
            ),
        ).to(self.device)

    def make_trainer(self) -> Trainer:
        return DraemTrainer(self.model, self.config, self.device)

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device):
            _, logits = self.model(batch)  # (b, 1, H, W)
        anomaly_map = gaussian_smooth(logits.float(), self.config.map_smoothing_sigma)
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)  # (b, 1, H, W), (b,)
