"""The model registry: one registered model per (site, family), and the champion gate.

Every evaluated model version gets the alias `challenger`. It takes the alias `champion` only
when its data contracts passed, its training did not diverge, it clears the site's floor
(`promotion.min`, see `floor_failure`) and its evaluation metric beats the current champion's by
more than a margin *on the same evaluation set* (or there is no champion yet). The decision and
its reason are written on the model version as tags, so the dashboard shows why. Scoring loads
`models:/<site>-<family>@champion`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vadflow.tasks.records import PromotionDecision
from vadflow.tasks.tracking.mlflow_runs import (
    DEFAULT_FLOOR,
    INVERTED_TAG,
    NORMAL_MAX,
    NORMAL_MEDIAN,
    NORMAL_THRESHOLD,
    TAG_PROMOTION,
)
from vadflow.tasks.tracking.pyfunc import MODEL_NAME, OP_KEY_TAG, find_logged_models

CHAMPION = "champion"
CHALLENGER = "challenger"
EVAL_SET_TAG = "eval_set_hash"
DECISION_TAG = "vadflow.promotion"  # JSON of the PromotionDecision
REASON_TAG = TAG_PROMOTION  # the same, readable in the registry UI: "champion: <why>"
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


def registered_model_name(site: str, family: str) -> str:
    return f"{site}-{family}"


def champion_uri(site: str, family: str) -> str:
    """What scoring loads: `mlflow.pyfunc.load_model(champion_uri(site, family))`."""
    return f"models:/{registered_model_name(site, family)}@{CHAMPION}"


def evaluation_set_hash(
    slides: pl.DataFrame, split: str = "test", extra: Mapping[str, Any] | None = None
) -> str:
    """A digest of what a model was evaluated on: the split's slides (id, content hash, label)
    and anything else the metric depends on (`extra`, e.g. heatmap downsample, target FPR).

    Two versions' metrics are compared only when their digests are equal.
    """
    rows = slides.filter(pl.col("split") == split) if "split" in slides.columns else slides
    columns = [c for c in ("slide_id", "sha256", "label", "category") if c in rows.columns]
    if "slide_id" not in columns:
        raise ValueError("evaluation_set_hash needs a slide manifest with a slide_id column")
    payload = {
        "split": split,
        "slides": rows.select(columns).sort("slide_id").rows(),
        "annotations": _annotation_hashes(rows),
        "extra": {k: str(v) for k, v in sorted((extra or {}).items())},
    }
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()


def _annotation_hashes(rows: pl.DataFrame) -> list[tuple[str, str]]:
    if "annotation_uri" not in rows.columns:
        return []
    out = []
    for slide_id, uri in rows.select("slide_id", "annotation_uri").sort("slide_id").rows():
        if uri and Path(uri).is_file():
            out.append((slide_id, hashlib.sha256(Path(uri).read_bytes()).hexdigest()))
    return out


def register_model(
    client: MlflowClient,
    run_id: str,
    site: str,
    family: str,
    *,
    tags: Mapping[str, str] | None = None,
    op_key: str | None = None,
) -> str:
    """Register the model logged in `run_id` as a new version of `<site>-<family>`.

    Returns the version (a string, as MLflow gives it). With `op_key`, a version this call
    already created is returned instead of a second one (replays after an outage).
    """
    name = registered_model_name(site, family)
    _ensure_registered_model(client, name, site, family)
    if op_key:
        for found in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if found.tags.get(OP_KEY_TAG) == op_key:
                return str(found.version)
    logged = find_logged_models(client, run_id, MODEL_NAME)
    if not logged:
        raise LookupError(
            f"run {run_id} has no logged model named {MODEL_NAME!r}; log the detector with "
            "vadflow.tasks.tracking.pyfunc.log_detector_model before registering it"
        )
    model_id = logged[0].model_id
    version_tags = {"site": site, "family": family, **(tags or {})}
    if op_key:
        version_tags[OP_KEY_TAG] = op_key
    # The source is the logged model's storage location, not `models:/<id>`: a SQLite registry
    # resolves that URI through mlflow's *global* tracking URI, not this client's.
    version = client.create_model_version(
        name,
        source=logged[0].artifact_location,
        run_id=run_id,
        tags=version_tags,
        model_id=model_id,
    )
    return str(version.version)


def _ensure_registered_model(client: MlflowClient, name: str, site: str, family: str) -> None:
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != NOT_FOUND:
            raise
    try:
        client.create_registered_model(
            name,
            tags={"site": site, "family": family},
            description=f"{family} anomaly detector for site {site}; alias 'champion' is served",
        )
    except MlflowException as exc:
        if "ALREADY_EXISTS" not in exc.error_code:  # another task created it first
            raise


def promote(
    client: MlflowClient,
    name: str,
    version: str | int,
    *,
    metric: str,
    margin: float = 0.0,
    higher_is_better: bool = True,
    contracts_passed: bool,
    diverged: bool,
    eval_set_hash: str | None = None,
    floor: Mapping[str, float] | None = None,
) -> PromotionDecision:
    """Make `version` the challenger; make it champion if it earns it.

    It becomes champion only if contracts passed, training did not diverge, its run clears
    `floor` (metric -> minimum, default `DEFAULT_FLOOR`; `{}` for none; see `floor_failure`),
    and either there is no champion yet, or both were evaluated on the same evaluation set
    (equal `eval_set_hash` tags; `eval_set_hash` here sets this version's) and its `metric`
    (read from its run) beats the champion's by more than `margin`. Deciding again for the
    same version returns the first decision unchanged, so replays cannot flip it.
    """
    version = str(version)
    current = client.get_model_version(name, version)
    if DECISION_TAG in current.tags:
        return PromotionDecision(**json.loads(current.tags[DECISION_TAG]))
    if eval_set_hash:
        client.set_model_version_tag(name, version, EVAL_SET_TAG, eval_set_hash)
    challenger_hash = eval_set_hash or current.tags.get(EVAL_SET_TAG)
    client.set_registered_model_alias(name, CHALLENGER, version)
    value = _run_metric(client, current.run_id, metric)
    champion = alias_version(client, name, CHAMPION)
    champion_value = _run_metric(client, champion.run_id, metric) if champion is not None else None

    def decide(promoted: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(
            name=name,
            version=version,
            promoted=promoted,
            reason=reason,
            metric=metric,
            value=value,
            champion_version=str(champion.version) if champion is not None else None,
            champion_value=champion_value,
        )

    below = (
        floor_failure(
            client.get_run(current.run_id).data, DEFAULT_FLOOR if floor is None else floor
        )
        if current.run_id
        else "the version has no run to read its metrics from"
    )
    if diverged:
        decision = decide(False, "training diverged (NaN/inf loss): never promoted")
    elif not contracts_passed:
        decision = decide(False, "data contracts failed: not promoted")
    elif below is not None:
        decision = decide(False, below)
    elif champion is None:
        decision = decide(True, "no champion yet: the first healthy version becomes champion")
    elif str(champion.version) == version:
        decision = decide(True, "already champion")
    else:
        decision = _compare(
            decide,
            metric=metric,
            value=value,
            champion=champion,
            champion_value=champion_value,
            challenger_hash=challenger_hash,
            margin=margin,
            higher_is_better=higher_is_better,
        )
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    outcome = "champion" if decision.promoted else "not promoted"
    client.set_model_version_tag(name, version, REASON_TAG, f"{outcome}: {decision.reason}")
    client.set_model_version_tag(name, version, DECISION_TAG, json.dumps(decision.to_dict()))
    return decision


def _compare(
    decide: Callable[[bool, str], PromotionDecision],
    *,
    metric: str,
    value: float | None,
    champion: Any,
    champion_value: float | None,
    challenger_hash: str | None,
    margin: float,
    higher_is_better: bool,
) -> PromotionDecision:
    champion_hash = champion.tags.get(EVAL_SET_TAG)
    if not challenger_hash or not champion_hash:
        missing = "this version" if not challenger_hash else f"champion v{champion.version}"
        return decide(
            False,
            f"{missing} has no {EVAL_SET_TAG} tag, so the two cannot be compared on the same "
            "evaluation set; pass eval_set_hash to promote()",
        )
    if challenger_hash != champion_hash:
        return decide(
            False,
            f"evaluated on a different evaluation set than champion v{champion.version} "
            f"({challenger_hash[:12]} vs {champion_hash[:12]}): {metric} values are not "
            "comparable; re-evaluate both on one set, or move the alias by hand",
        )
    if value is None:
        return decide(False, f"this version's run has no finite {metric!r} metric")
    if champion_value is None:
        return decide(
            False,
            f"champion v{champion.version}'s run has no finite {metric!r} metric, so it cannot "
            "be beaten on it; move the alias by hand if this version should serve",
        )
    gain = value - champion_value if higher_is_better else champion_value - value
    better = "higher" if higher_is_better else "lower"
    summary = (
        f"{metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f} "
        f"({better} is better, margin {margin:g})"
    )
    if gain > margin:
        return decide(True, f"beats the champion: {summary}")
    return decide(False, f"does not beat the champion by the margin: {summary}")


def floor_failure(run_data: Any, floor: Mapping[str, float]) -> str | None:
    """Why a run falls below the promotion floor, or None when it clears it.

    `run_data` is an MLflow run's `data` (its `metrics` and `tags`). With labels (any metric of
    `floor` was logged) every logged floor metric must reach its minimum. Without labels there
    is nothing to measure against, so the check is on the model's own normal validation data:
    its calibrated threshold and normal heatmap statistics were logged and are finite, and
    median < threshold <= max (a collapsed model, whose normal maps are constant, fails). A run
    tagged `inverted` = true never clears the floor.
    """
    metrics = {k: float(v) for k, v in run_data.metrics.items() if math.isfinite(v)}
    if str(run_data.tags.get(INVERTED_TAG, "")).lower() in ("true", "1", "yes"):
        return f"the run is tagged {INVERTED_TAG}=true (it ranks anomalies below normal)"
    if not floor:
        return None
    measured = {k: v for k, v in floor.items() if k in metrics}
    if measured:
        below = [f"{k} {metrics[k]:.4f} < {v:g}" for k, v in measured.items() if metrics[k] < v]
        if not below:
            return None
        return "below the promotion floor (promotion.min): " + ", ".join(below)
    stats = {k: metrics.get(k) for k in (NORMAL_THRESHOLD, NORMAL_MEDIAN, NORMAL_MAX)}
    missing = [k for k, v in stats.items() if v is None]
    wanted = ", ".join(floor)
    if missing:
        return (
            f"no labels to check the promotion floor ({wanted}) and no normal-validation "
            f"statistics ({', '.join(missing)}): keep normal validation slides, or label test "
            "slides"
        )
    threshold, median, top = stats[NORMAL_THRESHOLD], stats[NORMAL_MEDIAN], stats[NORMAL_MAX]
    if not median < threshold <= top:
        return (
            f"no labels to check the promotion floor ({wanted}), and the normal-validation "
            f"statistics are out of bounds: threshold {threshold:.4g} is not within "
            f"(median {median:.4g}, max {top:.4g}]"
        )
    return None


def _run_metric(client: MlflowClient, run_id: str | None, metric: str) -> float | None:
    if not run_id:
        return None
    value = client.get_run(run_id).data.metrics.get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def alias_version(client: MlflowClient, name: str, alias: str) -> Any:
    """The model version `name@alias` (an MLflow ModelVersion), or None when the model or the
    alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in (NOT_FOUND, "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion_version(client: MlflowClient, site: str, family: str) -> str | None:
    found = alias_version(client, registered_model_name(site, family), CHAMPION)
    return str(found.version) if found is not None else None


def download_champion(tracking_uri: str, site: str, family: str, dst: Path) -> Path:
    """Download the champion's MLflow model and return its detector folder, for scoring code
    that needs `load_detector` (anomaly maps, not only the pyfunc's tile scores).

    Resolved through a client on `tracking_uri`: mlflow's `models:/...@alias` downloads read
    the global registry URI instead, whatever they are passed."""
    import mlflow.artifacts

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name = registered_model_name(site, family)
    version = alias_version(client, name, CHAMPION)
    if version is None:
        raise LookupError(
            f"{name} has no champion at {tracking_uri}: run the nightly flow (or promote a "
            "version) first"
        )
    if version.model_id:
        location = client.get_logged_model(version.model_id).artifact_location
    else:
        location = client.get_model_version_download_uri(name, str(version.version))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=location, dst_path=str(dst), tracking_uri=tracking_uri
    )
    return detector_folder(Path(local))


def detector_folder(model_dir: Path) -> Path:
    """The saved detector folder inside a downloaded MLflow model folder (from its MLmodel)."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get("detector", {}).get("path")
    if not relative or not (model_dir / relative / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no detector folder: was it logged with "
            "vadflow.tasks.tracking.pyfunc.log_detector_model?"
        )
    return model_dir / relative
