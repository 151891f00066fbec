"""The train stage's task (`tasks/training/train.py`), and the reuse of an unchanged model
(`tasks/training/reuse.py`)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from vadflow.tasks import progress
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
    force: bool = False,
) -> TrainedModel | SkippedFamily:
    """Fit one detector family on the site and save it under `model_dir`; `flags` are
    command-line settings applied to every family that has the field (e.g. epochs).

    When an earlier night's model of this family was trained from the same manifests, config
    and code, that model (its own folder) is returned instead, unless `force`."""
    # Imported here: training pulls in torch and scikit-image, which importing a flow should not.
    from vadflow.tasks.detectors.components.threads import set_torch_threads
    from vadflow.tasks.training.reuse import training_key, unchanged_model, write_training_key
    from vadflow.tasks.training.train import train_family

    logger = get_run_logger()
    key = training_key(family, site, slides_path, tile_paths, flags)
    if not force and (earlier := unchanged_model(model_dir, family, key)) is not None:
        logger.info(
            "%s: unchanged since %s (same training manifests, config and code): reusing %s",
            family,
            earlier.version,
            earlier.trained.model_dir,
        )
        progress.report(f"train {family}", 1, 1, f"unchanged since {earlier.version}")
        return earlier.trained
    set_torch_threads(concurrent=1)  # families train one at a time: every core is this one's
    trained = train_family(
        family, site, slides_path, tile_paths, model_dir, flags=flags, logger=logger
    )
    if isinstance(trained, TrainedModel):
        write_training_key(trained.model_dir, key)
    return trained
