"""The train stage's task (`tasks/training/train.py`)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from vadflow.tasks.records import SkippedFamily, TrainedModel
from vadflow.tasks.site import SiteConfig


@task(name="train")
def train_task(
    family: str,
    site: SiteConfig,
    slides_path: str,
    tile_paths: list[str],
    model_dir: str,
    flags: dict[str, Any] | None = None,
) -> TrainedModel | SkippedFamily:
    """Fit one detector family on the site and save it under `model_dir`; `flags` are
    command-line settings applied to every family that has the field (e.g. epochs)."""
    # Imported here: training pulls in torch and scikit-image, which importing a flow should not.
    from vadflow.tasks.detectors.components.threads import set_torch_threads
    from vadflow.tasks.training.train import train_family

    set_torch_threads(concurrent=1)  # families train one at a time: every core is this one's
    return train_family(
        family, site, slides_path, tile_paths, model_dir, flags=flags, logger=get_run_logger()
    )
