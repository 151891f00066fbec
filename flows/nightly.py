"""The nightly flow: from a site's slides to scored heatmaps, metrics and a logged model.

discover -> register -> mask + tile -> validate -> train (per family) -> score -> aggregate
-> evaluate -> track (MLflow) -> export. Orchestration only: every step is a task in `tasks/`.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from vadflow.flows.ingest import ingest
from vadflow.tasks.prefect_tasks import (
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
from vadflow.tasks.site import SiteConfig, SiteLayout, load_site
from vadflow.tasks.tracking.mlflow_runs import (
    default_artifact_root,
    default_spool_dir,
    manifest_hashes,
    resolve_tracking_uri,
    run_tags,
)
from vadflow.tasks.validation import report_folder


def resolve_site(site: SiteConfig | None, site_dir: str | None) -> SiteConfig:
    """A deployment passes the validated site; the CLI passes a folder with its site.yaml."""
    if site is not None:
        return site
    if site_dir is None:
        raise ValueError("give either `site` (a site configuration) or `site_dir` (a folder)")
    return load_site(site_dir)


def state_home() -> Path:
    return Path(os.environ.get("VADFLOW_HOME", ".vadflow"))


@flow(name="nightly", log_prints=True)
def nightly(
    site_dir: str | None = None,
    site: SiteConfig | None = None,
    output_root: str | None = None,
    tracking_uri: str | None = None,
    families: list[str] | None = None,
    detector_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Retrain, evaluate, track and gate every configured detector family on one site."""
    logger = get_run_logger()
    site = resolve_site(site, site_dir)
    if families:
        site = site.model_copy(update={"families": families})
    if detector_overrides:
        site = site.model_copy(update={"detectors": {**site.detectors, **detector_overrides}})
    home = state_home()
    layout = SiteLayout(output_root or home / "outputs", site.name)
    tracking_uri = resolve_tracking_uri(tracking_uri, home)
    spool_dir = str(default_spool_dir(home))
    artifact_root = default_artifact_root(tracking_uri, home)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    contracts = str(report_folder(layout.reports, version))

    data = ingest(site, layout, version)
    to_score = data.scorable(("val", "test"))
    tags = _run_tags(site, version, data.slides_path, data.tile_paths)
    parent = start_tracking_task(
        tracking_uri, spool_dir, site, str(artifact_root) if artifact_root else None, tags
    )
    summary: dict[str, Any] = {"site": site.name, "version": version, "families": {}}
    for family in site.families:
        model_dir = layout.model_dir(family, version)
        fit = train_task(family, site, data.slides_path, data.tile_paths, str(model_dir))
        if fit.get("skipped"):  # a labelled family on a site without those labels
            summary.setdefault("skipped", {})[family] = fit["skipped"]
            continue
        scores = score_task.map(
            unmapped(str(model_dir)),
            to_score,
            [data.manifest_of(r["slide_id"]) for r in to_score],
            out_dir=unmapped(str(layout.heatmaps(f"{family}-{version}"))),
            heatmap_downsample=unmapped(site.tiling.heatmap_downsample),
        ).result()
        checked = validate_scores_task(
            family, scores, data.slides_path, data.tile_paths, site, layout, version
        )
        scores = [s for s in scores if s.slide_id not in set(checked.quarantined_ids)]
        evaluation = evaluate_task(site, family, data.slides_path, scores, layout, str(model_dir))
        validate_metrics_task(family, evaluation, site, layout, version)
        overlays = export_task(family, data.slides_path, scores, evaluation, layout)
        tracked = track_task(
            tracking_uri,
            spool_dir,
            parent,
            site,
            data.slides_path,
            fit,
            evaluation,
            overlays,
            tags,
            contracts_passed=not (data.checked.quarantined or checked.quarantined),
        )
        summary["families"][family] = {
            "metrics": evaluation["metrics"],
            "table": evaluation["table"],
            "overlays": str(layout.exports / family),
            "report": str(Path(evaluation["report_dir"]) / "report.html"),
            "model_dir": str(model_dir),
            "diverged": bool(fit["report"].get("diverged")),
            "mlflow_run_id": tracked["run_id"],
            "promotion": tracked["decision"],
            "spooled": tracked["spooled"],
        }
        logger.info("%s: %s", family, _metric_line(evaluation["metrics"]))
    finish_tracking_task(
        tracking_uri,
        spool_dir,
        parent,
        site,
        {f: v["metrics"] for f, v in summary["families"].items()},
        layout,
        contracts,
    )
    summary.update(
        outputs=str(layout.root),
        quarantined=data.quarantined,
        no_tissue=data.no_tissue,
        contracts_report=contracts,
        tracking_uri=tracking_uri,
        parent_run_id=parent,
    )
    create_markdown_artifact(_markdown(summary), key=f"nightly-{site.name}")
    return summary


def _run_tags(
    site: SiteConfig, version: str, slides_path: str, tile_paths: list[str]
) -> dict[str, str]:
    return run_tags(
        site.name,
        git_commit=_git_commit(),
        flow_run_id=str(flow_run.get_id() or ""),
        manifest_hashes=manifest_hashes(slides_path, tile_paths),
        contracts_passed=True,  # the manifest contracts raised otherwise (strict mode)
        extra={"domain": site.domain, "version": version},
    )


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _metric_line(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))


def _markdown(summary: dict[str, Any]) -> str:
    lines = [f"# nightly {summary['site']} {summary['version']}", ""]
    lines += ["| family | metric | value |", "| --- | --- | --- |"]
    for family, result in summary["families"].items():
        for key, value in result["metrics"].items():
            lines.append(f"| {family} | {key} | {value:.4f} |")
    if summary["quarantined"]:
        lines += ["", "## quarantined", ""]
        lines += [f"- {q['slide_id']}: {q['reason']}" for q in summary["quarantined"]]
    return "\n".join(lines)
