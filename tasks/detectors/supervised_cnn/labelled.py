"""The shared training loop, on labelled tiles: what supervised_cnn and mil train with.

`Trainer` walks a tile array and hands each batch to a loss that sees only pixels. Here each
tile also has a 0/1 target and a loss weight, and an epoch walks an *index* into the tile array
rather than the array itself, so a tile can appear several times in one epoch (class balancing,
oversampled hard negatives, mil's top-k tiles) without copying pixels. Everything else (device,
bf16 autocast, seeding, Adam, gradient clipping, early stopping, best-weight restore, the
NaN/inf guard, checkpoints and resume) is `Trainer`'s, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vadflow.tasks.detectors.base import Detector, autocast_for, build_seeded, to_tensor
from vadflow.tasks.detectors.components.training import Trainer, TrainingConfig, TrainSettings
from vadflow.tasks.detectors.supervised_cnn.torch_model import NORMS, PatchClassifier


@dataclass(frozen=True)
class PatchClassifierConfig(TrainingConfig):
    """The fields supervised_cnn and mil share: the training fields (their defaults for a
    classifier; `augment` is random flips and transposes, `LabelledTrainer.augment`) and the
    PatchClassifier's shape."""

    tile_size: int = 64  # tiles of another size are refused
    base_channels: int = 16  # width of the first stage, doubling per stage (max 256)
    stages: int = 4  # conv stages, each halving the tile
    norm: str = "none"  # "none" or "group" (see PatchClassifier)
    dropout: float = 0.2  # before the linear head
    weight_decay: float = 1e-4
    min_delta: float = 0.0  # relative val-loss improvement that resets patience

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


class PatchClassifierDetector(Detector):
    """What supervised_cnn and mil share: a PatchClassifier seeded from the config (without
    touching the caller's RNG), and the tumour logit as tile score and flat anomaly map.

    Logits, not probabilities: a float32 sigmoid is exactly 1.0 from a logit of about 17 on,
    so confident tiles on tumour and normal slides tied at the top and the slide maximum
    could not rank them (slide AUC 0.67 -> 0.89 on the small hard site, seed 0). The order of
    tiles is the same; `sigmoid` turns a score back into a probability.
    """

    model: PatchClassifier
    score_range = (-math.inf, math.inf)  # logits

    config: PatchClassifierConfig

    def __init__(self, config: PatchClassifierConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.model = build_seeded(
            cfg.seed, lambda: PatchClassifier(cfg.base_channels, cfg.stages, cfg.dropout, cfg.norm)
        ).to(self.device)

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device):
            logits = self.model(batch).float()  # (b,)
        height, width = batch.shape[-2:]
        anomaly_map = logits[:, None, None, None].expand(-1, 1, height, width)  # (b,1,H,W)
        return anomaly_map, logits


class LabelsRequiredError(TypeError):
    """A labelled family was asked to train on normal tiles alone, with `fit(train, val)`."""


def check_labelled(tiles: np.ndarray, labels: object, name: str, tile_size: int) -> np.ndarray:
    """Validate (N, S, S, 3) tiles and their N labels; return the labels as a bool array."""
    check_tiles(tiles, name, tile_size)
    return as_labels(labels, len(tiles), name)


def check_tiles(tiles: np.ndarray, name: str, tile_size: int) -> None:
    """Refuse anything but a (N, tile_size, tile_size, 3) numpy array."""
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[-1] != 3:
        shape = getattr(tiles, "shape", type(tiles).__name__)
        raise ValueError(f"{name} must be a numpy array shaped (N, H, W, 3), got {shape}")
    if tiles.shape[1:3] != (tile_size, tile_size):
        raise ValueError(
            f"{name} are {tiles.shape[1]}x{tiles.shape[2]} but the model is configured for "
            f"tile_size={tile_size}"
        )


def as_labels(labels: object, count: int, name: str) -> np.ndarray:
    """`count` labels as a bool array; 0/1 numbers are accepted, anything else is refused."""
    array = np.asarray(labels)
    if array.shape != (count,):
        raise ValueError(f"{name}: {count} items but labels shaped {array.shape}; give one each")
    if array.dtype != np.bool_:
        if array.size and not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} labels must be bool (or 0/1), got values {np.unique(array)}")
        array = array.astype(bool)
    return array


def balanced_weights(targets: np.ndarray) -> np.ndarray:
    """Per-tile loss weights (N,) that give each present class half the loss, mean weight 1.

    With one class only, every weight is 1.
    """
    targets = np.asarray(targets, dtype=bool)
    weights = np.ones(len(targets), dtype=np.float32)
    n_pos = int(targets.sum())
    n_neg = len(targets) - n_pos
    if n_pos and n_neg:
        weights[targets] = len(targets) / (2 * n_pos)
        weights[~targets] = len(targets) / (2 * n_neg)
    return weights


def tile_logits(
    model: nn.Module, tiles: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """Tumour logit of every tile, (N,) float32: eval mode, no grad, batched.

    Rank tiles by logit, not probability: a confident model's float32 probabilities round to
    exactly 0 or 1 for many tiles, and ties would make the ranking arbitrary. Leaves the module
    in eval mode; the training loop switches it back before each epoch.
    """
    model.eval()
    out = np.empty(len(tiles), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(tiles), batch_size):
            batch = to_tensor(tiles[start : start + batch_size], device)  # (b, 3, H, W)
            with autocast_for(device):
                logits = model(batch)  # (b,)
            out[start : start + len(batch)] = logits.float().cpu().numpy()
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, in float64 (no overflow warning for large |logit|)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


def tile_probabilities(
    model: nn.Module, tiles: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """Tumour probability of every tile, (N,) float32 (see `tile_logits`)."""
    return sigmoid(tile_logits(model, tiles, device, batch_size)).astype(np.float32)


class LabelledTrainer(Trainer):
    """`Trainer` on labelled tiles: per-tile BCE against 0/1 targets, with per-tile weights.

    Before `fit(train, val)`, set `train_index` (positions in `train`, repeats allowed: one epoch
    visits each entry once, in a fresh random order) with `train_targets` / `train_weights`
    (one per entry of the index), and the same for `val` (`val_index` defaults to every tile).
    Subclasses may change the index between epochs in `begin_epoch` (mil does).

    The batch's targets ride beside the pixels in `self.batch_targets` / `self.batch_weights`,
    set as each batch is drawn, because `Trainer`'s loss hook sees only pixels.
    """

    def __init__(self, module: nn.Module, settings: TrainSettings, device: torch.device) -> None:
        super().__init__(module, self.weighted_bce, settings, device)
        self.train_index = np.zeros(0, dtype=np.int64)
        self.train_targets = np.zeros(0, dtype=np.float32)
        self.train_weights = np.zeros(0, dtype=np.float32)
        self.val_index: np.ndarray | None = None
        self.val_targets = np.zeros(0, dtype=np.float32)
        self.val_weights = np.zeros(0, dtype=np.float32)
        self.batch_targets: torch.Tensor | None = None
        self.batch_weights: torch.Tensor | None = None

    def set_train(self, index: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        if len(index) == 0:
            raise ValueError("the training index is empty: nothing to train on")
        if not len(index) == len(targets) == len(weights):
            raise ValueError(
                f"train index, targets and weights differ in length: "
                f"{len(index)}, {len(targets)}, {len(weights)}"
            )
        self.train_index = index
        self.train_targets = np.asarray(targets, dtype=np.float32)
        self.train_weights = np.asarray(weights, dtype=np.float32)

    def set_val(self, targets: np.ndarray, weights: np.ndarray) -> None:
        """Validation targets and weights, one per val tile (the val index is every tile)."""
        self.val_index = None
        self.val_targets = np.asarray(targets, dtype=np.float32)
        self.val_weights = np.asarray(weights, dtype=np.float32)

    def weighted_bce(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Per-tile weighted BCE (b,), in float32 even when the forward ran in bf16."""
        if self.batch_targets is None or self.batch_weights is None:
            raise RuntimeError("LabelledTrainer: a batch was drawn without its targets")
        logits = module(batch).float()  # (b,)
        losses = F.binary_cross_entropy_with_logits(logits, self.batch_targets, reduction="none")
        return losses * self.batch_weights  # (b,)

    def _batches(self, tiles: np.ndarray, *, shuffle: bool):  # type: ignore[override]
        # Trainer draws training batches with shuffle=True and validation ones with False.
        if shuffle:
            index, targets, weights = self.train_index, self.train_targets, self.train_weights
            order = torch.randperm(len(index), generator=self.data_rng).numpy()
        else:
            index = np.arange(len(tiles)) if self.val_index is None else self.val_index
            targets, weights = self.val_targets, self.val_weights
            order = np.arange(len(index))
            if len(targets) != len(index):
                raise ValueError(
                    f"{len(index)} validation tiles but {len(targets)} targets: call set_val"
                )
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            # Sorted positions keep the gather from the (possibly memory-mapped) array sequential.
            picks = np.sort(order[start : start + size])
            batch = to_tensor(tiles[index[picks]], self.device)  # (b, 3, H, W)
            if shuffle and self.settings.augment:
                batch = self.augment(batch)
            self.batch_targets = torch.from_numpy(targets[picks]).to(self.device)
            self.batch_weights = torch.from_numpy(weights[picks]).to(self.device)
            yield batch

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        """Random flips and transposes (the 8 symmetries of a square): a tile has no up."""
        draws = torch.rand(3, len(batch), generator=self.data_rng) < 0.5  # (3, b)
        draws = draws.to(batch.device)[:, :, None, None, None]  # (3, b, 1, 1, 1)
        batch = torch.where(draws[0], batch.flip(-1), batch)
        batch = torch.where(draws[1], batch.flip(-2), batch)
        if batch.shape[-1] == batch.shape[-2]:
            batch = torch.where(draws[2], batch.transpose(-1, -2), batch)
        return batch
