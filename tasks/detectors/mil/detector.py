"""mil: weakly supervised multiple-instance learning from slide labels (Campanella et al. 2019).

"Clinical-grade computational pathology using weakly supervised deep learning on whole slide
images" (Nature Medicine 2019): a slide is a bag of tiles, labelled tumour if any tile is. Each
epoch the current model scores every tile of every training slide (no gradients, batched),
keeps each slide's top-k tiles and trains on them with the slide's label: in a tumour slide the
tiles that look most like tumour should be tumour; in a normal slide even the most suspicious
tiles are normal, which teaches the model its hard negatives for free. No tile label is used.
Two changes for a network trained from scratch on a few slides, not an ImageNet ResNet on
thousands: `warmup_epochs` of naive MIL before top-k starts (see MILTrainer), and a larger k
with several training passes over each epoch's selection.

Slide prediction: the top tile's probability (`slide_aggregate="max"`, as in the paper), or the
mean of the top-k tiles' probabilities ("mean_topk", steadier when one tile is an artefact).
Tile score = the tile's tumour logit, and the anomaly map is that logit over the whole tile, so
scoring, heatmaps and FROC treat it like any family (logits, so confident tiles do not tie).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vadflow.tasks.detectors.base import EpochCallback, FitReport
from vadflow.tasks.detectors.components.training import TrainSettings
from vadflow.tasks.detectors.registry import register
from vadflow.tasks.detectors.supervised_cnn.labelled import (
    LabelledTrainer,
    LabelsRequiredError,
    PatchClassifierConfig,
    PatchClassifierDetector,
    as_labels,
    balanced_weights,
    check_tiles,
    sigmoid,
    tile_logits,
)

AGGREGATES = ("max", "mean_topk")


@dataclass(frozen=True)
class MILConfig(PatchClassifierConfig):
    """Hyperparameters of mil (training and network fields from PatchClassifierConfig;
    `batch_size` is also the per-epoch scoring pass's); saved as config.json beside the
    weights."""

    # Tiles per slide trained on each epoch. The paper used 1 with an ImageNet-pretrained
    # ResNet and thousands of slides; a network trained from scratch on a few slides needs a
    # few more, so that some lesion tiles are among the picks before the ranking means much
    # (on the synthetic site of tests/test_baselines.py, k=2 needed 9-12 epochs, k=5 3-9).
    top_k: int = 5
    passes: int = 3  # training passes over the selected tiles per epoch (see MILTrainer)
    # First epochs train on every tile with its slide's label, before top-k (see MILTrainer);
    # 0 is the paper's scheme.
    warmup_epochs: int = 2
    slide_aggregate: str = "max"  # slide probability: "max" tile, or "mean_topk" of the top_k
    epochs: int = 20
    lr: float = 2e-3
    patience: int = 8  # epochs without a better validation slide loss before stopping

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1 or self.passes < 1:
            raise ValueError(f"top_k and passes must be >= 1, got {self.top_k}, {self.passes}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.slide_aggregate not in AGGREGATES:
            raise ValueError(
                f"slide_aggregate must be one of {AGGREGATES}, got {self.slide_aggregate!r}"
            )


def bag_offsets(sizes: Sequence[int]) -> np.ndarray:
    """Where each bag starts in the concatenated tiles, plus the end: (n_bags + 1,)."""
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])


def top_k_per_bag(probabilities: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """Positions (in the concatenated tiles) of each bag's k most probable tiles, bag by bag.

    A bag with fewer than k tiles gives all of them. Ties go to the earlier tile.
    """
    picks = []
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        order = np.argsort(-probabilities[start:end], kind="stable")[:k]
        picks.append(start + order)
    return np.concatenate(picks).astype(np.int64)


def aggregate_bags(probabilities: np.ndarray, offsets: np.ndarray, how: str, k: int) -> np.ndarray:
    """Slide probabilities (n_bags,) from tile probabilities: max, or mean of the top k."""
    out = np.empty(len(offsets) - 1, dtype=np.float64)
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        bag = probabilities[start:end]
        if how == "max":
            out[i] = bag.max()
        else:
            out[i] = np.sort(bag)[::-1][:k].mean()
    return out


class MILTrainer(LabelledTrainer):
    """`LabelledTrainer` whose training index is re-chosen each epoch: every bag's top-k tiles.

    `train` (in `fit`) is all training bags' tiles concatenated, `val` likewise for the
    validation bags (or the same array).

    The first `warmup_epochs` train on every tile with its slide's label (naive MIL) before
    the top-k epochs start. From scratch, the first top-k picks in tumour slides come from
    random features; when those favour ordinary tissue (a tissue edge, say), the same kind of
    tile is pushed up there and down in normal slides, and the net can sit at p = 0.5 for good.
    Naive MIL has no such fixed point: the only tiles tumour slides have and normal slides lack
    are the lesions, so they rise first, and top-k starts from a ranking that means something.
    On the synthetic site of tests/test_baselines.py, with two warm-up epochs 14 seeds of 14
    found the lesions within 12 epochs (by epoch 9 at the latest); without, 1 seed of 4 did not.

    The validation loss is the slide-level BCE of the aggregated slide probability against the
    slide labels, both classes weighted equally, so early stopping and best-weight restore
    follow what the family predicts.
    """

    def __init__(
        self,
        module: nn.Module,
        settings: TrainSettings,
        device: torch.device,
        *,
        train_tiles: np.ndarray,
        train_offsets: np.ndarray,
        train_labels: np.ndarray,
        val_tiles: np.ndarray,
        val_offsets: np.ndarray,
        val_labels: np.ndarray,
        top_k: int,
        aggregate: str,
        passes: int = 1,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__(module, settings, device)
        self.train_tiles, self.train_offsets = train_tiles, train_offsets
        self.train_bag_labels = np.asarray(train_labels, dtype=bool)
        self.val_tiles, self.val_offsets = val_tiles, val_offsets
        self.val_bag_labels = np.asarray(val_labels, dtype=bool)
        self.top_k, self.aggregate, self.passes = top_k, aggregate, passes
        self.warmup_epochs = warmup_epochs
        # Train-tile logits from the validation pass when validation is on the training bags:
        # the weights do not change between that pass and the next epoch's selection.
        self._fresh: np.ndarray | None = None

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        logits, self._fresh = self._fresh, None
        if epoch <= self.warmup_epochs:
            # Every tile with its slide's label: see the class docstring.
            targets = np.repeat(self.train_bag_labels, np.diff(self.train_offsets))
            self.set_train(np.arange(len(targets)), targets, balanced_weights(targets))
            return
        if logits is None:
            logits = self._logits(self.train_tiles)
        # Ranked by logit: confident float32 probabilities tie at exactly 0 or 1.
        index = top_k_per_bag(logits, self.train_offsets, self.top_k)
        sizes = np.minimum(np.diff(self.train_offsets), self.top_k)
        targets = np.repeat(self.train_bag_labels, sizes)  # each bag's label on its top tiles
        # Several passes over one selection: the scoring pass over every tile is the costly
        # part of an epoch, and with few slides one pass is only a step or two.
        self.set_train(
            np.tile(index, self.passes),
            np.tile(targets, self.passes),
            np.tile(balanced_weights(targets), self.passes),
        )

    def evaluate(self, tiles: np.ndarray) -> float:
        """Slide-level weighted BCE on the validation bags (NaN if any probability is)."""
        if tiles is not self.val_tiles:
            raise ValueError("MILTrainer.evaluate scores the validation bags given at creation")
        logits = self._logits(tiles)
        if tiles is self.train_tiles:
            self._fresh = logits
        slide = aggregate_bags(sigmoid(logits), self.val_offsets, self.aggregate, self.top_k)
        slide = np.clip(slide, 1e-7, 1 - 1e-7)
        truth = self.val_bag_labels
        losses = -(truth * np.log(slide) + (~truth) * np.log1p(-slide))
        return float(np.mean(losses * balanced_weights(truth)))

    def _logits(self, tiles: np.ndarray) -> np.ndarray:
        return tile_logits(self.module, tiles, self.device, self.settings.batch_size)


@register("mil")
class MILDetector(PatchClassifierDetector):
    """Top-k multiple-instance learning on slide labels; tile score and map = tumour logit."""

    supervision = "slide"
    config_cls = MILConfig
    config: MILConfig

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        slides: np.ndarray | None = None,
    ) -> FitReport:
        raise LabelsRequiredError(
            "mil learns from slide labels (supervision='slide'): normal tiles alone cannot "
            "train it. Call fit_bags(bags, labels) with each training slide's tiles as one bag "
            "and its label (True = tumour), from both tumour and normal slides, or skip this "
            "family on a site without labelled tumour slides"
        )

    def fit_bags(
        self,
        bags: Sequence[np.ndarray],
        labels: Sequence[bool],
        *,
        on_epoch: EpochCallback | None = None,
        val_bags: Sequence[np.ndarray] | None = None,
        val_labels: Sequence[bool] | None = None,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 1,
        resume_from: Path | None = None,
    ) -> FitReport:
        """Train on bags of uint8 (n_i, H, W, 3) tiles, one per slide, with slide labels.

        Without `val_bags`, the validation loss (early stopping, best weights) is the training
        slides' slide-level loss. Checkpoints and resume are `Trainer.fit`'s.
        """
        cfg = self.config
        tiles, offsets, truth = self._concat(bags, labels, "training")
        n_pos = int(truth.sum())
        if n_pos == 0 or n_pos == len(truth):
            raise ValueError(
                f"mil needs tumour and normal training slides, got {n_pos} tumour and "
                f"{len(truth) - n_pos} normal"
            )
        if val_bags is None:
            if val_labels is not None:
                raise ValueError("val_labels given without val_bags")
            val_tiles, val_offsets, val_truth = tiles, offsets, truth
        else:
            if val_labels is None:
                raise ValueError("val_bags given without val_labels")
            val_tiles, val_offsets, val_truth = self._concat(val_bags, val_labels, "validation")
        trainer = MILTrainer(
            self.model,
            TrainSettings.from_config(cfg),
            self.device,
            train_tiles=tiles,
            train_offsets=offsets,
            train_labels=truth,
            val_tiles=val_tiles,
            val_offsets=val_offsets,
            val_labels=val_truth,
            top_k=cfg.top_k,
            aggregate=cfg.slide_aggregate,
            passes=cfg.passes,
            warmup_epochs=cfg.warmup_epochs,
        )
        return trainer.fit(
            tiles,
            val_tiles,
            on_epoch=on_epoch,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume_from=resume_from,
        )

    def predict_slides(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Slide tumour probabilities (n_bags,) by `slide_aggregate` over each bag's tiles."""
        cfg = self.config
        tiles, offsets, _ = self._concat(bags, [False] * len(bags), "slide")
        was_training = self.model.training
        try:
            logits = tile_logits(self.model, tiles, self.device, cfg.batch_size)
        finally:
            self.model.train(was_training)
        slide = aggregate_bags(sigmoid(logits), offsets, cfg.slide_aggregate, cfg.top_k)
        return slide.astype(np.float32)

    def _concat(
        self, bags: Sequence[np.ndarray], labels: Sequence[bool], name: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bags -> (all tiles (N, H, W, 3), offsets (n_bags + 1,), slide labels (n_bags,))."""
        if len(bags) == 0:
            raise ValueError(f"no {name} bags: give one array of tiles per slide")
        if len(labels) != len(bags):
            raise ValueError(f"{len(bags)} {name} bags but {len(labels)} labels")
        for i, bag in enumerate(bags):
            check_tiles(bag, f"{name} bag {i}", self.config.tile_size)
            if len(bag) == 0:
                raise ValueError(f"{name} bag {i} has no tiles; drop slides without tissue")
        truth = as_labels(labels, len(bags), f"{name} slides")
        tiles = bags[0] if len(bags) == 1 else np.concatenate(bags)
        return tiles, bag_offsets([len(b) for b in bags]), truth
