"""The nightly flow: from a site's slides to scored heatmaps, metrics and a logged model.

discover -> register -> mask + tile -> validate -> per family (and per category on an
industrial site with several): train -> score -> validate -> evaluate -> validate; then
export every scored run (after all families, so exports never hold up training) -> track
(MLflow, champion gate). Orchestration only: each step is a task of `tasks/pipeline/`, one call
of its stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from vadflow.flows.ingest import category_groups, ingest
from vadflow.tasks.pipeline import (
    end_family_run_task,
    evaluate_task,
    export_task,
    finish_tracking_task,
    open_family_run_task,
    score_site_task,
    score_task,
    start_tracking_task,
    track_task,
    train_task,
    validate_metrics_task,
    validate_scores_task,
)
from vadflow.tasks.records import (
    CategoryGroup,
    Evaluated,
    Exported,
    FamilyResult,
    NightlySummary,
    SkippedFamily,
    SlideScore,
    TrackingTarget,
    TrainedModel,
)
from vadflow.tasks.runs import run_version, site_lock
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


@dataclass(frozen=True)
class _Scored:
    """One trained and evaluated model of the night, waiting for export and tracking."""

    family: str
    group: CategoryGroup
    trained: TrainedModel
    scores: list[SlideScore]
    evaluated: Evaluated
    contracts_passed: bool
    run_id: str  # its MLflow child run, open since before training


def _end_night_runs(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect hook: a night that failed (FAILED), crashed or was cancelled (SIGTERM, Ctrl-C:
    KILLED) leaves no MLflow run RUNNING (`tasks/tracking/lifecycle.py`)."""
    from vadflow.tasks.tracking.lifecycle import end_flow_runs

    params = flow_run.parameters or {}
    given = params.get("site")
    name = given.get("name") if isinstance(given, dict) else getattr(given, "name", None)
    if name is None and params.get("site_dir"):
        name = load_site(params["site_dir"]).name
    if name is None:
        return
    status = "FAILED" if state.is_failed() else "KILLED"
    target = tracking_target(params.get("tracking_uri"), state_home())
    reason = f"the flow run ended {state.name}: {state.message or ''}".strip()
    end_flow_runs(target.tracking_uri, name, str(flow_run.id), status, reason)


@flow(
    name="nightly",
    log_prints=True,
    on_failure=[_end_night_runs],
    on_crashed=[_end_night_runs],
    on_cancellation=[_end_night_runs],
)
def nightly(
    site_dir: str | None = None,
    site: SiteConfig | None = None,
    output_root: str | None = None,
    tracking_uri: str | None = None,
    families: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    export: bool = True,
    force: bool = False,
) -> NightlySummary:
    """Retrain, evaluate, track and gate every configured detector family on one site.

    `flags` are detector settings from the command line (e.g. `{"epochs": 3}`), applied to
    every family whose config has the field, over the site file's `detectors:` entries.
    An industrial site with several categories gets one model per category and family, each
    trained on its category's good training images only. Without `export` no overlay or
    lesion file is drawn (the run's `scored.json` is saved, so `vadflow export` draws them).

    A night costs what changed: unchanged slides are not hashed or opened again, unchanged
    manifests not re-checked, a family whose training manifests, config and code are unchanged
    is not retrained (its earlier model is reused) and only new or changed slides are scored
    with it. `force` redoes everything.
    """
    site = resolve_site(site, site_dir)
    if families:
        site = site.model_copy(update={"families": families})
    home = state_home()
    layout = SiteLayout(output_root or home / "outputs", site.name)
    target = tracking_target(tracking_uri, home)
    version = run_version()
    # One run of a site at a time: a second fails at once, naming the first (tasks/runs.py).
    with site_lock(home, site.name, version):
        return _night(site, layout, target, version, flags, export, force)


def _night(
    site: SiteConfig,
    layout: SiteLayout,
    target: TrackingTarget,
    version: str,
    flags: dict[str, Any] | None,
    export: bool,
    force: bool = False,
) -> NightlySummary:
    """The night's stages, run under the site's lock."""
    logger = get_run_logger()
    contracts = str(report_folder(layout.reports, version))

    data = ingest(site, layout, version, train=True, force=force)
    for line in data.gaps.lines("images" if site.domain == "industrial" else "slides"):
        logger.warning("%s: %s", site.name, line)
    groups = category_groups(site, data)
    if groups[0].name is not None:
        logger.info("%d categories, one model each: %s", len(groups), [g.name for g in groups])
    to_score = data.scorable(("val", "test"))
    tags = nightly_tags(
        site, version, data.slides_path, data.tile_paths, str(flow_run.get_id() or "")
    )
    parent = start_tracking_task(target, site, version, tags, str(layout.root))
    scored: list[_Scored] = []
    skipped: dict[str, str] = {}
    for family in site.families:
        for group in groups:
            name = group.label(family)
            model_dir = _in_group(layout.model_dir(family, version), group)
            # The child run opens now and ends in track_task: it spans training and scoring.
            child = open_family_run_task(target, parent, site, family, tags, group.name)
            trained = train_task(
                family, site, data.slides_path, list(group.tile_paths), model_dir, flags, force
            )
            if isinstance(trained, SkippedFamily):  # a labelled family on a site without labels
                skipped[family] = trained.reason
                end_family_run_task(target, child, f"skipped: {trained.reason}")
                break
            model_dir = trained.model_dir  # an unchanged family's earlier folder
            rows = [r for r in to_score if r["slide_id"] in set(group.slide_ids)]
            scores = score_slides(
                site,
                model_dir,
                rows,
                [data.manifest_of(r["slide_id"]) for r in rows],
                _in_group(layout.heatmaps(f"{family}-{version}"), group),
                reuse=not force,
            )
            checked = validate_scores_task(
                name, scores, data.slides_path, list(group.tile_paths), site, layout, version
            )
            scores = [s for s in scores if s.slide_id not in set(checked.quarantined_ids)]
            evaluated = evaluate_task(
                site, name, data.slides_path, scores, layout, model_dir, family=family
            )
            validate_metrics_task(name, evaluated, site, layout, version)
            passed = not (data.contracts_quarantined or checked.quarantined)
            scored.append(_Scored(family, group, trained, scores, evaluated, passed, child))
            logger.info("%s: %s", name, _metric_line(evaluated.metrics))

    # Exports after every family is scored: drawing them never delays the next family's model.
    exported: dict[str, Exported] = {}
    for run in scored:
        name = run.group.label(run.family)
        exported[name] = export_task(
            name,
            data.slides_path,
            run.scores,
            run.evaluated,
            layout,
            render=export,
            candidates=site.candidates,
            keep_artefacts=site.qc.keep_artefacts,
        )

    results: dict[str, FamilyResult] = {}
    parts: dict[str, dict[str, tuple]] = {}
    for run in scored:
        name = run.group.label(run.family)
        tracked = track_task(
            target,
            parent,
            site,
            data.slides_path,
            run.trained,
            run.evaluated,
            list(exported[name].overlays),
            tags,
            contracts_passed=run.contracts_passed,
            category=run.group.name,
            run_id=run.run_id,
        )
        if run.group.name is None:
            results[run.family] = FamilyResult.of(
                run.trained, run.evaluated, exported[name], tracked
            )
        else:
            parts.setdefault(run.family, {})[run.group.name] = (
                run.trained,
                run.evaluated,
                exported[name],
                tracked,
            )
    for family, per_category in parts.items():
        results[family] = FamilyResult.of_categories(
            family,
            per_category,
            exports_dir=str(layout.exports / family),
            model_dir=str(layout.model_dir(family, version)),
        )
        logger.info(
            "%s (mean of %d categories): %s",
            family,
            len(per_category),
            _metric_line(results[family].metrics),
        )
    finish_tracking_task(
        target,
        parent,
        site.name,
        _parent_metrics(results),
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
        gaps=data.gaps,
        exported=export,
    )
    create_markdown_artifact(summary_markdown(summary), key=f"nightly-{site.name}")
    return summary


def score_slides(
    site: SiteConfig,
    model_dir: str,
    rows: list[dict[str, Any]],
    tiles_paths: list[str],
    out_dir: str,
    reuse: bool = False,
) -> list[SlideScore]:
    """Score `rows` with one model where the site's `parallel` setting says: one task on its
    Dask cluster for the `dask` backend, else one mapped task per slide in this process."""
    if site.parallel.backend == "dask" and rows:
        return score_site_task(
            site.parallel,
            model_dir,
            rows,
            tiles_paths,
            out_dir,
            site.tiling.heatmap_downsample,
            reuse=reuse,
        )
    return score_task.map(
        unmapped(model_dir),
        rows,
        tiles_paths,
        out_dir=unmapped(out_dir),
        heatmap_downsample=unmapped(site.tiling.heatmap_downsample),
        slides_in_run=unmapped(len(rows)),
        reuse=unmapped(reuse),
    ).result()


def _in_group(folder: Path, group: CategoryGroup) -> str:
    """A family's folder, or its category's subfolder when the site is trained per category."""
    return str(folder if group.name is None else folder / group.name)


def _parent_metrics(results: dict[str, FamilyResult]) -> dict[str, dict[str, float]]:
    """What the night's parent run logs per family: its metrics (the mean over categories
    where there are several) and each category's under `<category>.<metric>`."""
    out: dict[str, dict[str, float]] = {}
    for family, result in results.items():
        metrics = dict(result.metrics)
        for name, category in result.categories.items():
            metrics |= {f"{name}.{k}": v for k, v in category.metrics.items()}
        out[family] = metrics
    return out


def _metric_line(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
