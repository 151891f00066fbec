"""vaegan: AnoVAEGAN, a VAE whose decoder is also trained to fool a discriminator.

Baur et al. 2018, "Deep Autoencoding Models for Unsupervised Anomaly Segmentation in Brain MR
Images": a VAE's Gaussian likelihood makes reconstructions blurry, and the blur is residual on
every normal tile. An adversarial term on the reconstructions (as in Larsen et al.'s VAE-GAN)
pushes them towards sharp, realistic normal tissue, so what remains in the residual is more
often the anomaly. Scoring is a single pass, like an autoencoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vadflow.tasks.detectors.base import autocast_for, build_seeded
from vadflow.tasks.detectors.components.anomaly_maps import check_fraction, map_and_score
from vadflow.tasks.detectors.components.gan_parts import (
    CollapseGuard,
    GanConfig,
    GanTrainer,
    discriminator_loss,
    frozen,
    generator_nonsaturating_loss,
    per_tile_mean,
)
from vadflow.tasks.detectors.components.training import TrainedDetector, TrainSettings
from vadflow.tasks.detectors.registry import register
from vadflow.tasks.detectors.vaegan.torch_model import AnoVAEGANModel, SpatialVAE

DCGAN_BETAS = (0.5, 0.999)


@dataclass(frozen=True)
class AnoVAEGANConfig(GanConfig):
    """Hyperparameters of vaegan (training, GAN and map fields from GanConfig; `lr` is the
    encoder's and decoder's); saved as config.json beside the weights."""

    latent_channels: int = 16
    bottleneck: int = 8  # latent grid is bottleneck x bottleneck; tile_size / it = 2^k
    discriminator_lr: float = 2e-4
    kl_weight: float = 1.0  # beta on the KL term (per value, like the L1 term)
    adversarial_weight: float = 0.01  # on -log D(x_hat), against an L1 term of ~0.03
    score_top_fraction: float = 0.1  # tile score = mean of this top fraction; 0 = max

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("score_top_fraction", self.score_top_fraction)
        if min(self.kl_weight, self.adversarial_weight) < 0:
            raise ValueError("kl_weight and adversarial_weight must be >= 0")


def vae_objective(
    vae: SpatialVAE, batch: torch.Tensor, kl_weight: float, *, sample: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE part of the loss, per tile: L1 reconstruction + kl_weight * KL, and x_hat.

    KL(q(z|x) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) (Kingma & Welling 2014,
    appendix B), divided by the number of pixel values so both terms are per-value means and
    `kl_weight` keeps its meaning at every tile size. L1 as in Baur et al.
    Returns ((B,) loss, (B, 3, S, S) reconstruction).
    """
    recon, mean, logvar = vae(batch, sample=sample)
    rec = per_tile_mean((batch - recon).abs())  # (B,)
    kl_terms = mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()  # (B, c, b, b)
    kl = 0.5 * kl_terms.flatten(1).sum(dim=1) / batch[0].numel()  # (B,)
    return rec + kl_weight * kl, recon


class VAEGANTrainer(GanTrainer):
    """Per batch: a discriminator step on real tiles vs reconstructions, then a VAE step on
    L1 + beta KL + w_adv * (-log D(x_hat)), then the collapse guard on the reconstructions.

    Validation is the VAE objective (L1 + beta KL, from the posterior mean) on all val tiles:
    a real reconstruction loss, which the discriminator's state does not move.
    """

    def __init__(
        self,
        module: nn.Module,
        settings: TrainSettings,
        device: torch.device,
        *,
        guard: CollapseGuard,
        kl_weight: float,
        adversarial_weight: float,
        discriminator_lr: float,
    ) -> None:
        self.kl_weight = kl_weight
        self.adversarial_weight = adversarial_weight
        self.discriminator_lr = discriminator_lr
        super().__init__(module, settings, device, guard=guard, val_tiles=None)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        wd = self.settings.weight_decay
        return [
            torch.optim.Adam(
                self.module.vae.parameters(),
                lr=self.settings.lr,
                betas=DCGAN_BETAS,
                weight_decay=wd,
            ),
            torch.optim.Adam(
                self.module.discriminator.parameters(),
                lr=self.discriminator_lr,
                betas=DCGAN_BETAS,
                weight_decay=wd,
            ),
        ]

    def train_step(self, batch: torch.Tensor) -> float:
        opt_vae, opt_d = self.optimizers
        vae, discriminator = self.module.vae, self.module.discriminator
        with self.autocast():
            vae_loss, recon = vae_objective(vae, batch, self.kl_weight)  # (b,), (b, 3, S, S)
            real_logit, _ = discriminator(batch)
            fake_logit, _ = discriminator(recon.detach())
            d_loss = discriminator_loss(real_logit, fake_logit)
        self.optimise(opt_d, d_loss, discriminator, "discriminator")
        with frozen(discriminator), self.autocast():
            adversarial = generator_nonsaturating_loss(discriminator(recon)[0])
            loss = vae_loss.mean() + self.adversarial_weight * adversarial
        self.optimise(opt_vae, loss, vae, "vae")
        self.guard.check(recon, batch)
        return vae_loss.mean().item()

    def val_step(self, batch: torch.Tensor) -> float:
        with self.autocast():
            loss, _ = vae_objective(self.module.vae, batch, self.kl_weight, sample=False)
        return loss.mean().item()


@register("vaegan")
class AnoVAEGANDetector(TrainedDetector):
    """Spatial VAE-GAN + per-pixel L1 residual of the posterior-mean reconstruction.

    Anomaly map: |x - x_hat| averaged over RGB, blurred with `map_smoothing_sigma`; x_hat is
    decoded from the posterior mean, so scores are deterministic. Tile score: the mean of the
    top `score_top_fraction` of the map, as in ae_l2 (a few-pixel defect drowns in the mean of
    a whole tile, and the single worst pixel is texture noise).
    """

    config_cls = AnoVAEGANConfig
    config: AnoVAEGANConfig

    def __init__(self, config: AnoVAEGANConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.model = build_seeded(
            cfg.seed,
            lambda: AnoVAEGANModel(
                cfg.tile_size, cfg.base_channels, cfg.latent_channels, cfg.bottleneck
            ),
        ).to(self.device)

    def make_trainer(self) -> VAEGANTrainer:
        cfg = self.config
        return VAEGANTrainer.for_config(
            self.model,
            cfg,
            self.device,
            kl_weight=cfg.kl_weight,
            adversarial_weight=cfg.adversarial_weight,
            discriminator_lr=cfg.discriminator_lr,
        )

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device):
            recon, _, _ = self.model.vae(batch, sample=False)  # (b, 3, H, W)
        residual = (batch - recon.float()).abs()  # (b, 3, H, W)
        cfg = self.config
        return map_and_score(residual, cfg.map_smoothing_sigma, cfg.score_top_fraction)
