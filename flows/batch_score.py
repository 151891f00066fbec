"""Batch scoring: a trained detector scores a site's slides; nothing is trained.

Used for one-off GPU batch runs (`vadflow batch`), `vadflow evaluate` (with metrics) and
`vadflow score` (new slides, perhaps unlabelled: no metrics, predictions at the threshold the
model was calibrated with). The model is a detector folder or an MLflow model URI; by default
the site's registered champion. Each run's heatmaps folder holds `scored.json`, from which
`vadflow export` redraws the exports without rescoring.

resolve model -> discover -> register -> mask + tile -> validate -> score -> [evaluate] -> export
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from vadflow.flows.ingest import ingest
from vadflow.flows.nightly import resolve_site, score_slides, state_home
from vadflow.tasks.evaluation.calibration import read_calibration
from vadflow.tasks.pipeline import evaluate_task, export_task, resolve_model_task
from vadflow.tasks.records import BatchScoreSummary
from vadflow.tasks.runs import run_version, site_lock
from vadflow.tasks.site import SiteConfig, SiteLayout
from vadflow.tasks.tracking.mlflow_runs import resolve_tracking_uri


@flow(name="batch-score", log_prints=True)
def batch_score(
    site_dir: str | None = None,
    site: SiteConfig | None = None,
    model: str = "champion",
    family: str | None = None,
    output_root: str | None = None,
    tracking_uri: str | None = None,
    splits: list[str] | None = None,
    metrics: bool = True,
) -> BatchScoreSummary:
    """Score every tiled slide of the given splits (default: val and test) with one model.

    With `metrics` the slides are evaluated against their labels (threshold from this site's
    held-out normals, and the calls at the model's own calibrated threshold beside them);
    without, nothing is evaluated and predictions use the model's own calibrated threshold.
    """
    site = resolve_site(site, site_dir)
    layout = SiteLayout(output_root or state_home() / "outputs", site.name)
    tracking_uri = resolve_tracking_uri(tracking_uri, state_home())
    kind = "batch" if metrics else "score"
    version = run_version()
    # It writes the site's manifests as a nightly does: one run of a site at a time.
    with site_lock(state_home(), site.name, f"{kind}-{version}"):
        return _score(site, family, layout, model, tracking_uri, kind, version, splits, metrics)


def _score(
    site: SiteConfig,
    family: str | None,
    layout: SiteLayout,
    model: str,
    tracking_uri: str,
    kind: str,
    version: str,
    splits: list[str] | None,
    metrics: bool,
) -> BatchScoreSummary:
    """The scoring stages, run under the site's lock."""
    from vadflow.tasks.detectors.base import read_config  # here: a flow's import loads no torch

    logger = get_run_logger()
    # Only a champion is looked up by family (`family`, else the site's first); a folder or
    # a models:/ URI is whatever family it was trained as, and the run is named after that.
    model_dir = resolve_model_task(
        model, site.name, family or site.families[0], tracking_uri, str(layout.root)
    )
    family = read_config(Path(model_dir))["family"]
    run = f"{kind}-{family}"
    data = ingest(site, layout, f"{run}-{version}")
    to_score = data.scorable(tuple(splits or ["val", "test"]))
    scores = score_slides(
        site,
        model_dir,
        to_score,
        [data.manifest_of(r["slide_id"]) for r in to_score],
        str(layout.heatmaps(f"{run}-{version}")),
    )
    evaluated = None
    if metrics:
        calibration = read_calibration(model_dir)
        threshold = calibration.threshold if calibration and calibration.calibrated else None
        evaluated = evaluate_task(
            site, run, data.slides_path, scores, layout, model_threshold=threshold, family=family
        )
    exported = export_task(
        run,
        data.slides_path,
        scores,
        evaluated,
        layout,
        site.domain,
        model,
        model_dir,
        candidates=site.candidates,
        keep_artefacts=site.qc.keep_artefacts,
    )
    logger.info("scored %d slides with %s; overlays in %s", len(scores), model, layout.exports)
    return BatchScoreSummary(
        site=site.name,
        model=model,
        model_dir=model_dir,
        scores=tuple(scores),
        metrics=evaluated.metrics if evaluated else {},
        table=evaluated.table if evaluated else (),
        exports=exported.overlays,
        record=exported.scored_run,
        quarantined=data.quarantined,
        no_tissue=data.no_tissue,
        gaps=data.gaps if metrics else type(data.gaps)(),  # without metrics, labels are moot
    )
