"""fanogan: WGAN-GP on normal tiles, then an encoder into its latent space (f-AnoGAN).

Schlegl et al. 2019, "f-AnoGAN: Fast unsupervised anomaly detection with generative adversarial
networks". Training has two phases: (1) a WGAN-GP generator G and critic D on normal tiles;
(2) with G and D frozen, an encoder E trained "izi_f" style (image -> z -> image, plus the
critic's features), which learns to invert G on normal tiles. Scoring is one pass x -> E -> G,
instead of AnoGAN's hundreds of optimisation steps per tile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vadflow.tasks.detectors.base import (
    EpochCallback,
    FitReport,
    autocast_for,
    build_seeded,
    check_tile_size,
)
from vadflow.tasks.detectors.components.anomaly_maps import residual_map
from vadflow.tasks.detectors.components.gan_parts import (
    CollapseGuard,
    GanTrainer,
    LatentGanConfig,
    frozen,
    gradient_penalty,
    per_tile_mean,
)
from vadflow.tasks.detectors.components.latent_density import (
    LatentScoredDetector,
    check_score_option,
)
from vadflow.tasks.detectors.components.training import Trainer, TrainSettings
from vadflow.tasks.detectors.fanogan.torch_model import FAnoGANModel
from vadflow.tasks.detectors.registry import register

# Adam as in WGAN-GP (Gulrajani et al. 2017, algorithm 1): no momentum, beta2 = 0.9.
WGAN_BETAS = (0.0, 0.9)
GAN_PHASE_DIR = "gan"
ENCODER_PHASE_DIR = "encoder"


@dataclass(frozen=True)
class FAnoGANConfig(LatentGanConfig):
    """Hyperparameters of fanogan (training, GAN and validation fields from LatentGanConfig;
    `epochs` and `lr` are the GAN phase's); saved as config.json beside the weights."""

    lr: float = 1e-4  # generator and critic (WGAN-GP's value)
    encoder_epochs: int | None = None  # encoder phase; None = the same as `epochs`
    encoder_lr: float = 1e-3
    n_critic: int = 5  # critic updates per generator update
    gp_weight: float = 10.0  # lambda of the gradient penalty
    kappa: float = 1.0  # weight of the critic-feature residual in izi_f and in the score
    val_search_lr: float = 0.05  # the GAN phase's validation latent search
    # "residual" (izi_f), "latent" (distance of the encoder's z to the nearest normal tile's)
    # or "combined" (both, standardised on the validation tiles); see latent_density.py.
    score: str = "residual"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_score_option(self.score)
        if self.n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {self.n_critic}")
        if self.encoder_epochs is not None and self.encoder_epochs < 1:
            raise ValueError(f"encoder_epochs must be >= 1 or None, got {self.encoder_epochs}")
        if self.kappa < 0 or self.gp_weight < 0:
            raise ValueError(
                f"kappa and gp_weight must be >= 0, got {self.kappa}, {self.gp_weight}"
            )


class WGANGPTrainer(GanTrainer):
    """WGAN-GP (Gulrajani et al. 2017, algorithm 1) inside the shared loop.

    Every batch is one critic step on L_D = D(G(z)) - D(x) + lambda * GP; every `n_critic`-th
    batch is also a generator step on -D(G(z)), followed by the collapse guard. The reported
    training loss is the critic's Wasserstein estimate D(x) - D(G(z)), which falls as samples
    improve (the paper's fig. 3), unlike the DCGAN losses.
    """

    def __init__(
        self,
        module: nn.Module,
        settings: TrainSettings,
        device: torch.device,
        *,
        guard: CollapseGuard,
        n_critic: int,
        gp_weight: float,
        val_search_steps: int,
        val_search_lr: float,
        val_tiles: int,
    ) -> None:
        self.n_critic = n_critic
        self.gp_weight = gp_weight
        super().__init__(
            module,
            settings,
            device,
            guard=guard,
            val_search_steps=val_search_steps,
            val_search_lr=val_search_lr,
            val_tiles=val_tiles,
        )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr, wd = self.settings.lr, self.settings.weight_decay
        return [
            torch.optim.Adam(net.parameters(), lr=lr, betas=WGAN_BETAS, weight_decay=wd)
            for net in (self.module.generator, self.module.critic)
        ]

    def train_step(self, batch: torch.Tensor) -> float:
        opt_g, opt_d = self.optimizers
        generator, critic = self.module.generator, self.module.critic
        z = generator.sample_latent(len(batch), self.device)  # (b, nz)
        with self.autocast():
            with torch.no_grad():
                fake = generator(z)  # (b, 3, S, S)
            real_score = critic(batch)[0].float()  # (b,)
            fake_score = critic(fake)[0].float()  # (b,)
            distance = real_score.mean() - fake_score.mean()
        penalty = gradient_penalty(critic, batch, fake)
        self.optimise(opt_d, -distance + self.gp_weight * penalty, critic, "critic")

        self.module.critic_steps += 1
        if int(self.module.critic_steps) % self.n_critic == 0:
            with frozen(critic), self.autocast():
                fake = generator(generator.sample_latent(len(batch), self.device))
                g_loss = -critic(fake)[0].float().mean()
            self.optimise(opt_g, g_loss, generator, "generator")
            self.guard.check(fake, batch)
        return distance.item()


def izif(
    model: FAnoGANModel, images: torch.Tensor, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The izi_f quantity (Schlegl et al. 2019, eq. 7 and 10), per tile.

    x -> E(x) = z -> G(z) = x', then
        A(x) = (1/n) ||x - x'||^2 + kappa * (1/n_d) ||f(x) - f(x')||^2,
    with n pixels and n_d critic features f (its last conv block). The same expression is the
    encoder's training loss and the anomaly score. Returns (A (B,), x' (B, 3, S, S)).
    """
    recon = model.generator(model.encoder(images))  # (B, 3, S, S)
    image_residual = per_tile_mean((images - recon) ** 2)  # (B,)
    if kappa == 0:
        return image_residual, recon
    feature_residual = per_tile_mean(
        (model.critic.features(images) - model.critic.features(recon)) ** 2
    )  # (B,)
    return image_residual + kappa * feature_residual, recon


class _EncoderPhase(nn.Module):
    """The encoder phase's view of the model: same submodule names, so its state_dict and
    checkpoints read like the full model's, but `train()` only ever reaches the encoder.

    G and D are frozen in this phase; keeping them in eval mode also keeps G's batch norm on its
    running statistics, the ones scoring will use.
    """

    def __init__(self, model: FAnoGANModel, kappa: float) -> None:
        super().__init__()
        self.generator = model.generator
        self.critic = model.critic
        self.encoder = model.encoder
        self.kappa = kappa

    def train(self, mode: bool = True) -> _EncoderPhase:
        super().train(mode)
        self.generator.eval()
        self.critic.eval()
        return self

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-tile izi_f losses (b,): the trainer reduces them (and can trim them)."""
        return izif(self, batch, self.kappa)[0]  # type: ignore[arg-type]


class _GanPhase(nn.Module):
    """The GAN phase's view: generator, critic and step counter, without the untrained encoder."""

    def __init__(self, model: FAnoGANModel) -> None:
        super().__init__()
        self.generator = model.generator
        self.critic = model.critic
        # The same tensor as the model's buffer: updates and checkpoint loads reach both.
        self.register_buffer("critic_steps", model.critic_steps)


def _encoder_loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return module.loss(batch)  # type: ignore[operator]


@register("fanogan")
class FAnoGANDetector(LatentScoredDetector):
    """WGAN-GP + izi_f encoder; one forward pass per tile.

    Tile score: A(x) = image MSE + kappa * critic-feature MSE of x vs G(E(x)), the quantity the
    encoder was trained to minimise on normal tiles (kappa = 1, as in the paper). Anomaly map:
    (x - G(E(x)))^2 averaged over RGB, blurred with `map_smoothing_sigma`.
    With `score` "latent" or "combined", E(x) is scored by its distance to the nearest code of
    a normal tile, broadcast over the tile (latent_density.py).
    """

    config_cls = FAnoGANConfig
    config: FAnoGANConfig

    def __init__(self, config: FAnoGANConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.model = build_seeded(
            cfg.seed, lambda: FAnoGANModel(cfg.tile_size, cfg.latent_dim, cfg.base_channels)
        ).to(self.device)
        self.init_density(cfg.latent_dim)

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        slides: np.ndarray | None = None,  # unused: the trimmed loss needs no slides
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 1,
        resume_from: Path | None = None,
    ) -> FitReport:
        """Train the WGAN-GP, then the encoder; one report over both phases.

        The report's epochs and loss lists run through the GAN phase (train loss: Wasserstein
        estimate; val: latent-search residual) and then the encoder phase (izi_f on train and
        val); `on_epoch` sees the same numbering. Checkpoints go to `<dir>/gan/` and
        `<dir>/encoder/`; resuming continues whichever phase was unfinished. Last, the latent
        density is fitted on the encoder's codes of `train`, its standardisation on `val`.
        """
        check_tile_size(self.family, self.config.tile_size, train=train, val=val)
        cfg = self.config
        gan_report = self.make_trainer().fit(
            train,
            val,
            on_epoch=on_epoch,
            checkpoint_dir=_phase_dir(checkpoint_dir, GAN_PHASE_DIR),
            checkpoint_every=checkpoint_every,
            resume_from=_phase_dir(resume_from, GAN_PHASE_DIR),
        )

        def shifted(epoch: int, train_loss: float, val_loss: float) -> None:
            if on_epoch is not None:
                on_epoch(gan_report.epochs + epoch, train_loss, val_loss)

        settings = dataclasses.replace(
            TrainSettings.from_config(cfg),
            epochs=cfg.encoder_epochs or cfg.epochs,
            lr=cfg.encoder_lr,
        )
        encoder_resume = _phase_dir(resume_from, ENCODER_PHASE_DIR)
        if encoder_resume is not None and not (encoder_resume / "last.pt").is_file():
            encoder_resume = None  # the run stopped before the encoder phase began
        with frozen(self.model.generator, self.model.critic):
            trainer = Trainer(
                _EncoderPhase(self.model, cfg.kappa), _encoder_loss, settings, self.device
            )
            enc_report = trainer.fit(
                train,
                val,
                on_epoch=shifted,
                checkpoint_dir=_phase_dir(checkpoint_dir or resume_from, ENCODER_PHASE_DIR),
                checkpoint_every=checkpoint_every,
                resume_from=encoder_resume,
            )
        report = FitReport(
            epochs=gan_report.epochs + enc_report.epochs,
            best_epoch=gan_report.epochs + enc_report.best_epoch,
            train_loss=gan_report.train_loss + enc_report.train_loss,
            val_loss=gan_report.val_loss + enc_report.val_loss,
            seconds=gan_report.seconds + enc_report.seconds,
            device=enc_report.device,
            stopped_early=enc_report.stopped_early,
        )
        return self.fit_density(train, val, report)

    def make_trainer(self) -> WGANGPTrainer:
        """The GAN phase's trainer; the encoder phase's is built in `fit`."""
        cfg = self.config
        return WGANGPTrainer.for_config(
            _GanPhase(self.model),
            cfg,
            self.device,
            val_search_steps=cfg.val_search_steps,
            val_search_lr=cfg.val_search_lr,
            val_tiles=cfg.val_tiles,
            n_critic=cfg.n_critic,
            gp_weight=cfg.gp_weight,
        )

    def _codes(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device):
            z = self.model.encoder(batch)  # (b, latent_dim)
        return z.float()

    def _residual_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device):
            score, recon = izif(self.model, batch, self.config.kappa)  # (b,), (b, 3, H, W)
        residual = (batch - recon.float()) ** 2  # (b, 3, H, W)
        return residual_map(residual, self.config.map_smoothing_sigma), score


def _phase_dir(root: Path | None, phase: str) -> Path | None:
    return None if root is None else Path(root) / phase
