"""The nightly flow: from a site's slides to scored heatmaps, metrics and a logged model.

discover -> register -> mask + tile -> validate -> train (per family) -> score -> validate
-> evaluate -> validate -> export -> track (MLflow, champion gate). Orchestration only: each
step is a task of `tasks/pipeline/`, one call of its stage.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from vadflow.flows.ingest import ingest
from vadflow.tasks.pipeline import (
    evaluate_task,
    export_task,
    finish_tracking_task,
    score_task,
    start_tracking_task,
    track_task,
    train_task,
    validate_metrics_task,
    validate_scores_task,
)
from vadflow.tasks.records import FamilyResult, NightlySummary, SkippedFamily
from vadflow.tasks.site import SiteConfig, SiteLayout, load_site
from vadflow.tasks.tracking.mlflow_runs import tracking_target
from vadflow.tasks.tracking.nightly import nightly_tags, summary_markdown
from vadflow.tasks.validation import report_folder


def resolve_site(site: SiteConfig | None, site_dir: str | None) -> SiteConfig:
    """A deployment passes the validated site; the CLI passes a folder with its site.yaml."""
    if site is not None:
        return site
    if site_dir is None:
        raise ValueError("give either `site` (a site configuration) or `site_dir` (a folder)")
    return load_site(site_dir)


def state_home() -> Path:
    """The state folder: `$VADFLOW_HOME`, else `./.vadflow`."""
    return Path(os.environ.get("VADFLOW_HOME", ".vadflow"))


@flow(name="nightly", log_prints=True)
def nightly(
    site_dir: str | None = None,
    site: SiteConfig | None = None,
    output_root: str | None = None,
    tracking_uri: str | None = None,
    families: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> NightlySummary:
    """Retrain, evaluate, track and gate every configured detector family on one site.

    `flags` are detector settings from the command line (e.g. `{"epochs": 3}`), applied to
    every family whose config has the field, over the site file's `detectors:` entries.
    """
    logger = get_run_logger()
    site = resolve_site(site, site_dir)
    if families:
        site = site.model_copy(update={"families": families})
    home = state_home()
    layout = SiteLayout(output_root or home / "outputs", site.name)
    target = tracking_target(tracking_uri, home)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    contracts = str(report_folder(layout.reports, version))

    data = ingest(site, layout, version)
    to_score = data.scorable(("val", "test"))
    tags = nightly_tags(
        site, version, data.slides_path, data.tile_paths, str(flow_run.get_id() or "")
    )
    parent = start_tracking_task(target, site, version, tags)
    results: dict[str, FamilyResult] = {}
    skipped: dict[str, str] = {}
    for family in site.families:
        model_dir = str(layout.model_dir(family, version))
        trained = train_task(family, site, data.slides_path, data.tile_paths, model_dir, flags)
        if isinstance(trained, SkippedFamily):  # a labelled family on a site without labels
            skipped[family] = trained.reason
            continue
        scores = score_task.map(
            unmapped(model_dir),
            to_score,
            [data.manifest_of(r["slide_id"]) for r in to_score],
            out_dir=unmapped(str(layout.heatmaps(f"{family}-{version}"))),
            heatmap_downsample=unmapped(site.tiling.heatmap_downsample),
        ).result()
        checked = validate_scores_task(
            family, scores, data.slides_path, data.tile_paths, site, layout, version
        )
        scores = [s for s in scores if s.slide_id not in set(checked.quarantined_ids)]
        evaluated = evaluate_task(site, family, data.slides_path, scores, layout, model_dir)
        validate_metrics_task(family, evaluated, site, layout, version)
        exported = export_task(family, data.slides_path, scores, evaluated, layout)
        tracked = track_task(
            target,
            parent,
            site,
            data.slides_path,
            trained,
            evaluated,
            list(exported.overlays),
            tags,
            contracts_passed=not (data.contracts_quarantined or checked.quarantined),
        )
        results[family] = FamilyResult.of(trained, evaluated, exported, tracked)
        logger.info("%s: %s", family, _metric_line(evaluated.metrics))
    finish_tracking_task(
        target,
        parent,
        site.name,
        {f: r.metrics for f, r in results.items()},
        str(layout.reports / "comparison"),
        contracts,
    )
    summary = NightlySummary(
        site=site.name,
        version=version,
        families=results,
        skipped=skipped,
        outputs=str(layout.root),
        quarantined=data.quarantined,
        no_tissue=data.no_tissue,
        contracts_report=contracts,
        tracking_uri=target.tracking_uri,
        parent_run_id=parent,
    )
    create_markdown_artifact(summary_markdown(summary), key=f"nightly-{site.name}")
    return summary


def _metric_line(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
