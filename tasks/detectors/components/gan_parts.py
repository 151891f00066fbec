"""Pieces the GAN families (anogan, fanogan, vaegan) share: their config bases, DCGAN-style
networks, the WGAN-GP gradient penalty, batched latent search, a collapse guard and a `Trainer`
subclass for GANs (`GanTrainer.for_config` builds any of them from a family config).

Nothing here is a detector; the family folders combine these into one. The training loop
itself (epochs, early stopping, best-weight restore, checkpoints, resume, the NaN guard) stays in
`tasks.detectors.training.Trainer`: `GanTrainer` only replaces the optimiser step, so every
family fails, checkpoints and resumes the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vadflow.tasks.detectors.base import autocast_for
from vadflow.tasks.detectors.components.anomaly_maps import SmoothedMapConfig
from vadflow.tasks.detectors.components.training import NonFiniteStep, Trainer, TrainSettings

# DCGAN's networks start (generator) and end (discriminator) at a 4 x 4 grid.
FIRST_GRID = 4


def gan_stages(tile_size: int) -> int:
    """Number of x2 resolution steps between a 4 x 4 grid and a `tile_size` tile."""
    stages = math.log2(tile_size / FIRST_GRID) if tile_size >= FIRST_GRID else -1.0
    if stages < 1 or not stages.is_integer():
        raise ValueError(f"GAN tile_size must be 4 times a power of two (8..256), got {tile_size}")
    return int(stages)


def stage_widths(tile_size: int, base_channels: int, max_channels: int = 256) -> list[int]:
    """Channel width per stage, finest first: base, 2 base, 4 base, ... capped at max."""
    return [min(base_channels * 2**i, max_channels) for i in range(gan_stages(tile_size))]


@dataclass(frozen=True)
class GanConfig(SmoothedMapConfig):
    """The fields every GAN family's config shares: the training and map-blur fields, the tile
    and network width, and the collapse guard's settings (`CollapseGuard`)."""

    tile_size: int = 64  # 4 x a power of two (the discriminator's grid): 32, 64, 128 or 256 px
    base_channels: int = 32  # discriminator width at the first stage, doubling per stage
    # Collapse guard: generated per-pixel variance below this fraction of the real batch's ...
    collapse_min_ratio: float = 0.02
    collapse_patience: int = 25  # ... for this many consecutive steps stops the run

    def __post_init__(self) -> None:
        super().__post_init__()
        gan_stages(self.tile_size)


@dataclass(frozen=True)
class LatentGanConfig(GanConfig):
    """GanConfig for a generator drawing from a latent prior (anogan, fanogan), validated by how
    well a short latent search covers held-out normal tiles (`GanTrainer`)."""

    latent_dim: int = 64
    patience: int = 10  # epochs without better validation coverage before stopping
    min_delta: float = 0.0
    grad_clip: float = 10.0  # loose: only there to stop a runaway step
    # Validation (early stopping): residual after a short latent search on the first val tiles.
    val_search_steps: int = 20
    val_tiles: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_search_steps < 0 or self.val_tiles < 1:
            raise ValueError(
                f"val_search_steps must be >= 0 and val_tiles >= 1, got "
                f"{self.val_search_steps}, {self.val_tiles}"
            )


def _groups(channels: int) -> int:
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


def _norm(kind: str, channels: int) -> nn.Module:
    """'batch' (DCGAN), 'layer' (per-sample, as WGAN-GP's critic needs), 'group' or 'none'."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        # GroupNorm with one group normalises each sample over (C, H, W): layer norm for maps.
        return nn.GroupNorm(1, channels)
    if kind == "group":
        return nn.GroupNorm(_groups(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use 'batch', 'layer', 'group' or 'none'")


def up_block(c_in: int, c_out: int, norm: str = "batch") -> nn.Sequential:
    """x2 upsampling block of a DCGAN generator.

    Nearest upsampling + 3x3 conv instead of DCGAN's 4x4 transposed conv: a transposed conv
    leaves a checkerboard pattern that would show up as periodic residual on every normal tile.
    """
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=norm == "none"),
        _norm(norm, c_out),
        nn.ReLU(inplace=True),
    )


def down_block(c_in: int, c_out: int, norm: str = "batch") -> nn.Sequential:
    """/2 block of a DCGAN discriminator: 4x4 strided conv, norm, LeakyReLU(0.2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=norm == "none"),
        _norm(norm, c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


class DCGANGenerator(nn.Module):
    """z (B, latent_dim) -> tile (B, 3, S, S) in [0, 1] (Radford et al. 2016, DCGAN).

    A linear projection to a 4 x 4 grid, then one x2 up block per stage, then a 3x3 conv to RGB
    and a sigmoid (the tiles are in [0, 1], not DCGAN's [-1, 1]).
    """

    def __init__(
        self,
        latent_dim: int = 64,
        tile_size: int = 64,
        base_channels: int = 32,
        norm: str = "batch",
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        widths = stage_widths(tile_size, base_channels, max_channels)
        self.latent_dim = latent_dim
        self.tile_size = tile_size
        self.first_width = widths[-1]
        self.project = nn.Linear(latent_dim, widths[-1] * FIRST_GRID**2, bias=norm == "none")
        self.project_norm = nn.Sequential(_norm(norm, widths[-1]), nn.ReLU(inplace=True))
        last = max(base_channels // 2, 8)
        blocks = [
            up_block(c_hi, c_lo, norm)
            for c_hi, c_lo in zip(widths[::-1], [*widths[::-1][1:], last], strict=True)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(last, 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z)  # (B, C * 16)
        x = x.view(len(z), self.first_width, FIRST_GRID, FIRST_GRID)  # (B, C, 4, 4)
        x = self.blocks(self.project_norm(x))  # (B, last, S, S)
        return torch.sigmoid(self.to_rgb(x))  # (B, 3, S, S)

    def sample_latent(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z ~ N(0, I), (n, latent_dim); drawn on the CPU so a seeded `generator` is portable."""
        return torch.randn(n, self.latent_dim, generator=generator).to(device)


class DCGANDiscriminator(nn.Module):
    """Tile (B, 3, S, S) -> (logit (B,), features (B, C, 4, 4)).

    The features are the last conv block's activations, the "intermediate layer f" of AnoGAN's
    discrimination loss and f-AnoGAN's izi_f loss. The first block has no norm, as in DCGAN.
    With `norm='layer'` it is a WGAN-GP critic (no batch norm: the gradient penalty is per sample,
    and batch statistics would couple the samples).
    """

    def __init__(
        self,
        tile_size: int = 64,
        base_channels: int = 32,
        norm: str = "batch",
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        widths = stage_widths(tile_size, base_channels, max_channels)
        blocks = [down_block(3, widths[0], "none")]
        blocks += [down_block(a, b, norm) for a, b in zip(widths, widths[1:], strict=False)]
        self.blocks = nn.Sequential(*blocks)
        self.feature_channels = widths[-1]
        # A 4x4 "valid" conv over the final grid: DCGAN's output layer.
        self.head = nn.Conv2d(widths[-1], 1, kernel_size=FIRST_GRID)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, C, 4, 4)."""
        return self.blocks(x * 2.0 - 1.0)  # centre the input as DCGAN's [-1, 1] data were

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)  # (B, C, 4, 4)
        return self.head(feats).flatten(), feats  # (B,), (B, C, 4, 4)


class ConvEncoder(nn.Module):
    """Tile (B, 3, S, S) -> vector (B, out_dim): DCGAN discriminator body + linear head.

    f-AnoGAN's encoder maps an image to the generator's latent space with this shape.
    """

    def __init__(
        self,
        out_dim: int,
        tile_size: int = 64,
        base_channels: int = 32,
        norm: str = "group",
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        self.body = DCGANDiscriminator(tile_size, base_channels, norm, max_channels).blocks
        width = stage_widths(tile_size, base_channels, max_channels)[-1]
        self.head = nn.Linear(width * FIRST_GRID**2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x * 2.0 - 1.0)  # (B, C, 4, 4)
        return self.head(feats.flatten(1))  # (B, C * 16) -> (B, out_dim)


# -- losses ---------------------------------------------------------------------------------


def gradient_penalty(
    critic: DCGANDiscriminator, real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """WGAN-GP's penalty E[(||grad_x D(x_hat)||_2 - 1)^2] (Gulrajani et al. 2017, eq. 3).

    x_hat lies uniformly on straight lines between real and generated samples, where the optimal
    critic has unit gradient norm. Computed in float32 outside autocast: the penalty is a
    second-order term, and bf16 gradients-of-gradients are too coarse for it.
    """
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device)  # (B, 1, 1, 1)
    with torch.autocast(device_type=real.device.type, enabled=False):
        mixed = (alpha * real.float() + (1 - alpha) * fake.float()).requires_grad_(True)
        score, _ = critic(mixed)  # (B,)
        (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)  # (B, 3, S, S)
        return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def per_tile_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): the mean over everything but the batch axis, in float32."""
    return x.float().flatten(1).mean(dim=1)


# -- latent search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentSearchResult:
    z: torch.Tensor  # (B, latent_dim) after the last step
    loss: torch.Tensor  # (B,) the search objective at z
    residual: torch.Tensor  # (B,) its residual term
    reconstruction: torch.Tensor  # (B, 3, S, S) = G(z)


def latent_search(
    generator: DCGANGenerator,
    images: torch.Tensor,
    *,
    steps: int,
    lr: float,
    discriminator: DCGANDiscriminator | None = None,
    feature_weight: float = 0.0,
    seed: int = 0,
) -> LatentSearchResult:
    """AnoGAN's mapping from image space to latent space (Schlegl et al. 2017, sec. 2.2).

    From random z_1, take `steps` Adam steps on z minimising, per tile,
        L(z) = (1 - lambda) * R(z) + lambda * D(z),
        R(z) = mean |x - G(z)|,  D(z) = mean |f(x) - f(G(z))|,
    with f the discriminator's intermediate features and lambda = `feature_weight` (the paper
    sums instead of averaging; the mean only rescales, and keeps lambda meaning the same at every
    tile size). Every tile of the batch is searched at once: the objective is a sum over tiles, so
    each z gets exactly the gradient it would get alone, and Adam's per-element scaling keeps the
    steps independent too. Only z is differentiated (`autograd.grad`), never the network weights.
    Networks should be in eval mode, so batch norm does not couple the tiles.
    """
    device = images.device
    # A private seeded stream: the same tiles always start from the same z, and scoring does
    # not consume the caller's random numbers.
    rng = torch.Generator().manual_seed(seed)
    z = generator.sample_latent(len(images), device, rng).requires_grad_(True)  # (B, nz)
    optimiser = torch.optim.Adam([z], lr=lr)
    use_features = discriminator is not None and feature_weight > 0
    with torch.enable_grad(), autocast_for(device):
        target = discriminator.features(images).detach() if use_features else None

        def objective() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            recon = generator(z)  # (B, 3, S, S)
            residual = per_tile_mean((images - recon).abs())  # (B,)
            if not use_features:
                return residual, residual, recon
            disc = per_tile_mean((target - discriminator.features(recon)).abs())  # (B,)
            return (1.0 - feature_weight) * residual + feature_weight * disc, residual, recon

        for _ in range(steps):
            loss, _, _ = objective()
            # allow_unused: a degenerate generator that ignores z gets a zero step, not a crash.
            (grad,) = torch.autograd.grad(loss.sum(), z, allow_unused=True)
            z.grad = torch.zeros_like(z) if grad is None else grad
            optimiser.step()
        with torch.no_grad():
            loss, residual, recon = objective()
    return LatentSearchResult(z.detach(), loss.detach(), residual.detach(), recon.detach().float())


# -- guards ---------------------------------------------------------------------------------


class GeneratorCollapse(NonFiniteStep):
    """The generator's samples stopped varying (mode collapse).

    A subclass of the trainer's step failure, so the shared loop handles it exactly like a NaN:
    it restores the best weights so far, keeps the last good checkpoint and raises DivergedError.
    """


def check_finite(value: float | torch.Tensor, what: str) -> float:
    """Raise the trainer's step failure when `value` (a loss, a norm) is NaN or infinite."""
    number = float(value)
    if not math.isfinite(number):
        raise NonFiniteStep(f"{what} is {number}")
    return number


class CollapseGuard:
    """Flags mode collapse from the generated batch's per-pixel variance across the batch.

    A collapsed generator maps every z to (nearly) the same tile, so the variance over the batch
    of each pixel, averaged over pixels, drops to ~0. It is compared with the same quantity for
    the real batch, because aligned industrial images legitimately vary little per pixel: a
    check fails when generated < `min_ratio` * real. A real GAN dips briefly early in training, so
    only `patience` consecutive failures count as collapse. Non-finite samples fail at once.
    """

    def __init__(self, min_ratio: float = 0.02, patience: int = 25) -> None:
        if min_ratio < 0 or patience < 1:
            raise ValueError(f"need min_ratio >= 0 and patience >= 1, got {min_ratio}, {patience}")
        self.min_ratio = min_ratio
        self.patience = patience
        self.strikes = 0

    def check(self, generated: torch.Tensor, real: torch.Tensor) -> float | None:
        """Record one check on (B, 3, H, W) batches; returns the variance ratio, or None when
        the batches are too small (or too uniform) to tell. Raises GeneratorCollapse."""
        generated = generated.detach().float()
        if not torch.isfinite(generated).all():
            raise NonFiniteStep("the generator produced NaN/inf pixels")
        if self.min_ratio == 0 or len(generated) < 2 or len(real) < 2:
            return None
        gen_var = generated.var(dim=0, unbiased=False).mean().item()  # over B, then pixels
        real_var = real.detach().float().var(dim=0, unbiased=False).mean().item()
        if real_var <= 1e-12:
            return None
        ratio = gen_var / real_var
        self.strikes = self.strikes + 1 if ratio < self.min_ratio else 0
        if self.strikes >= self.patience:
            raise GeneratorCollapse(
                f"generator collapse: the generated batch's per-pixel variance ({gen_var:.3g}) "
                f"stayed below {self.min_ratio:g} x the real batch's ({real_var:.3g}) for "
                f"{self.strikes} consecutive steps (a lower lr, a weaker discriminator or "
                "another seed usually avoids it)"
            )
        return ratio


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Turn off weight gradients of `modules` for a step that only trains another network.

    Gradients still flow *through* them to their inputs; only their own weight gradients,
    which would be thrown away, are skipped.
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# -- the trainer ----------------------------------------------------------------------------


class GanTrainer(Trainer):
    """The shared loop with several optimisers and a collapse guard.

    `module` must have a `generator` submodule. Subclasses implement
    `configure_optimizers` and `train_step` with `optimise` (which owns clipping and the NaN
    guard) and call `self.guard.check` on each generated batch.

    Validation: GAN losses say nothing about sample quality (the two players' losses trade off),
    so early stopping and best-weight selection use how well the generator *covers* held-out
    normal tiles: the mean residual |x - G(z)| after a short latent search from a fixed z, on the
    first `val_tiles` tiles (None: all). It needs no discriminator, so epochs compare fairly,
    and it measures what scoring depends on: normal tiles must be reproducible from the
    generator's manifold.
    """

    def __init__(
        self,
        module: nn.Module,
        settings: TrainSettings,
        device: torch.device,
        *,
        guard: CollapseGuard,
        val_search_steps: int = 20,
        val_search_lr: float = 0.05,
        val_tiles: int | None = 64,
    ) -> None:
        self.guard = guard
        self.val_search_steps = val_search_steps
        self.val_search_lr = val_search_lr
        self.val_tiles = val_tiles
        super().__init__(module, _unused_loss, settings, device)

    @classmethod
    def for_config(
        cls, module: nn.Module, config: GanConfig, device: torch.device, **options: Any
    ) -> Self:
        """This trainer with the loop settings and collapse guard of a family's `config`;
        `options` are the trainer's own keyword arguments."""
        guard = CollapseGuard(config.collapse_min_ratio, config.collapse_patience)
        return cls(module, TrainSettings.from_config(config), device, guard=guard, **options)

    def optimise(
        self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, network: nn.Module, what: str
    ) -> float:
        """One step of `optimizer` on `loss`: NaN guard, backward, clip `network`'s gradients."""
        value = check_finite(loss.item(), f"{what} loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.settings.grad_clip if self.settings.grad_clip is not None else math.inf
        norm = nn.utils.clip_grad_norm_(network.parameters(), clip)
        check_finite(norm, f"{what} gradient norm")
        optimizer.step()
        return value

    def evaluate(self, tiles: np.ndarray) -> float:
        return super().evaluate(tiles if self.val_tiles is None else tiles[: self.val_tiles])

    def val_step(self, batch: torch.Tensor) -> float:
        found = latent_search(
            self.module.generator,
            batch,
            steps=self.val_search_steps,
            lr=self.val_search_lr,
            seed=self.settings.seed,
        )
        return found.residual.mean().item()


def _unused_loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("GAN trainers compute their losses in train_step")


def discriminator_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """DCGAN's discriminator loss -log D(x) - log(1 - D(G(z))) on (B,) logits, in float32."""
    real_logit, fake_logit = real_logit.float(), fake_logit.float()
    return F.binary_cross_entropy_with_logits(
        real_logit, torch.ones_like(real_logit)
    ) + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))


def generator_nonsaturating_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating loss -log D(G(z)) (Goodfellow et al. 2014, sec. 3)."""
    fake_logit = fake_logit.float()
    return F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
