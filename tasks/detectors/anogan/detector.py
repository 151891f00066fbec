"""anogan: a DCGAN trained on normal tiles, scored by searching its latent space (AnoGAN).

Schlegl et al. 2017, "Unsupervised Anomaly Detection with Generative Adversarial Networks to
Guide Marker Discovery": a GAN learns the manifold of normal tiles; a tile is anomalous when no
latent code reproduces it. Finding that code is an optimisation per tile (`latent_search`), which
makes scoring slow: f-AnoGAN (`fanogan`) replaces it with an encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vadflow.tasks.detectors.anogan.torch_model import AnoGANModel
from vadflow.tasks.detectors.base import build_seeded
from vadflow.tasks.detectors.components.anomaly_maps import residual_map
from vadflow.tasks.detectors.components.gan_parts import (
    GanTrainer,
    LatentGanConfig,
    discriminator_loss,
    frozen,
    generator_nonsaturating_loss,
    latent_search,
)
from vadflow.tasks.detectors.components.training import TrainedDetector
from vadflow.tasks.detectors.registry import register

# Adam as in DCGAN (Radford et al. 2016, sec. 4): beta1 = 0.5 steadies the adversarial game.
DCGAN_BETAS = (0.5, 0.999)


@dataclass(frozen=True)
class AnoGANConfig(LatentGanConfig):
    """Hyperparameters of anogan (training, GAN and validation fields from LatentGanConfig);
    saved as config.json beside the weights."""

    lr: float = 2e-4  # both players (DCGAN's value)
    # Scoring: Adam on z from a seeded random start. Scoring time is linear in the steps; the
    # paper used 500, 100 already ranked the test textures' defects (tile AUROC ~0.97).
    latent_steps: int = 100
    latent_lr: float = 0.05  # also the validation search's
    feature_weight: float = 0.1  # lambda of (1 - lambda) * residual + lambda * discrimination

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.feature_weight <= 1.0:
            raise ValueError(f"feature_weight must be in [0, 1], got {self.feature_weight}")
        if self.latent_steps < 0:
            raise ValueError(f"latent_steps must be >= 0, got {self.latent_steps}")


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
class AnoGANDetector(TrainedDetector):
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
        self.model = build_seeded(
            cfg.seed, lambda: AnoGANModel(cfg.tile_size, cfg.latent_dim, cfg.base_channels)
        ).to(self.device)

    def make_trainer(self) -> DCGANTrainer:
        cfg = self.config
        return DCGANTrainer.for_config(
            self.model,
            cfg,
            self.device,
            val_search_steps=cfg.val_search_steps,
            val_search_lr=cfg.latent_lr,
            val_tiles=cfg.val_tiles,
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
        return residual_map(residual, cfg.map_smoothing_sigma), found.loss
