"""MLflow runs for a nightly run: one parent per run, one nested child per detector family.

The embedded default is a SQLite store and a local artifact folder under the project's state
folder; any tracking URI (an `mlflow server`) works the same way. Runs are addressed by id
through `MlflowClient`, so tasks on different threads can log to the same parent safely.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_CHARS = 6000


def local_tracking_uri(store: Path) -> str:
    """SQLite tracking store inside `store`; artifacts go to `store/artifacts`."""
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store / 'mlflow.db').resolve()}"


def experiment_id(client: MlflowClient, site: str, artifact_root: Path | None) -> str:
    """One experiment per site, created on first use."""
    name = f"vadflow/{site}"
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(name, artifact_location=location)


def start_run(
    client: MlflowClient,
    experiment: str,
    name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> str:
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment, run_name=name, tags=all_tags)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    flat = _flatten(params)
    batch = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flat.items()]
    for start in range(0, len(batch), 90):
        client.log_batch(run_id, params=batch[start : start + 90])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Finite metrics only: MLflow stores NaN, but a dashboard sorts it badly."""
    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and np.isfinite(v)
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_model(tracking_uri: str, run_id: str, detector_dir: Path, example: np.ndarray) -> str:
    """Log a trained detector as a pyfunc model that loads back and scores tiles."""
    from tasks.tracking.pyfunc import DetectorModel

    mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The wrapper is a small class of ours, pickled by reference; its hints are numpy.
        warnings.filterwarnings("ignore", message=".*type hints.*")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=DetectorModel(),
            artifacts={"detector": str(detector_dir)},
            input_example=example,
            pip_requirements=["vadflow"],
        )
    return info.model_uri


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
