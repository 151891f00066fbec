"""Export one scored run: the export stage.

    exported = export_scored_run(layout, "ae_l2", slides_path, scores, evaluation=evaluated)

Overlays on one colour scale, lesion files and the HTML report (`render_exports`), at a
threshold from one of two places: the evaluation's (this run's held-out normal slides) or,
without an evaluation (new slides, no metrics), the model's own calibration. The inputs are
saved beside the heatmaps (`scored.json`) so `vadflow export` can redraw them later.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vadflow.tasks.evaluation.calibration import Calibration, read_calibration
from vadflow.tasks.evaluation.evaluate import heatmap_value_range
from vadflow.tasks.exports.latest import publish_latest, run_folder, run_key
from vadflow.tasks.exports.probability import prediction_cut
from vadflow.tasks.exports.render import (
    SCORED_RUN_FILE,
    ScoredRun,
    render_exports,
    save_scored_run,
)
from vadflow.tasks.records import Candidate, Evaluated, Exported, SlideScore
from vadflow.tasks.scoring.heatmap import load_heatmap
from vadflow.tasks.site import CandidatesConfig, SiteLayout
from vadflow.tasks.tiling.qc import QC_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Threshold:
    """The threshold a run is exported at, where it came from, and what goes with it."""

    value: float
    source: str
    value_range: tuple[float, float]
    report_dir: str
    metrics: dict[str, float]
    plots: dict[str, str]
    candidates: dict[str, list[Candidate]]
    calibration: Calibration | None = None  # its slide score kind and tail reference


def _from_evaluation(evaluation: Evaluated) -> _Threshold:
    # Evaluation wrote the run's calibration into its report folder: the tail reference and
    # which slide score its threshold is on (a forest's calibration is the maximum's).
    return _Threshold(
        evaluation.threshold,
        "from held-out normal slides",
        evaluation.value_range,
        evaluation.report_dir,
        evaluation.all_metrics,
        evaluation.plots,
        evaluation.candidates,
        read_calibration(evaluation.report_dir),
    )


def _from_model(
    model_dir: str | None,
    model: str,
    scores: Sequence[SlideScore],
    report_dir: str,
    logger: logging.Logger | logging.LoggerAdapter,
) -> _Threshold:
    calibration = read_calibration(model_dir) if model_dir else None
    if calibration is None:
        logger.warning("model %s has no calibration.json: slides are scored, not called", model)
        value_range = heatmap_value_range([load_heatmap(s.heatmap) for s in scores])
        return _Threshold(math.nan, "none", value_range, report_dir, {}, {}, {})
    source = f"the model's calibration, target FPR {calibration.target_fpr:g}"
    return _Threshold(
        calibration.threshold,
        source,
        calibration.heatmap_value_range,
        report_dir,
        {},
        {},
        {},
        calibration,
    )


def _calibration_fields(calibration: Calibration | None) -> dict:
    """What a ScoredRun keeps of a calibration beyond its threshold: the slide score kind,
    the prediction level and the tail reference (`tasks/exports/probability.py`)."""
    if calibration is None:
        return {}
    reference = calibration.tail_reference
    return {
        "slide_score": calibration.slide_score,
        "prediction_level": prediction_cut(
            calibration.slide_score, calibration.threshold, reference, calibration.alpha
        ),
        "tail_reference": None if reference is None else reference.to_dict(),
        "alpha": calibration.alpha,
    }


def export_scored_run(
    layout: SiteLayout,
    name: str,
    slides_path: str,
    scores: Sequence[SlideScore],
    evaluation: Evaluated | None = None,
    *,
    domain: str | None = None,
    model: str = "",
    model_dir: str | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
    render: bool = True,
    candidates: CandidatesConfig | None = None,
    keep_artefacts: bool = False,
) -> Exported:
    """What people open for run `name`: overlays, lesion files and the report.

    Lesion candidates go to the slides evaluation computed them for and, on a
    `domain="pathology"` site, to every slide (by evaluation's own rule, the site's
    `candidates` setting). Without `render` only the run's `scored.json` is saved (nothing is
    drawn): `vadflow export` draws it all later, exactly as it would have been now.
    """
    # Written into the run's own folders, published as exports/<name> and reports/<name> only
    # when complete (tasks/exports/latest.py).
    key = run_key(name, scores)
    exports_dir = str(run_folder(layout.exports, name, key))
    reports_dir = str(run_folder(layout.reports, name, key))
    if not scores:
        return Exported(name, exports_dir, report=str(Path(reports_dir) / "report.html"))
    if evaluation is not None:
        chosen = _from_evaluation(evaluation)
        # The evaluation's threshold is on its slide score (aggregation.slide_score): call
        # each slide with that score, not the heatmap maximum scoring left in the record.
        scores = [
            replace(s, slide_score=evaluation.slide_scores.get(s.slide_id, s.slide_score))
            for s in scores
        ]
    else:
        chosen = _from_model(model_dir, model, scores, reports_dir, logger)
    everyone = domain == "pathology"
    rule = candidates or CandidatesConfig()
    run = ScoredRun(
        site=layout.site,
        name=name,
        model=model,
        slides_path=slides_path,
        scores=tuple(scores),
        calibrated_threshold=chosen.value,
        threshold_source=chosen.source,
        value_range=chosen.value_range,
        exports_dir=exports_dir,
        report_dir=chosen.report_dir,
        candidate_slides=tuple(
            s.slide_id for s in scores if everyone or s.slide_id in chosen.candidates
        ),
        suppress_um=rule.suppress_um,
        max_candidates=rule.max_per_slide,
        qc_dir="" if keep_artefacts else str(layout.masks / QC_DIR),
        metrics=chosen.metrics,
        plots=chosen.plots,
        **_calibration_fields(chosen.calibration),
    )
    if not render:
        record = save_scored_run(run)
        if Path(reports_dir).is_dir():  # the evaluation's metrics and plots: complete
            publish_latest(layout.reports, name, key)
        logger.info("%s: exports skipped; `vadflow export %s` draws them", name, record.parent)
        return Exported(name, exports_dir, report="", scored_run=str(record))
    rendered = render_exports(run, candidates=chosen.candidates)
    publish_latest(layout.exports, name, key)
    publish_latest(layout.reports, name, key)
    return Exported(
        name=name,
        exports_dir=exports_dir,
        report=str(rendered.report),
        overlays=tuple(s.overlay for s in rendered.exported),
        scored_run=str(rendered.heatmap_dir / SCORED_RUN_FILE),
    )
