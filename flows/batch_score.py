"""Batch scoring: a trained detector scores a site's slides; nothing is trained.

Used for one-off GPU batch runs (`vadflow batch`) and scheduled scoring of new slides. The
model is a detector folder or an MLflow model URI; by default the site's registered champion.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows.ingest import ingest
from flows.nightly import resolve_site, state_home
from tasks.prefect_tasks import evaluate_task, export_task, resolve_model_task, score_task
from tasks.site import SiteConfig, SiteLayout
from tasks.tracking.mlflow_runs import resolve_tracking_uri


@flow(name="batch-score", log_prints=True)
def batch_score(
    site_dir: str | None = None,
    site: SiteConfig | None = None,
    model: str = "champion",
    family: str | None = None,
    output_root: str | None = None,
    tracking_uri: str | None = None,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    """Score every tiled slide of the given splits (default: test) with one model."""
    logger = get_run_logger()
    site = resolve_site(site, site_dir)
    family = family or site.families[0]
    layout = SiteLayout(output_root or state_home() / "outputs", site.name)
    tracking_uri = resolve_tracking_uri(tracking_uri, state_home())
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")

    data = ingest(site, layout, f"batch-{version}")
    model_dir = resolve_model_task(model, site.name, family, tracking_uri, str(layout.root))
    to_score = data.scorable(tuple(splits or ["val", "test"]))
    scores = score_task.map(
        unmapped(model_dir),
        to_score,
        [data.manifest_of(r["slide_id"]) for r in to_score],
        out_dir=unmapped(str(layout.heatmaps(f"batch-{family}-{version}"))),
        heatmap_downsample=unmapped(site.tiling.heatmap_downsample),
    ).result()
    evaluation = evaluate_task(site, f"batch-{family}", data.slides_path, scores, layout)
    exported = export_task(f"batch-{family}", data.slides_path, scores, evaluation, layout)
    logger.info("scored %d slides with %s; overlays in %s", len(scores), model, layout.exports)
    return {
        "site": site.name,
        "model": model,
        "model_dir": model_dir,
        "scores": [s.__dict__ for s in scores],
        "metrics": evaluation["metrics"],
        "table": evaluation["table"],
        "exports": exported,
        "quarantined": data.quarantined,
    }
