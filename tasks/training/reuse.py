"""Do not retrain a family whose inputs did not change.

A model folder records the key of what it was trained from (`training_key.json`): the content
of its training manifests (the train and val slides' rows, their sha256, and their tile
manifests' bytes), the family's resolved config (site file, command-line flags) with the site
settings training reads, and the code version (the package version plus a hash of the family's
source files and of the training, normalisation and shared detector code). A later night with
the same key reuses that folder instead of training: `unchanged_model` finds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import polars as pl

from vadflow.tasks.records import EpochLoss, TrainedModel
from vadflow.tasks.site import SiteConfig
from vadflow.tasks.slides.storage import is_remote, storage_for
from vadflow.tasks.training.model_folder import FIT_REPORT_FILE

TRAINING_KEY_FILE = "training_key.json"
TRAINED_SPLITS = ("train", "val")  # test slides never change a model: new ones are only scored
PACKAGE = Path(__file__).resolve().parents[2]  # the vadflow package root
# Sources every family's training depends on, besides its own folder.
SHARED_SOURCES = (
    "tasks/detectors/base.py",
    "tasks/detectors/registry.py",
    "tasks/detectors/settings.py",
    "tasks/detectors/components",
    "tasks/training",
    "tasks/normalise",
    "tasks/slides/tiles.py",
)


@cache
def code_version(family: str) -> str:
    """The package version and a sha256 of the sources that decide `family`'s training."""
    from vadflow import __version__

    digest = hashlib.sha256(__version__.encode())
    for part in (f"tasks/detectors/{family}", *SHARED_SOURCES):
        root = PACKAGE / part
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root] if root.exists() else []
        for path in files:
            digest.update(str(path.relative_to(PACKAGE)).encode())
            digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def _content_hash(uri: str, site: SiteConfig) -> str:
    if is_remote(uri):
        data = storage_for(uri, site.storage.options()).read_bytes(uri)
    else:
        data = Path(uri).read_bytes()
    return hashlib.sha256(data).hexdigest()


def training_key(
    family: str,
    site: SiteConfig,
    slides_path: str,
    tile_paths: list[str],
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a model of `family` trained now would be trained from (see the module docstring).
    Only the training and validation slides count: a new test slide is scored, not trained on."""
    from vadflow.tasks.training.train import detector_settings

    slides = (
        pl.read_parquet(slides_path)
        .filter((pl.col("status") == "ok") & pl.col("split").is_in(TRAINED_SPLITS))
        .select("slide_id", "sha256", "label", "split", "category", "annotation_uri", "mpp")
        .sort("slide_id")
    )
    trained = set(slides["slide_id"].to_list())
    # Tile manifests are `tiles/<slide_id>.parquet` (tasks/tiling/grid.py).
    manifests = {
        Path(p).name.removesuffix(".parquet"): _content_hash(str(p), site)
        for p in tile_paths
        if Path(p).name.removesuffix(".parquet") in trained
    }
    config = {
        "detector": detector_settings(family, site, flags),
        "stain_normalisation": site.stain_normalisation,
        "max_train_tiles": site.max_train_tiles,
        "domain": site.domain,
    }
    return {
        "family": family,
        "slides": slides.to_dicts(),
        "tile_manifests": dict(sorted(manifests.items())),
        "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "code": code_version(family),
    }


def write_training_key(model_dir: str | Path, key: Mapping[str, Any]) -> Path:
    """Record beside the weights what the model was trained from."""
    path = Path(model_dir) / TRAINING_KEY_FILE
    path.write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
    return path


@dataclass(frozen=True)
class UnchangedModel:
    """An earlier night's model whose training inputs match tonight's."""

    version: str  # the run that trained it
    trained: TrainedModel  # its fit report, pointing at its own folder


def unchanged_model(
    model_dir: str | Path, family: str, key: Mapping[str, Any]
) -> UnchangedModel | None:
    """The newest earlier model folder beside `model_dir` (`models/<family>/<version>`, or
    `.../<version>/<category>`) trained from the same `key`, complete and not diverged; None
    if there is none."""
    model_dir = Path(model_dir)
    family_root = next(
        (p for p in model_dir.parents if p.name == family and p.parent.name == "models"), None
    )
    if family_root is None or not family_root.is_dir():
        return None
    below = model_dir.relative_to(family_root)  # <version>[/<category>]
    tail = Path(*below.parts[1:])
    wanted = json.loads(json.dumps(key, sort_keys=True, default=str))
    for version_dir in sorted(family_root.iterdir(), reverse=True):
        candidate = version_dir / tail
        if candidate == model_dir or not (candidate / TRAINING_KEY_FILE).is_file():
            continue
        try:
            if json.loads((candidate / TRAINING_KEY_FILE).read_text()) != wanted:
                continue
            trained = read_trained(candidate)
        except (OSError, ValueError, TypeError, KeyError):
            continue  # an unreadable folder is not reused; tonight's training replaces it
        if trained.diverged or not (candidate / "config.json").is_file():
            continue
        return UnchangedModel(version_dir.name, trained)
    return None


def read_trained(model_dir: str | Path) -> TrainedModel:
    """The TrainedModel a model folder's `fit_report.json` records, pointing at that folder."""
    from vadflow.tasks.detectors.base import FitReport

    data = json.loads((Path(model_dir) / FIT_REPORT_FILE).read_text())
    report = data.get("report")
    return TrainedModel(
        **{
            **data,
            "model_dir": str(model_dir),
            "report": FitReport(**report) if report else None,
            "curves": tuple(EpochLoss(**c) for c in data.get("curves", ())),
        }
    )
