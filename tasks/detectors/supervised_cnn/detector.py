"""supervised_cnn: a tumour-vs-normal patch classifier with a hard-negative round.

A fully supervised baseline, trained on tiles labelled from the lesion annotations, to show
what labels buy over the unsupervised families. As the Camelyon16 winner did (Wang et al. 2016,
"Deep learning for identifying metastatic breast cancer"): train a patch classifier on
class-balanced tumour and normal tiles; score every normal training tile with it; add the
normal tiles it scored highest (the hard negatives: folds, dark stain, dense lymphocytes) to the
training set several times over; fine-tune. Round two lowers the false positives that round one
makes on exactly the tissue that looks most like tumour.

The tile's tumour logit is both the tile score and the anomaly map (broadcast over the tile), so
the heatmap, the slide score (max of the heatmap) and the FROC path treat it like any family.
Logits rather than probabilities so confident tiles do not tie at 1.0 (see
PatchClassifierDetector).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vadflow.tasks.detectors.base import DivergedError, EpochCallback, FitReport
from vadflow.tasks.detectors.components.training import CHECKPOINT_FILE, TrainSettings
from vadflow.tasks.detectors.registry import register
from vadflow.tasks.detectors.supervised_cnn.labelled import (
    LabelledTrainer,
    LabelsRequiredError,
    PatchClassifierConfig,
    PatchClassifierDetector,
    balanced_weights,
    check_labelled,
    tile_logits,
)

# Fewer annotated tumour tiles than this draws a warning: too few to learn tumour from.
FEW_TUMOUR_TILES = 32


@dataclass(frozen=True)
class SupervisedCNNConfig(PatchClassifierConfig):
    """Hyperparameters of supervised_cnn (training and network fields from
    PatchClassifierConfig; `epochs` is round one's); saved as config.json beside the weights."""

    positive_fraction: float = 0.5  # share of tumour tiles in an epoch (oversampled)
    negatives_per_epoch: int = 0  # normal tiles drawn afresh each epoch; 0 = all of them
    epochs: int = 10  # round one
    hard_negative_fraction: float = 0.1  # share of normal tiles mined after round one; 0 = none
    hard_negative_repeats: int = 3  # extra copies of each mined tile per round-two epoch
    hard_negative_epochs: int = 3  # round two (fine-tuning); 0 = no round two
    hard_negative_lr_scale: float = 0.3  # round two's lr = lr * this

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.positive_fraction < 1.0:
            raise ValueError(f"positive_fraction must be in (0, 1), got {self.positive_fraction}")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise ValueError(
                f"hard_negative_fraction must be in [0, 1], got {self.hard_negative_fraction}"
            )
        if self.hard_negative_repeats < 1 or self.hard_negative_epochs < 0:
            raise ValueError(
                "hard_negative_repeats must be >= 1 and hard_negative_epochs >= 0, got "
                f"{self.hard_negative_repeats}, {self.hard_negative_epochs}"
            )
        if not self.hard_negative_lr_scale > 0:
            raise ValueError(
                f"hard_negative_lr_scale must be > 0, got {self.hard_negative_lr_scale}"
            )
        if self.negatives_per_epoch < 0:
            raise ValueError(f"negatives_per_epoch must be >= 0, got {self.negatives_per_epoch}")


def mine_hard_negatives(scores: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Positions of the highest-scored normal tiles: the top `fraction` of the normals.

    `scores` (probabilities or logits) and `labels` are per tile; positives' scores are ignored
    and may be NaN. Returns ceil(fraction * n_normal) indices into them, highest score first;
    ties go to the lower index.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    normals = np.flatnonzero(~labels)
    if not np.isfinite(scores[normals]).all():
        raise ValueError("hard-negative mining got a NaN/inf score on a normal tile")
    count = math.ceil(fraction * len(normals) - 1e-9)
    order = np.argsort(-scores[normals], kind="stable")  # descending, stable on ties
    return normals[order[:count]]


def epoch_index(
    labels: np.ndarray,
    positive_fraction: float,
    rng: np.random.Generator,
    *,
    negatives_per_epoch: int = 0,
    hard_negatives: np.ndarray | None = None,
    repeats: int = 0,
) -> np.ndarray:
    """The tiles one epoch walks (positions, with repeats), in no particular order.

    Normal tiles: all of them once, or a fresh random `negatives_per_epoch` of them. Tumour
    tiles are few (a lesion covers a small part of a few slides), so they are cycled in a random
    order until they make up `positive_fraction` of those two; none is ever dropped. In round
    two, each mined hard negative is added `repeats` more times, on top of any random draw.
    """
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    if 0 < negatives_per_epoch < len(negatives):
        negatives = np.sort(rng.choice(negatives, negatives_per_epoch, replace=False))
    wanted = round(len(negatives) * positive_fraction / (1.0 - positive_fraction))
    cycled = np.resize(rng.permutation(positives), max(len(positives), wanted))
    parts = [negatives, cycled]
    if hard_negatives is not None and repeats > 0:
        parts.append(np.repeat(np.asarray(hard_negatives, dtype=np.int64), repeats))
    return np.concatenate(parts).astype(np.int64)


@dataclass
class HardNegativeRound:
    """What the hard-negative round did, kept on the detector after `fit_labelled`.

    `scores`: round one's logit for each training tile (NaN for tumour tiles, which are not
    scored; logits rank like probabilities, without float32 ties at 0); `mined`: the positions
    picked, highest score first; `epochs`: the index each epoch walked (positions in the
    training tiles, with repeats), round one's then round two's, of which `round_one_epochs`
    are round one's.
    """

    scores: np.ndarray
    mined: np.ndarray
    epochs: list[np.ndarray]
    round_one_epochs: int


class PatchTrainer(LabelledTrainer):
    """`LabelledTrainer` that draws each epoch's tiles with `epoch_index` (see there).

    The draw is seeded by (seed, round, epoch), so a resumed run draws what it would have.
    Every drawn index is appended to `drawn`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        settings: TrainSettings,
        device: torch.device,
        *,
        labels: np.ndarray,
        positive_fraction: float,
        negatives_per_epoch: int,
        round_number: int,
        hard_negatives: np.ndarray | None = None,
        repeats: int = 0,
    ) -> None:
        super().__init__(module, settings, device)
        self.labels = labels
        self.positive_fraction = positive_fraction
        self.negatives_per_epoch = negatives_per_epoch
        self.round_number = round_number
        self.hard = hard_negatives
        self.repeats = repeats
        self.drawn: list[np.ndarray] = []

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        rng = np.random.default_rng([self.settings.seed, self.round_number, epoch])
        index = epoch_index(
            self.labels,
            self.positive_fraction,
            rng,
            negatives_per_epoch=self.negatives_per_epoch,
            hard_negatives=self.hard,
            repeats=self.repeats,
        )
        # Balance comes from the draw (repeated tumour tiles), so every training weight is 1.
        self.set_train(index, self.labels[index], np.ones(len(index), dtype=np.float32))
        self.drawn.append(index)


@register("supervised_cnn")
class SupervisedCNNDetector(PatchClassifierDetector):
    """Patch classifier on labelled tiles; tile score and map = tumour logit."""

    supervision = "tile"
    config_cls = SupervisedCNNConfig
    config: SupervisedCNNConfig

    def __init__(self, config: SupervisedCNNConfig | None = None) -> None:
        super().__init__(config)
        self.hard_negatives: HardNegativeRound | None = None

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        slides: np.ndarray | None = None,
    ) -> FitReport:
        raise LabelsRequiredError(
            "supervised_cnn learns tumour vs normal from labelled tiles (supervision='tile'), so "
            "normal tiles alone cannot train it: call fit_labelled(tiles, labels, val_tiles, "
            "val_labels) with labels from the tile manifest's label_fraction, or skip this "
            "family on a site without lesion annotations"
        )

    def fit_labelled(
        self,
        tiles: np.ndarray,
        labels: np.ndarray,
        val_tiles: np.ndarray,
        val_labels: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        checkpoint_dir: Path | None = None,
        resume_from: Path | None = None,
    ) -> FitReport:
        """Train on uint8 (N, H, W, 3) tiles with bool labels (True = tumour); two rounds.

        Round one: `epochs` epochs, each drawn by `epoch_index` (normal tiles, all or a fresh
        sample, plus tumour tiles cycled up to `positive_fraction`). Round two (unless
        `hard_negative_epochs` or `hard_negative_fraction` is 0): score every normal training
        tile, mine the top `hard_negative_fraction` of them, and fine-tune for
        `hard_negative_epochs` at `lr * hard_negative_lr_scale` on epochs drawn the same way
        plus `hard_negative_repeats` copies of each mined tile. `self.hard_negatives` records
        the scores, the mined tiles and every epoch's draw. Each round keeps its
        best-val weights; val loss is BCE with both classes weighted equally. The report covers
        both rounds, epochs numbered on (as `on_epoch` sees them). Checkpoints go to
        `<checkpoint_dir>/round1` and `/round2`; `resume_from` a folder with those continues
        where the run stopped (a finished round one is not retrained).
        """
        cfg = self.config
        labels = check_labelled(tiles, labels, "training tiles", cfg.tile_size)
        val_labels = check_labelled(val_tiles, val_labels, "validation tiles", cfg.tile_size)
        if len(val_labels) == 0:
            raise ValueError("no validation tiles: hold out some labelled tiles for early stopping")
        n_pos = int(labels.sum())
        if n_pos == 0 or n_pos == len(labels):
            raise ValueError(
                f"supervised_cnn needs tumour and normal training tiles, got {n_pos} tumour and "
                f"{len(labels) - n_pos} normal; lower the label-fraction threshold or add "
                "annotated tumour slides"
            )
        if n_pos < FEW_TUMOUR_TILES:
            warnings.warn(
                f"supervised_cnn has only {n_pos} tumour tiles to learn from: with this few it "
                "can learn the wrong thing (4 tiles gave tile AUROC 0.17 on the tiny hard "
                "synthetic site); annotate more tumour slides or compare with an unsupervised "
                "family",
                UserWarning,
                stacklevel=2,
            )
        if checkpoint_dir is None and resume_from is not None:
            checkpoint_dir = resume_from
        settings = TrainSettings.from_config(cfg)

        first = self._trainer(settings, labels, val_labels, round_number=1)
        report_one = first.fit(
            tiles,
            val_tiles,
            on_epoch=on_epoch,
            checkpoint_dir=_round(checkpoint_dir, 1),
            resume_from=_round(resume_from, 1),
        )

        scores = np.full(len(labels), np.nan, dtype=np.float32)
        if cfg.hard_negative_epochs == 0 or cfg.hard_negative_fraction == 0:
            mined = np.zeros(0, dtype=np.int64)
            self.hard_negatives = HardNegativeRound(scores, mined, first.drawn, len(first.drawn))
            return report_one

        normals = np.flatnonzero(~labels)
        scores[normals] = tile_logits(self.model, tiles[normals], self.device, cfg.batch_size)
        mined = mine_hard_negatives(scores, labels, cfg.hard_negative_fraction)
        fine_tune = dataclasses.replace(
            settings,
            epochs=cfg.hard_negative_epochs,
            lr=cfg.lr * cfg.hard_negative_lr_scale,
            patience=min(cfg.patience, cfg.hard_negative_epochs),
        )
        second = self._trainer(
            fine_tune,
            labels,
            val_labels,
            round_number=2,
            hard_negatives=mined,
            repeats=cfg.hard_negative_repeats,
        )
        self.hard_negatives = HardNegativeRound(scores, mined, list(first.drawn), len(first.drawn))
        offset = report_one.epochs

        def shifted(epoch: int, train_loss: float, val_loss: float) -> None:
            if on_epoch is not None:
                on_epoch(offset + epoch, train_loss, val_loss)

        resume_two = _round(resume_from, 2)
        if resume_two is not None and not (resume_two / CHECKPOINT_FILE).is_file():
            resume_two = None  # the earlier run stopped before round two began
        try:
            report_two = second.fit(
                tiles,
                val_tiles,
                on_epoch=shifted,
                checkpoint_dir=_round(checkpoint_dir, 2),
                resume_from=resume_two,
            )
        except DivergedError as exc:
            report = _combine(report_one, exc.report) if exc.report else report_one
            raise DivergedError(
                f"hard-negative round: {exc}", report=report, checkpoint=exc.checkpoint
            ) from exc
        finally:
            self.hard_negatives.epochs.extend(second.drawn)
        return _combine(report_one, report_two)

    def _trainer(
        self,
        settings: TrainSettings,
        labels: np.ndarray,
        val_labels: np.ndarray,
        *,
        round_number: int,
        hard_negatives: np.ndarray | None = None,
        repeats: int = 0,
    ) -> PatchTrainer:
        cfg = self.config
        trainer = PatchTrainer(
            self.model,
            settings,
            self.device,
            labels=labels,
            positive_fraction=cfg.positive_fraction,
            negatives_per_epoch=cfg.negatives_per_epoch,
            round_number=round_number,
            hard_negatives=hard_negatives,
            repeats=repeats,
        )
        trainer.set_val(val_labels, balanced_weights(val_labels))
        return trainer


def _round(folder: Path | None, number: int) -> Path | None:
    return None if folder is None else Path(folder) / f"round{number}"


def _combine(first: FitReport, second: FitReport) -> FitReport:
    """One report for two rounds: epochs and losses run on, the best epoch is round two's."""
    return FitReport(
        epochs=first.epochs + second.epochs,
        best_epoch=first.epochs + second.best_epoch if second.best_epoch else first.best_epoch,
        train_loss=[*first.train_loss, *second.train_loss],
        val_loss=[*first.val_loss, *second.val_loss],
        seconds=first.seconds + second.seconds,
        device=second.device,
        diverged=second.diverged,
        stopped_early=second.stopped_early,
    )
