"""The one training loop every detector family uses.

Families hand over a module and a loss; the loop owns what must behave the same everywhere:
device choice, bf16 autocast on CUDA, seeding, training-batch augmentation (flips, quarter
turns, stain and colour jitter: `components/augment.py`), Adam, gradient clipping,
early stopping on the normal-only validation loss, best-weight restore, the NaN/inf guard,
resumable checkpoints and the contamination-robust trimmed loss. A family with an unusual step
(several optimisers, as GANs need) subclasses `Trainer` and overrides `configure_optimizers` and
`train_step`; one whose loss changes over the run (a KL warm-up) overrides `begin_epoch`.

The loss contract: a loss function takes (module, batch) and returns either per-sample losses,
shape (b,), or one scalar. The loop reduces per-sample losses itself (a mean, or a trimmed mean
in robust mode), so only per-sample losses can be trimmed; a scalar loss with robust mode on is
refused at the first step (TypeError) rather than silently trained untrimmed.

Every family's config extends `TrainingConfig`, the loop fields they all share; `TrainSettings`
is what the loop reads from it (`TrainSettings.from_config`). `TrainedDetector` is the `fit` of
every family trained by this loop alone: check the tiles, run the family's trainer (with
checkpoints and resume), then whatever the family fits on top (`after_fit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from vadflow.tasks.detectors.base import (
    Detector,
    DivergedError,
    EpochCallback,
    FitReport,
    autocast_for,
    check_tile_size,
    load_tensors,
    to_tensor,
)
from vadflow.tasks.detectors.components.augment import Augmentation

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1

# (module, batch (b, 3, H, W)) -> per-sample losses (b,) or a scalar (0-d) loss.
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class NonFiniteStep(ArithmeticError):
    """Raised inside a step when a loss or gradient norm is NaN/inf; the loop turns it into a
    DivergedError after restoring the best weights."""


@dataclass(frozen=True)
class TrainingConfig:
    """The training fields every family's config shares; each family's config extends it.

    A family with another default for one of these re-declares just that field. The defaults
    are the ones most families use; saved `config.json` files hold every field by name.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # epochs without a better validation loss before stopping
    min_delta: float = 1e-3  # relative val-loss improvement that resets patience
    grad_clip: float = 1.0
    seed: int = 0
    # True (random flips), False, or augmentation settings by field name (the site's
    # `augmentation` block; `augment.py`); applied to training batches only.
    augment: bool | Mapping[str, Any] = True
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"

    def __post_init__(self) -> None:
        """Checks of subclasses chain here; the loop fields are checked by TrainSettings."""


@dataclass(frozen=True)
class TrainSettings:
    """Loop hyperparameters; `from_config` reads the same-named fields of a family config."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    # Relative: an epoch counts as better only if val < best * (1 - min_delta).
    min_delta: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    # True (flips only), False, a mapping of Augmentation's fields, or an Augmentation; held as
    # an Augmentation after construction. Applied to shuffled training batches only.
    augment: Augmentation | bool | Mapping[str, Any] = True
    # Contamination-robust mode: after `robust_warmup_epochs` plain epochs, each training batch
    # drops its highest-loss `robust_trim_fraction` of samples from the loss. 0 turns it off.
    robust_trim_fraction: float = 0.0
    robust_warmup_epochs: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", Augmentation.from_setting(self.augment))
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(f"epochs, batch_size and patience must be >= 1, got {self}")
        if self.lr < 0 or self.min_delta < 0:
            raise ValueError(f"lr and min_delta must be >= 0, got {self}")
        if not 0.0 <= self.robust_trim_fraction < 1.0:
            raise ValueError(
                f"robust_trim_fraction must be in [0, 1), got {self.robust_trim_fraction}"
            )
        if self.robust_warmup_epochs < 0:
            raise ValueError(f"robust_warmup_epochs must be >= 0, got {self.robust_warmup_epochs}")

    @classmethod
    def from_config(cls, config: Any) -> TrainSettings:
        """The loop settings of a family config: its fields named like this class's."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(config, n) for n in names if hasattr(config, n)})


class Trainer:
    """Mini-batch training of `module` on uint8 (N, H, W, 3) tile arrays.

    Robust mode (`robust_trim_fraction` > 0) is a trimmed loss for training sets that are not
    clean: a model first learns the bulk of the data for `robust_warmup_epochs`, when the few
    anomalous tiles already have the highest losses; from then on each batch ignores its
    highest-loss fraction, so those tiles stop pulling the model towards reconstructing them.
    The warm-up matters: from epoch 1 every loss is high and the trim would drop arbitrary,
    mostly normal, tiles. The fraction should exceed the expected contamination, since a batch's
    share of anomalous tiles varies around the training set's.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        settings: TrainSettings,
        device: torch.device,
    ) -> None:
        self.module = module.to(device)
        self.loss_fn = loss_fn
        self.settings = settings
        self.device = device
        self.use_amp = device.type == "cuda"
        self.optimizers = self.configure_optimizers()
        # Shuffling and augmentation draw from their own generator, so resume restores it exactly.
        self.data_rng = torch.Generator().manual_seed(settings.seed)
        self.epoch = 0  # 1-based once training runs; the trim and loss schedules read it

    @property
    def trimming(self) -> bool:
        """Whether the current epoch trains on the trimmed loss (robust mode, past warm-up)."""
        return (
            self.settings.robust_trim_fraction > 0
            and self.epoch > self.settings.robust_warmup_epochs
        )

    # -- hooks a family may override -------------------------------------------------------

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        return [
            torch.optim.Adam(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        ]

    def begin_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based, also after a resume); keep the super call."""
        self.epoch = epoch

    def reduce_loss(self, losses: torch.Tensor, *, trim: bool) -> torch.Tensor:
        """Per-sample losses (b,) -> the scalar to optimise: the mean, or with `trim` the mean
        of the lowest (1 - robust_trim_fraction) share (at least one sample).

        Raises NonFiniteStep if any sample's loss is NaN/inf, before trimming: a poisoned tile
        must stop the run, not be trimmed away as "anomalous".
        """
        if losses.ndim == 0:
            # Refused whenever robust mode is on, so the first step fails, not the first trim.
            if self.settings.robust_trim_fraction > 0:
                raise TypeError(
                    "robust_trim_fraction > 0 needs per-sample losses, but this family's loss "
                    "function returns a scalar; return shape (b,) or set robust_trim_fraction=0"
                )
            reduced = losses.float()
        else:
            losses = losses.float().reshape(-1)  # (b,)
            if trim:
                keep = max(
                    1, len(losses) - math.floor(self.settings.robust_trim_fraction * len(losses))
                )
                # Gradients flow only through the kept, lowest-loss samples.
                reduced = losses.topk(keep, largest=False).values.mean()
            else:
                reduced = losses.mean()
        # One host sync for both checks: the sum is non-finite iff some sample is.
        value, total = torch.stack([reduced.detach(), losses.detach().float().sum()]).tolist()
        if not (math.isfinite(value) and math.isfinite(total)):
            raise NonFiniteStep(f"training loss is {value if not math.isfinite(value) else total}")
        return reduced

    def train_step(self, batch: torch.Tensor) -> float:
        """One optimiser step on a (b, 3, H, W) batch; returns the (reduced) loss as a float."""
        (optimizer,) = self.optimizers
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            losses = self.loss_fn(self.module, batch)
        loss = self.reduce_loss(losses, trim=self.trimming)
        value = loss.item()
        loss.backward()
        clip = self.settings.grad_clip if self.settings.grad_clip is not None else math.inf
        norm = nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        if not torch.isfinite(norm):
            raise NonFiniteStep(f"gradient norm is {norm.item()}")
        optimizer.step()
        return value

    def val_step(self, batch: torch.Tensor) -> float:
        """Validation loss of one batch; trimmed in every epoch when robust mode is on.

        Robust mode presumes the validation tiles as contaminated as the training tiles (they are
        split from the same unlabelled pool), so a trimmed mean estimates the loss on the normal
        ones. It is trimmed from epoch 1, warm-up included, so early stopping compares epochs on
        one definition of the loss.
        """
        with self.autocast():
            losses = self.loss_fn(self.module, batch)
        try:
            return self.reduce_loss(losses, trim=self.settings.robust_trim_fraction > 0).item()
        except NonFiniteStep:
            return math.nan  # the loop reports a non-finite validation loss as divergence

    # -- the loop ---------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast_for(self.device) if self.use_amp else contextlib.nullcontext()

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
        """Train until `epochs`, or until val loss stops improving for `patience` epochs.

        With `checkpoint_dir`, `last.pt` is rewritten every `checkpoint_every` epochs and at the
        end; `resume_from` continues from such a folder (and keeps checkpointing there unless
        `checkpoint_dir` says otherwise). On return the module holds the best-val weights.
        """
        _check_tiles(train, "train")
        _check_tiles(val, "val")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if resume_from is not None and checkpoint_dir is None:
            checkpoint_dir = resume_from
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
        self.last_good: Path | None = None

        started = time.perf_counter()
        if resume_from is not None:
            state = self._resume(Path(resume_from))
        else:
            torch.manual_seed(self.settings.seed)
            np.random.seed(self.settings.seed)
            state = _LoopState(best_state=_copy_state(self.module))
        self.seconds_before = state.seconds
        self._started = started

        epoch = len(state.train_loss)
        while epoch < self.settings.epochs and not state.stopped_early:
            epoch += 1
            self.begin_epoch(epoch)
            self.module.train()
            total, count = 0.0, 0
            for step, batch in enumerate(self._batches(train, shuffle=True), start=1):
                try:
                    loss = self.train_step(batch)
                except NonFiniteStep as exc:
                    self._diverge(state, epoch, f"step {step}", str(exc))
                total += loss * len(batch)
                count += len(batch)
            train_loss = total / count
            val_loss = self.evaluate(val)
            if not math.isfinite(val_loss):
                self._diverge(state, epoch, "validation", f"val loss is {val_loss}")

            state.train_loss.append(train_loss)
            state.val_loss.append(val_loss)
            if val_loss < state.best_val * (1.0 - self.settings.min_delta):
                state.best_val, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
                state.best_state = _copy_state(self.module)
            else:
                state.bad_epochs += 1
                state.stopped_early = state.bad_epochs >= self.settings.patience
            done = epoch >= self.settings.epochs or state.stopped_early
            if self.checkpoint_path is not None and (epoch % checkpoint_every == 0 or done):
                self._save_checkpoint(state)
            if on_epoch is not None:
                on_epoch(epoch, train_loss, val_loss)

        self.module.load_state_dict(state.best_state)
        self.module.eval()
        return self._report(state)

    def evaluate(self, tiles: np.ndarray) -> float:
        """Mean loss over `tiles` in eval mode, without augmentation."""
        self.module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self._batches(tiles, shuffle=False):
                total += self.val_step(batch) * len(batch)
                count += len(batch)
        return total / count

    def _batches(self, tiles: np.ndarray, *, shuffle: bool) -> Iterator[torch.Tensor]:
        n, size = len(tiles), self.settings.batch_size
        order = torch.randperm(n, generator=self.data_rng).numpy() if shuffle else np.arange(n)
        for start in range(0, n, size):
            # Sorted indices keep the gather from the (possibly memory-mapped) cache sequential.
            index = np.sort(order[start : start + size])
            batch = to_tensor(tiles[index], self.device)  # (b, 3, H, W)
            if shuffle and self.settings.augment:
                batch = self.augment(batch)
            yield batch

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        """The configured augmentation of one training batch (b, 3, H, W); the validation loss
        and `Detector.score` never pass through here."""
        return self.settings.augment(batch, self.data_rng)

    # -- failure, checkpoints, report -------------------------------------------------------

    def _diverge(self, state: _LoopState, epoch: int, where: str, reason: str) -> NoReturn:
        self.module.load_state_dict(state.best_state)
        self.module.eval()
        if state.best_epoch:
            kept = (
                f"restored the weights of epoch {state.best_epoch} (val loss {state.best_val:.4g})"
            )
        else:
            kept = "restored the weights from before this run"
        if self.last_good is not None:
            kept += f"; the last good checkpoint {self.last_good} was kept"
        report = self._report(state, diverged=True)
        raise DivergedError(
            f"training diverged at epoch {epoch}, {where}: {reason}; {kept}. "
            "Lower lr or grad_clip, or check the input tiles for NaN/inf.",
            report=report,
            checkpoint=self.last_good,
        )

    def _report(self, state: _LoopState, *, diverged: bool = False) -> FitReport:
        return FitReport(
            epochs=len(state.train_loss),
            best_epoch=state.best_epoch,
            train_loss=list(state.train_loss),
            val_loss=list(state.val_loss),
            seconds=self.seconds_before + time.perf_counter() - self._started,
            device=str(self.device),
            diverged=diverged,
            stopped_early=state.stopped_early,
        )

    def _save_checkpoint(self, state: _LoopState) -> None:
        assert self.checkpoint_path is not None
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": self.module.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "best_state": state.best_state,
            "best_epoch": state.best_epoch,
            "best_val": state.best_val,
            "bad_epochs": state.bad_epochs,
            "stopped_early": state.stopped_early,
            "train_loss": state.train_loss,
            "val_loss": state.val_loss,
            "seconds": self.seconds_before + time.perf_counter() - self._started,
            "data_rng": self.data_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        # Write then rename, so a run killed mid-save leaves the previous checkpoint intact.
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.checkpoint_path)
        self.last_good = self.checkpoint_path

    def _resume(self, directory: Path) -> _LoopState:
        path = directory / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_FILE} in {directory}")
        payload = load_tensors(path, "training checkpoint")
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path} has checkpoint format {payload.get('format')!r}, "
                f"this code reads {CHECKPOINT_FORMAT}"
            )
        try:
            self.module.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise ValueError(
                f"{path} was written by a model of a different shape than this config builds: {exc}"
            ) from exc
        for optimizer, saved in zip(self.optimizers, payload["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.data_rng.set_state(payload["data_rng"])
        torch.set_rng_state(payload["torch_rng"])
        if payload["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        self.last_good = path
        best_state = {k: v.to(self.device) for k, v in payload["best_state"].items()}
        return _LoopState(
            best_state=best_state,
            best_epoch=payload["best_epoch"],
            best_val=payload["best_val"],
            bad_epochs=payload["bad_epochs"],
            stopped_early=payload["stopped_early"],
            train_loss=list(payload["train_loss"]),
            val_loss=list(payload["val_loss"]),
            seconds=payload["seconds"],
        )


class TrainedDetector(Detector):
    """A family trained by the shared loop on normal tiles: the one `fit` they all run.

    Subclasses build their trainer in `make_trainer` (a `Trainer`, or a subclass for GANs and
    KL warm-ups) and may fit more after the loop in `after_fit` (the latent density does).
    Their config needs a `tile_size`: tiles of another size are refused before training.
    """

    @abstractmethod
    def make_trainer(self) -> Trainer:
        """The trainer of this family's module, with `TrainSettings.from_config(self.config)`."""

    def after_fit(self, train: np.ndarray, val: np.ndarray, report: FitReport) -> FitReport:
        """Fit anything beyond the trained weights; returns the (possibly amended) report."""
        return report

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
        """Train on normal tiles, then `after_fit`; `Trainer.fit` documents checkpoints, resume
        and early stopping. Raises DivergedError (best weights restored) on NaN/inf, and for
        the GAN families on generator collapse."""
        check_tile_size(self.family, self.config.tile_size, train=train, val=val)
        report = self.make_trainer().fit(
            train,
            val,
            on_epoch=on_epoch,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume_from=resume_from,
        )
        return self.after_fit(train, val, report)


@dataclass
class _LoopState:
    best_state: dict[str, torch.Tensor]
    best_epoch: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    stopped_early: bool = False
    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _check_tiles(tiles: np.ndarray, name: str) -> None:
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[-1] != 3:
        shape = getattr(tiles, "shape", type(tiles).__name__)
        raise ValueError(f"{name} tiles must be a numpy array shaped (N, H, W, 3), got {shape}")
    if len(tiles) == 0:
        raise ValueError(f"{name} has no tiles; training needs normal {name} tiles")
