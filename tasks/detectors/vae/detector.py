"""vae: a variational autoencoder with a dense bottleneck, scored by reconstruction.

A VAE regularises the autoencoder's latent towards a standard normal, so the decoder can only
produce what is typical of the training tiles: an anomaly is pulled towards normal appearance
and leaves a residual. Two scores: the residual of the posterior-mean reconstruction (cheap,
deterministic), or the reconstruction probability of An & Cho (2015), the negative
log-likelihood of the tile averaged over several posterior samples, which also counts how
unstable the reconstruction is where the encoder is unsure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vadflow.tasks.detectors.base import autocast_for, build_seeded
from vadflow.tasks.detectors.components.anomaly_maps import map_and_score
from vadflow.tasks.detectors.components.latent_density import (
    LatentScoredConfig,
    LatentScoredDetector,
)
from vadflow.tasks.detectors.components.training import Trainer, TrainSettings
from vadflow.tasks.detectors.registry import register
from vadflow.tasks.detectors.vae.loss import ELBOLoss, gaussian_nll
from vadflow.tasks.detectors.vae.torch_model import DenseVAE, GaussianVAE

SCORE_MODES = ("residual", "recon_prob")


@dataclass(frozen=True)
class VAEConfigBase(LatentScoredConfig):
    """Fields shared by the vae and spatial_vae configs (each adds its bottleneck's shape);
    training, map and score fields come from LatentScoredConfig. `seed` also seeds the
    recon_prob samples, so scores are reproducible."""

    beta: float = 1.0  # KL weight (beta-VAE); < 1 sharper reconstructions, > 1 smoother latent
    kl_warmup_epochs: int = 5  # KL weight ramps linearly from 0 over this many epochs
    recon_sigma: float = 0.1  # std of the Gaussian decoder, in [0, 1] pixel units
    score_mode: str = "residual"  # "residual" (of the mean reconstruction) or "recon_prob"
    n_samples: int = 8  # posterior samples per tile for score_mode="recon_prob"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.beta < 0 or self.recon_sigma <= 0:
            raise ValueError(
                f"beta must be >= 0 and recon_sigma > 0, got {self.beta}, {self.recon_sigma}"
            )
        if self.kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs}")


@dataclass(frozen=True)
class VAEConfig(VAEConfigBase):
    """Hyperparameters of vae; saved as config.json beside the weights."""

    latent_dim: int = 128  # size of the dense Gaussian latent
    bottleneck: int = 4  # conv feature grid before the dense layers; tile_size / it = 2^k


class KLWarmupTrainer(Trainer):
    """The shared trainer, plus the KL warm-up: the ELBO's KL weight is 0 in epoch 1 and reaches
    `beta` after `warmup_epochs` epochs (its ramp depends on the epoch only, so resume works)."""

    def __init__(
        self,
        module: nn.Module,
        loss_fn: ELBOLoss,
        settings: TrainSettings,
        device: torch.device,
        *,
        warmup_epochs: int,
    ) -> None:
        super().__init__(module, loss_fn, settings, device)
        self.elbo = loss_fn
        self.warmup_epochs = warmup_epochs

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        if self.warmup_epochs > 0:
            self.elbo.kl_scale = min(1.0, (epoch - 1) / self.warmup_epochs)
        else:
            self.elbo.kl_scale = 1.0


@register("vae")
class VAEDetector(LatentScoredDetector):
    """Dense-bottleneck VAE; map = per-pixel residual (or NLL), tile score = top-fraction mean.

    Anomaly map, score_mode="residual": squared residual of the posterior-mean reconstruction,
    averaged over RGB. score_mode="recon_prob": the Gaussian negative log-likelihood
    (x - x_hat)^2 / (2 sigma^2), averaged over RGB and `n_samples` posterior samples. Both are
    blurred by `map_smoothing_sigma`; the tile score is the mean of the top
    `score_top_fraction` of the map, as in ae_l2.
    The recon_prob samples share one seeded set of standard-normal draws for every tile, so a
    tile's score does not depend on which batch it is scored in, or on any global RNG.
    With `score` "latent" or "combined", the posterior mean is scored by its distance to the
    nearest normal one (latent_density.py): broadcast over the tile for the dense latent,
    upsampled from the grid for spatial_vae's (tile score: `latent_top_fraction`).
    """

    config_cls = VAEConfig
    config: VAEConfigBase
    model: GaussianVAE

    def __init__(self, config: VAEConfigBase | None = None) -> None:
        super().__init__(config)
        self.model = build_seeded(self.config.seed, self._build_model).to(self.device)
        self.init_density(self.model.latent_shape[0])

    def _build_model(self) -> GaussianVAE:
        cfg = self.config
        assert isinstance(cfg, VAEConfig)
        return DenseVAE(
            tile_size=cfg.tile_size,
            base_channels=cfg.base_channels,
            latent_dim=cfg.latent_dim,
            bottleneck=cfg.bottleneck,
        )

    def make_trainer(self) -> Trainer:
        cfg = self.config
        return KLWarmupTrainer(
            self.model,
            ELBOLoss(beta=cfg.beta, recon_sigma=cfg.recon_sigma),
            TrainSettings.from_config(cfg),
            self.device,
            warmup_epochs=cfg.kl_warmup_epochs,
        )

    def _codes(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device):
            mu, _ = self.model.encode(batch)  # (b, *latent_shape)
        return mu.float()

    def _residual_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        with autocast_for(self.device):
            mu, logvar = self.model.encode(batch)  # each (b, *latent)
            if cfg.score_mode == "residual":
                recon = self.model.decode(mu)  # (b, 3, H, W)
                per_value = (recon.float() - batch) ** 2  # (b, 3, H, W)
            else:
                std = torch.exp(0.5 * logvar.float())
                per_value = torch.zeros_like(batch)  # (b, 3, H, W)
                for noise in self._score_noise():  # each (*latent), broadcast over the batch
                    recon = self.model.decode(mu.float() + std * noise)  # (b, 3, H, W)
                    per_value += gaussian_nll(batch, recon, cfg.recon_sigma)
                per_value /= cfg.n_samples
        return map_and_score(per_value, cfg.map_smoothing_sigma, cfg.score_top_fraction)

    def _score_noise(self) -> torch.Tensor:
        """(n_samples, *latent_shape) standard-normal draws, the same on every call."""
        generator = torch.Generator().manual_seed(self.config.seed)
        shape = (self.config.n_samples, *self.model.latent_shape)
        return torch.randn(shape, generator=generator).to(self.device)
