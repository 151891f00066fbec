"""anogan: a DCGAN trained on normal tiles, scored by searching its latent space (AnoGAN).

Schlegl et al. 2017, "Unsupervised Anomaly Detection with Generative Adversarial Networks to
Guide Marker Discovery": a GAN learns the manifold of normal tiles; a tile is anomalous when no
latent code reproduces it. Finding that code is an optimisation per tile (`latent_search`), which
makes scoring slow: f-AnoGAN (`fanogan`) replaces it with an encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vadflow.tasks.detectors.anogan.torch_model import AnoGANModel
from vadflow.tasks.detectors.base import (
    Detector,
    EpochCallback,
    FitReport,
    check_tile_size,
    gaussian_smooth,
)
from vadflow.tasks.detectors.components.gan_parts import (
    CollapseGuard,
    GanTrainer,
    discriminator_loss,
    frozen,
    gan_stages,
    generator_nonsaturating_loss,
    latent_search,
)
from vadflow.tasks.detectors.components.training import TrainSettings
from vadflow.tasks.detectors.registry import register

# Adam as in DCGAN (Radford et al. 2016, sec. 4): beta1 = 0.5 steadies the adversarial game.
DCGAN_BETAS = (0.5, 0.999)


@dataclass(frozen=True)
class AnoGANConfig:
    """Hyperparameters of anogan; saved as config.json beside the weights."""

    tile_size: int = 64  # 4 x a power of two: 32, 64, 128 or 256 px
    latent_dim: int = 64
    base_channels: int = 32  # discriminator width at the first stage, doubling per stage
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-4  # both players (DCGAN's value)
    weight_decay: float = 0.0
    patience: int = 10  # epochs without better validation coverage before stopping
    min_delta: float = 0.0
    grad_clip: float = 10.0  # loose: only there to stop a runaway step
    seed: int = 0
    augment: bool = True  # random flips in training
    device: str = "auto"
    # Scoring: Adam on z from a seeded random start. Scoring time is linear in the steps; the
    # paper used 500, 100 already ranked the test textures' defects (tile AUROC ~0.97).
    latent_steps: int = 100
    latent_lr: float = 0.05
    feature_weight: float = 0.1  # lambda of (1 - lambda) * residual + lambda * discrimination
    map_smoothing_sigma: float = 1.0  # Gaussian sigma in px on the residual map; 0 = none
    # Collapse guard: generated per-pixel variance below this fraction of the real batch's ...
    collapse_min_ratio: float = 0.02
    collapse_patience: int = 25  # ... for this many consecutive steps stops the run
    # Validation (early stopping): residual after a short latent search on the first val tiles.
    val_search_steps: int = 20
    val_tiles: int = 64

    def __post_init__(self) -> None:
        gan_stages(self.tile_size)
        if not 0.0 <= self.feature_weight <= 1.0:
            raise ValueError(f"feature_weight must be in [0, 1], got {self.feature_weight}")
        if self.latent_steps < 0 or self.val_search_steps < 0 or self.val_tiles < 1:
            raise ValueError("latent_steps and val_search_steps must be >= 0, val_tiles >= 1")
        if self.map_smoothing_sigma < 0:
            raise ValueError(f"map_smoothing_sigma must be >= 0, got {self.map_smoothing_sigma}")


class DCGANTrainer(GanTrainer):
    """Alternating DCGAN updates with the non-saturating generator loss.

    Per batch: one discriminator step on real vs generated tiles, then one generator step on
    the same generated tiles, then the collapse guard on them. The reported training loss is the
    discriminator's (2 log 2 ~ 1.39 at the game's equilibrium).
    """

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr, wd = self.settings.lr, self.settings.weight_decay
        return [
            torch.optim.Adam(net.parameters(), lr=lr, betas=DCGAN_BETAS, weight_decay=wd)
            for net in (self.module.generator, self.module.discriminator)
        ]

    def train_step(self, batch: torch.Tensor) -> float:
        opt_g, opt_d = self.optimizers
        generator, discriminator = self.module.generator, self.module.discriminator
        z = generator.sample_latent(len(batch), self.device)  # (b, nz)
        with self.autocast():
            fake = generator(z)  # (b, 3, S, S)
            real_logit, _ = discriminator(batch)
            fake_logit, _ = discriminator(fake.detach())
            d_loss = discriminator_loss(real_logit, fake_logit)
        d_value = self.optimise(opt_d, d_loss, discriminator, "discriminator")
        with frozen(discriminator), self.autocast():
            g_loss = generator_nonsaturating_loss(discriminator(fake)[0])
        self.optimise(opt_g, g_loss, generator, "generator")
        self.guard.check(fake, batch)
        return d_value


@register("anogan")
class AnoGANDetector(Detector):
    """DCGAN + latent search per tile.

    Tile score: the search objective at the last step, (1 - lambda) R + lambda D with lambda = 0.1
    (`latent_search`), as in the paper's anomaly score A(x). Anomaly map: |x - G(z_n)| averaged
    over RGB, blurred with `map_smoothing_sigma` (the residual image of the paper).
    Scoring cost is `latent_steps` forward and backward passes of G and D per batch.
    """

    config_cls = AnoGANConfig
    config: AnoGANConfig

    def __init__(self, config: AnoGANConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = AnoGANModel(cfg.tile_size, cfg.latent_dim, cfg.base_channels)
        self.model.to(self.device)

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
        """Train the GAN on normal tiles; `Trainer.fit` documents checkpoints and resume.

        Raises DivergedError (best weights restored) on NaN/inf or generator collapse.
        """
        check_tile_size(self.family, self.config.tile_size, train=train, val=val)
        cfg = self.config
        trainer = DCGANTrainer(
            self.model,
            TrainSettings.from_config(cfg),
            self.device,
            guard=CollapseGuard(cfg.collapse_min_ratio, cfg.collapse_patience),
            val_search_steps=cfg.val_search_steps,
            val_search_lr=cfg.latent_lr,
            val_tiles=cfg.val_tiles,
        )
        return trainer.fit(
            train,
            val,
            on_epoch=on_epoch,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume_from=resume_from,
        )

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        found = latent_search(
            self.model.generator,
            batch,
            steps=cfg.latent_steps,
            lr=cfg.latent_lr,
            discriminator=self.model.discriminator,
            feature_weight=cfg.feature_weight,
            seed=cfg.seed,
        )
        residual = (batch - found.reconstruction).abs()  # (b, 3, H, W)
        anomaly_map = residual.mean(dim=1, keepdim=True)  # (b, 1, H, W)
        return gaussian_smooth(anomaly_map, cfg.map_smoothing_sigma), found.loss
