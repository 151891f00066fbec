"""Train one detector family on a site: the train stage.

    trained = train_family(family, site, slides_path, tile_paths, model_dir, flags={"epochs": 3})

What a family learns from decides its training set (`training_set`): unsupervised families
train on normal tiles, `supervision == "tile"` families on labelled tiles, `"slide"` families
on one bag of tiles per training slide. A stain reference is fitted on the normal tiles and
saved with the model; the detector is built from the one settings path (`detector_settings`),
fitted, saved, and its fit report written as `fit_report.json`. A diverged run (NaN/inf) keeps
its best weights and is reported as diverged, so it is scored and logged but never promoted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vadflow.tasks import progress
from vadflow.tasks.detectors.registry import create_detector, detector_class
from vadflow.tasks.detectors.settings import family_settings
from vadflow.tasks.normalise.stain import StainNormaliser
from vadflow.tasks.records import EpochLoss, SkippedFamily, TrainedModel
from vadflow.tasks.site import SiteConfig
from vadflow.tasks.training.model_folder import EXAMPLE_FILE, FIT_REPORT_FILE
from vadflow.tasks.training.sampling import (
    LESION_TILE_FRACTION,
    labelled_training_tiles,
    training_bags,
    training_tiles,
)
from vadflow.tasks.training.stain import fit_stain_reference

if TYPE_CHECKING:
    from vadflow.tasks.detectors.base import FitReport

log = logging.getLogger(__name__)


class NoTrainingLabels(LookupError):
    """The site lacks the labels a supervised family learns from (the family is skipped)."""


@dataclass(frozen=True)
class TrainingSet:
    """The pixels one family trains on. It stays inside this stage: never a task result."""

    supervision: str  # none | tile | slide
    normal: np.ndarray  # (B, H, W, 3) normal tiles: the stain reference is fitted on them
    train: np.ndarray | None = None
    val: np.ndarray | None = None
    labels: np.ndarray | None = None  # (B,) bool, True: tumour (tile supervision)
    val_labels: np.ndarray | None = None
    slides: np.ndarray | None = None  # (B,) slide id of each `train` tile (no supervision)
    bags: tuple[np.ndarray, ...] = ()  # one per training slide (slide supervision)
    bag_labels: tuple[bool, ...] = ()

    def normalised(self, normaliser: StainNormaliser) -> TrainingSet:
        """The same set with every tile mapped to the stain reference."""
        if self.supervision == "slide":
            return replace(self, bags=tuple(normaliser.transform(b) for b in self.bags))
        return replace(
            self, train=normaliser.transform(self.train), val=normaliser.transform(self.val)
        )

    def counts(self) -> dict[str, int]:
        """Tile (and slide) counts, for the log and the fit report."""
        if self.supervision == "slide":
            tiles = sum(map(len, self.bags))
            return {"train_slides": len(self.bags), "train_tiles": tiles, "val_tiles": 0}
        counts = {"train_tiles": len(self.train), "val_tiles": len(self.val)}
        if self.supervision == "tile":
            counts["train_tumour_tiles"] = int(self.labels.sum())
        return counts

    def example(self) -> np.ndarray:
        """Two tiles as the model sees them (stain-normalised): the logged model's example."""
        return self.bags[0][:2] if self.supervision == "slide" else self.val[:2]

    def fit(self, detector: Any, on_epoch: Any) -> Any:
        """Fit `detector` the way its supervision asks; returns its fit report."""
        if self.supervision == "slide":
            return detector.fit_bags(list(self.bags), list(self.bag_labels), on_epoch=on_epoch)
        if self.supervision == "tile":
            return detector.fit_labelled(
                self.train, self.labels, self.val, self.val_labels, on_epoch=on_epoch
            )
        return detector.fit(self.train, self.val, on_epoch=on_epoch, slides=self.slides)


def training_set(
    supervision: str, site: SiteConfig, slides_path: str, tile_paths: list[str]
) -> TrainingSet:
    """The tiles a family with this supervision trains on; NoTrainingLabels when the site
    lacks the labels it needs."""
    if supervision == "tile":
        labelled = labelled_training_tiles(site, slides_path, tile_paths)
        if labelled is None:
            raise NoTrainingLabels(
                f"no training tile has label_fraction >= {LESION_TILE_FRACTION}: it needs "
                "tumour slides under training/tumor with lesion_annotations/<slide>.xml, and "
                "normal training tiles"
            )
        train, labels, val, val_labels = labelled
        return TrainingSet("tile", train[~labels], train, val, labels, val_labels)
    if supervision == "slide":
        bagged = training_bags(site, slides_path, tile_paths)
        if bagged is None:
            raise NoTrainingLabels("it needs both tumour and normal training slides (slide labels)")
        bags, bag_labels = bagged
        normal = np.concatenate([b for b, t in zip(bags, bag_labels, strict=True) if not t])
        return TrainingSet("slide", normal, bags=tuple(bags), bag_labels=tuple(bag_labels))
    train, val, slides = training_tiles(site, slides_path, tile_paths)
    return TrainingSet("none", train, train, val, slides=slides)


def detector_settings(
    family: str, site: SiteConfig, flags: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The config overrides of `family` on `site`: the site's tile size and augmentation (for
    the families that have those fields), then its domain's defaults, then the site file's
    `detectors:` entry, then the command line's `flags` (each applied to the families that
    have the field)."""
    shared = {"tile_size": site.tiling.tile_size, "augment": site.augmentation.model_dump()}
    return family_settings(
        family, shared=shared, domain=site.domain, site=site.detectors.get(family), flags=flags
    )


def train_family(
    family: str,
    site: SiteConfig,
    slides_path: str,
    tile_paths: list[str],
    model_dir: str | Path,
    *,
    flags: Mapping[str, Any] | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> TrainedModel | SkippedFamily:
    """Fit one family on the site's tiles and save it under `model_dir`; its TrainedModel, or
    SkippedFamily when a supervised family finds no labels on this site (warned, not failed)."""
    from vadflow.tasks.detectors.base import DivergedError

    stage = f"train {family}"
    progress.report(stage, 0, None, "reading training tiles")
    supervision = detector_class(family).supervision
    try:
        data = training_set(supervision, site, slides_path, tile_paths)
    except NoTrainingLabels as exc:
        logger.warning("skipping %s on site %s: %s", family, site.name, exc)
        progress.report(stage, 1, 1, "skipped: the site lacks its labels")
        return SkippedFamily(family, str(exc))
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The stain reference is fitted on normal tiles for every family.
    data = data.normalised(fit_stain_reference(site.stain_normalisation, data.normal, out))
    counts = data.counts()
    logger.info("%s (supervision=%s): %s", family, supervision, counts)
    detector = create_detector(family, **detector_settings(family, site, flags))
    curves: list[EpochLoss] = []
    # None (no total to show) for a family without an `epochs` field.
    epochs = getattr(detector.config, "epochs", 0) or None
    progress.report(stage, 0, epochs, f"{counts['train_tiles']} tiles")

    def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
        curves.append(EpochLoss(epoch, train_loss, val_loss))
        logger.info("%s epoch %d: train %.5f  val %.5f", family, epoch, train_loss, val_loss)
        losses = f"loss {train_loss:.4f}, val {val_loss:.4f}"
        progress.report(stage, epoch, max(epoch, epochs or 0), losses)

    diverged = False
    try:
        report = data.fit(detector, on_epoch)
    except DivergedError as exc:
        logger.error("%s diverged: %s", family, exc)
        report = replace(exc.report, diverged=True) if exc.report else None
        diverged = True
    progress.report(stage, *_finished(report, epochs, diverged))
    detector.save(out)
    np.save(out / EXAMPLE_FILE, data.example())
    trained = TrainedModel(
        family=family,
        model_dir=str(out),
        supervision=supervision,
        config=asdict(detector.config),
        report=report,
        curves=tuple(curves),
        diverged=diverged,
        **counts,
    )
    (out / FIT_REPORT_FILE).write_text(json.dumps(trained.to_dict(), indent=2, default=str))
    return trained


def _finished(report: FitReport | None, epochs: int | None, diverged: bool) -> tuple[int, int, str]:
    """(done, total, detail) of a finished fit for the progress display: the bar ends full,
    and the detail gives the last validation loss and says when and why it stopped early."""
    ran = report.epochs if report is not None and report.epochs else 1
    if diverged:
        return ran, ran, f"diverged at epoch {ran}: best weights kept, never promoted"
    detail = f"val {report.val_loss[-1]:.4f}" if report is not None and report.val_loss else "done"
    if report is not None and report.stopped_early:
        detail += f"; stopped early at epoch {ran} of {epochs}: validation loss stopped improving"
    return ran, ran, detail
