"""Compare detector families across nightly runs of one site: a table and a plot.

`vadflow compare <site>` prints the table; the nightly flow logs both as artifacts of its
parent run, so each night's run carries the comparison as it stood.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vadflow.tasks.tracking.mlflow_runs import (
    TAG_CATEGORY,
    TAG_FAMILY,
    TAG_PARENT,
    TAG_RUN_KIND,
    experiment_name,
)
from vadflow.tasks.tracking.plots import comparison_plot
from vadflow.tasks.tracking.registry import CHALLENGER, CHAMPION, registered_model_name

COMPARE_METRICS = (
    "slide_auroc",
    "froc",
    "pixel_auroc",
    "pro",
    "slide_f1_max",
    "slide_sensitivity",
    "slide_specificity",
)
# What `vadflow compare` prints unless asked for others: the metrics families are ranked by
# (FROC on pathology sites, PRO on industrial ones; a metric no run logged is left out).
HEADLINE_METRICS = ("slide_auroc", "froc", "pixel_auroc", "pro")
# How the printed table names the metrics (the CSV keeps the MLflow metric keys).
METRIC_LABELS = {
    "slide_auroc": "slide AUC",
    "froc": "FROC",
    "pixel_auroc": "pixel AUROC",
    "pro": "PRO",
    "slide_f1_max": "F1-max",
    "slide_sensitivity": "sensitivity",
    "slide_specificity": "specificity",
}
ARTIFACT_DIR = "comparison"


class ArtifactLogger(Protocol):
    """`MlflowClient` or `TrackingSession`: both log a file to a run this way."""

    def log_artifact(self, run: str, path: Any, artifact_path: str | None = None) -> None: ...


def compare_runs(
    client: MlflowClient, site: str, metrics: Sequence[str] = COMPARE_METRICS
) -> pl.DataFrame:
    """One row per family run of the site (newest night first) with its metrics, model version
    and aliases. Columns: nightly, started, family, category, status, <metrics...>, version,
    champion, challenger, run_id, parent_run_id.

    A site trained per category (MVTec AD protocol) has one run per family and category
    (`category` set); each night and family then also gets a row with category `mean`, the
    mean of each metric over its categories (as the protocol reports it). Whole-site runs
    have no category."""
    experiment = client.get_experiment_by_name(experiment_name(site))
    if experiment is None:
        raise LookupError(
            f"no MLflow experiment {experiment_name(site)!r} at {client.tracking_uri}: "
            "has the nightly flow run on this site, against this tracking URI?"
        )
    runs = _all_runs(client, experiment.experiment_id)
    parents = {r.info.run_id: r for r in runs}
    models = {_model_key(r.data.tags) for r in runs if r.data.tags.get(TAG_FAMILY)}
    versions = _model_versions(client, site, models)
    rows = []
    for run in runs:
        tags = run.data.tags
        family = tags.get(TAG_FAMILY)
        if not family or tags.get(TAG_RUN_KIND, "family") != "family":
            continue
        parent_id = tags.get(TAG_PARENT)
        parent = parents.get(parent_id) if parent_id else None
        version, aliases = versions.get(run.info.run_id, (None, []))  # by run, any model
        night_start = (parent or run).info.start_time
        row: dict[str, Any] = {
            "_night_start": night_start,
            "nightly": _night(parent, run),
            "started": datetime.fromtimestamp(run.info.start_time / 1000, UTC),
            "family": family,
            "category": tags.get(TAG_CATEGORY),
            "status": run.info.status,
        }
        for metric in metrics:
            row[metric] = run.data.metrics.get(metric)
        row.update(
            version=version,
            champion=CHAMPION in aliases,
            challenger=CHALLENGER in aliases,
            run_id=run.info.run_id,
            parent_run_id=parent_id,
        )
        rows.append(row)
    schema = {
        "_night_start": pl.Int64,
        "nightly": pl.String,
        "started": pl.Datetime("us", "UTC"),
        "family": pl.String,
        "category": pl.String,
        "status": pl.String,
        **{m: pl.Float64 for m in metrics},
        "version": pl.String,
        "champion": pl.Boolean,
        "challenger": pl.Boolean,
        "run_id": pl.String,
        "parent_run_id": pl.String,
    }
    frame = pl.DataFrame(rows, schema=schema)
    frame = pl.concat([frame, _category_means(frame, metrics)], how="vertical")
    # Newest night first; families in name order within a night, each family's categories in
    # name order after it, then their mean.
    order = pl.when(pl.col("category") == MEAN).then(1).otherwise(0).alias("_mean_last")
    return (
        frame.with_columns(order)
        .sort(
            ["_night_start", "family", "_mean_last", "category"],
            descending=[True, False, False, False],
            nulls_last=False,
        )
        .drop("_night_start", "_mean_last")
    )


MEAN = "mean"  # the category of the rows that average a family's categories


def _category_means(frame: pl.DataFrame, metrics: Sequence[str]) -> pl.DataFrame:
    """One row per night and family trained per category: each metric's mean over them."""
    per_category = frame.filter(pl.col("category").is_not_null())
    if per_category.height == 0:
        return frame.clear()
    means = per_category.group_by(["_night_start", "nightly", "family", "parent_run_id"]).agg(
        pl.col("started").min(),
        pl.lit(MEAN).alias("category"),
        pl.when(pl.col("status").eq("FINISHED").all())
        .then(pl.lit("FINISHED"))
        .otherwise(pl.lit("FAILED"))
        .alias("status"),
        *(pl.col(m).mean() for m in metrics),
        pl.lit(None, pl.String).alias("version"),
        pl.lit(False).alias("champion"),
        pl.lit(False).alias("challenger"),
        pl.lit(None, pl.String).alias("run_id"),
    )
    return means.select(frame.columns).cast(frame.schema)


def _model_key(tags: Mapping[str, str]) -> str:
    """The family part of a run's registered model name: `ae_l2`, or `ae_l2-bottle`."""
    family, category = tags[TAG_FAMILY], tags.get(TAG_CATEGORY)
    return family if category is None else f"{family}-{category}"


def latest_parent_run(client: MlflowClient, site: str) -> str | None:
    """The newest nightly parent run of the site, where `compare` logs by default."""
    experiment = client.get_experiment_by_name(experiment_name(site))
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_RUN_KIND}` = 'nightly'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def write_comparison(
    frame: pl.DataFrame, out_dir: Path, site: str, metrics: Sequence[str] = COMPARE_METRICS
) -> list[Path]:
    """`compare.csv` and `compare.png` in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "compare.csv"
    frame.write_csv(table)
    # The plot draws a line per family: a family trained per category is drawn by its mean.
    if "category" in frame.columns:
        frame = frame.filter(pl.col("category").is_null() | (pl.col("category") == MEAN))
    plot = comparison_plot(frame, metrics, out_dir / "compare.png", f"{site}: families by night")
    return [table, plot]


def log_comparison(
    logger: ArtifactLogger,
    parent_run: str,
    frame: pl.DataFrame,
    out_dir: Path,
    site: str,
    metrics: Sequence[str] = COMPARE_METRICS,
) -> list[Path]:
    """Write the table and plot, and log both under `comparison/` of the parent run."""
    paths = write_comparison(frame, out_dir, site, metrics)
    for path in paths:
        logger.log_artifact(parent_run, path, ARTIFACT_DIR)
    return paths


def _all_runs(client: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _model_versions(
    client: MlflowClient, site: str, families: set[str | None]
) -> dict[str, tuple[str, list[str]]]:
    """run id -> (model version, aliases) over the site's registered models."""
    out: dict[str, tuple[str, list[str]]] = {}
    for family in sorted(f for f in families if f):
        name = registered_model_name(site, family)
        try:
            found = client.search_model_versions(f"name = '{name}'")
            # Search results carry no aliases; the registered model has them all.
            aliases = dict(client.get_registered_model(name).aliases) if found else {}
        except MlflowException:  # no such model, or no registry behind this URI
            continue
        for version in found:
            if version.run_id:
                number = str(version.version)
                named = sorted(a for a, v in aliases.items() if str(v) == number)
                out[version.run_id] = (number, named)
    return out


def _night(parent: Any, run: Any) -> str:
    if parent is not None:
        return parent.data.tags.get("version") or parent.info.run_name or parent.info.run_id
    return run.data.tags.get("version") or run.info.run_name or run.info.run_id
