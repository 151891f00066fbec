"""MLflow runs for a nightly run: one experiment per site, a parent run per night, one nested
child run per detector family.

This module holds the *shape* of what is logged (tag names, flattened params, curves as
metric steps) and the tracking URI rules. The embedded default is a SQLite store and a local
artifact folder under the project's state folder; any tracking URI (an `mlflow server`) works the
same way. Runs are addressed by id through `MlflowClient`, never through mlflow's global "active
run", so tasks on different threads can log to the same parent safely.

To survive a tracking server that is down, log through `tasks.tracking.spool.TrackingSession`,
which uses these helpers and spools what it cannot send.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vadflow.tasks.records import TrackingTarget

if TYPE_CHECKING:  # MLflow loads where a run is logged, not when a flow module is imported
    import numpy as np
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

MAX_PARAM_CHARS = 6000
BATCH_LIMIT = 90  # log_batch takes at most 100 params / 1000 metrics; stay well under

# Tag names: the dashboard filters on these (e.g. `tags.family = 'ae_l2'`).
TAG_SITE = "site"
TAG_FAMILY = "family"
TAG_GIT_COMMIT = "git_commit"
TAG_FLOW_RUN = "prefect_flow_run_id"
TAG_CONTRACTS = "contracts"  # "passed" or "failed"
TAG_MANIFEST_PREFIX = "manifest."  # manifest.<name>.sha256
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: nests the run under its parent in the UI
TAG_CATEGORY = "category"  # an industrial category's own model (MVTec AD protocol)
TAG_RUN_KIND = "vadflow.kind"  # "nightly" (parent) or "family" (child)
TAG_PROMOTION = "promotion"  # the champion gate's decision, "champion: <why>" / "not promoted: .."

# The floor a version must clear whatever the champion: a slide AUROC of 0.6 is barely better
# than a coin, and night one's first model (AUROC 0.0 in issue #23) must not serve.
DEFAULT_FLOOR: dict[str, float] = {"slide_auroc": 0.6}
# A run tag anyone (a reviewer, the benchmark) may set when a model ranks anomalies *below*
# normal; such a model is never promoted, labels or not.
INVERTED_TAG = "inverted"
# What a run without labels logs about its own normal validation data (`normal_validation_
# metrics` in tasks/tracking/nightly.py): the calibrated slide threshold and the (median, max)
# of the held-out normal heatmaps.
NORMAL_THRESHOLD = "normal_val.threshold"
NORMAL_MEDIAN = "normal_val.heatmap_median"
NORMAL_MAX = "normal_val.heatmap_max"


def experiment_name(site: str) -> str:
    return f"vadflow/{site}"


def default_home() -> Path:
    """The project-local state folder: `$VADFLOW_HOME`, else `./.vadflow` (see flows/env.py)."""
    return Path(os.environ.get("VADFLOW_HOME") or ".vadflow").resolve()


def local_tracking_uri(store: Path) -> str:
    """SQLite tracking store inside `store`; artifacts go to `store/artifacts`."""
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store / 'mlflow.db').resolve()}"


def resolve_tracking_uri(configured: str | None = None, home: Path | None = None) -> str:
    """Where to track: `configured` (a flag or site setting), else `$MLFLOW_TRACKING_URI`, else
    the embedded SQLite store under `<home>/mlflow/`."""
    if configured:
        return configured
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return local_tracking_uri((home or default_home()) / "mlflow")


def default_artifact_root(tracking_uri: str, home: Path | None = None) -> Path | None:
    """Local artifact folder for the embedded store; None for a server, which decides itself."""
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        return (home or default_home()) / "mlflow" / "artifacts"
    return None


def default_spool_dir(home: Path | None = None) -> Path:
    """Where logging that could not reach the tracking server waits for `vadflow tracking sync`."""
    return (home or default_home()) / "mlflow" / "spool"


def tracking_target(configured: str | None = None, home: Path | None = None) -> TrackingTarget:
    """Where a flow tracks (`resolve_tracking_uri`), where it spools when that is down, and the
    artifact root of the embedded store."""
    uri = resolve_tracking_uri(configured, home)
    root = default_artifact_root(uri, home)
    return TrackingTarget(uri, str(default_spool_dir(home)), str(root) if root else None)


def experiment_id(client: MlflowClient, site: str, artifact_root: Path | None) -> str:
    """One experiment per site, created on first use."""
    return experiment_id_by_name(client, experiment_name(site), artifact_root)


def experiment_id_by_name(
    client: MlflowClient, name: str, artifact_root: Path | str | None = None
) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if artifact_root is None:
        location = None
    elif isinstance(artifact_root, Path) or "://" not in str(artifact_root):
        location = Path(artifact_root).resolve().as_uri()
    else:
        location = str(artifact_root)
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Two tasks raced to create it: the loser reads the winner's.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# --- what a run carries -------------------------------------------------------------------


def run_tags(
    site: str,
    *,
    family: str | None = None,
    git_commit: str | None = None,
    flow_run_id: str | None = None,
    manifest_hashes: Mapping[str, str] | None = None,
    contracts_passed: bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The tags every vadflow run carries, so runs can be filtered and traced to their inputs."""
    tags: dict[str, str] = {TAG_SITE: site, TAG_RUN_KIND: "family" if family else "nightly"}
    if family:
        tags[TAG_FAMILY] = family
    if git_commit:
        tags[TAG_GIT_COMMIT] = git_commit
    if flow_run_id:
        tags[TAG_FLOW_RUN] = flow_run_id
    for name, digest in (manifest_hashes or {}).items():
        tags[f"{TAG_MANIFEST_PREFIX}{name}.sha256"] = digest
    if contracts_passed is not None:
        tags[TAG_CONTRACTS] = "passed" if contracts_passed else "failed"
    for key, value in (extra or {}).items():
        tags[key] = str(value)
    return tags


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: Iterable[str | Path]) -> str:
    """One digest over many files (e.g. the per-slide tile manifests), independent of order;
    a missing file counts as such rather than failing the run."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        content = file_sha256(path) if path.is_file() else "missing"
        digest.update(f"{path.name}:{content}\n".encode())
    return digest.hexdigest()


def manifest_hashes(slides_manifest: str | Path, tile_manifests: Iterable[str | Path]) -> dict:
    """`{"slides": sha256, "tiles": sha256}` for `run_tags(manifest_hashes=...)`."""
    return {"slides": file_sha256(slides_manifest), "tiles": files_sha256(tile_manifests)}


def family_params(family: str, config: Any, tiling: Any) -> dict[str, Any]:
    """Params of a family's child run: its config dataclass and the tiling config, flattened
    (`config.lr`, `tiling.tile_size`) so each is one column in the dashboard."""
    return flatten_params(
        {"family": family, "config": _as_dict(config), "tiling": _as_dict(tiling)}
    )


def curve_metrics(
    curves: Iterable[Mapping[str, float]], step_key: str = "epoch", timestamp: int | None = None
) -> list[Metric]:
    """Per-epoch training curves (`[{"epoch": 1, "train_loss": .., "val_loss": ..}]`) as metrics
    with the epoch as MLflow step, so the UI draws them as curves."""
    from mlflow.entities import Metric

    now = timestamp if timestamp is not None else now_ms()
    out = []
    for point in curves:
        step = int(point[step_key])
        for key, value in point.items():
            if key != step_key and _finite(value):
                out.append(Metric(key, float(value), now, step))
    return out


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only: MLflow stores NaN, but a dashboard sorts it badly."""
    return {k: float(v) for k, v in metrics.items() if _finite(v)}


def now_ms() -> int:
    return int(time.time() * 1000)


# --- plain client helpers (no spooling; see spool.TrackingSession for that) --------------


def start_run(
    client: MlflowClient,
    experiment: str,
    name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
    start_time: int | None = None,
) -> str:
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    run = client.create_run(experiment, run_name=name, tags=all_tags, start_time=start_time)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    batch = [Param(k, v) for k, v in param_strings(params).items()]
    for start in range(0, len(batch), BATCH_LIMIT):
        client.log_batch(run_id, params=batch[start : start + BATCH_LIMIT])


def param_strings(params: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in flatten_params(params).items()}


def log_metrics(
    client: MlflowClient,
    run_id: str,
    metrics: Mapping[str, float],
    step: int = 0,
    timestamp: int | None = None,
) -> None:
    """Finite metrics only: MLflow stores NaN, but a dashboard sorts it badly."""
    from mlflow.entities import Metric

    now = timestamp if timestamp is not None else now_ms()
    batch = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
    for start in range(0, len(batch), BATCH_LIMIT):
        client.log_batch(run_id, metrics=batch[start : start + BATCH_LIMIT])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_model(tracking_uri: str, run_id: str, detector_dir: Path, example: np.ndarray) -> str:
    """Log a trained detector as a pyfunc model that loads back and scores tiles."""
    from mlflow.tracking import MlflowClient

    from vadflow.tasks.tracking.pyfunc import log_detector_model

    return log_detector_model(MlflowClient(tracking_uri), run_id, detector_dir, example)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = value
    return out


_flatten = flatten_params  # the name older callers used


def _as_dict(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "model_dump"):  # pydantic
        return value.model_dump()
    return value


def _finite(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
