"""Evaluate one scored run and write what it found: the evaluate stage.

    evaluated = evaluate_scored_run(site, "ae_l2", slides_path, scores, layout.reports, model_dir)

Metrics come from `evaluate_site` (threshold from held-out normal slides); the per-slide table
(`slides.csv`), the metrics (`metrics.json`) and the ROC/FROC/PRO plots go under
`<reports>/<name>/`, and a model trained on this site gets the calibration it carries to new
slides (`calibration.json`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from vadflow.tasks.evaluation.calibration import Calibration, write_calibration
from vadflow.tasks.evaluation.evaluate import CandidateRule, evaluate_site, slide_threshold
from vadflow.tasks.evaluation.plots import evaluation_plots
from vadflow.tasks.exports.latest import run_folder, run_key
from vadflow.tasks.records import Evaluated, SlideResult, SlideScore
from vadflow.tasks.scoring.tail import TailReference, TailSettings, scored_tiles
from vadflow.tasks.site import SiteConfig


def evaluate_scored_run(
    site: SiteConfig,
    name: str,
    slides_path: str,
    scores: Sequence[SlideScore],
    reports_dir: str | Path,
    model_dir: str | None = None,
    model_threshold: float | None = None,
    masks_dir: str | None = None,
    labelled: bool = False,
) -> Evaluated:
    """Metrics, plots and the slide table of run `name` under `reports_dir/name`.

    `model_dir` (a model trained on this site) gets this evaluation's calibration written beside
    it; `model_threshold` (a model calibrated before, perhaps at another site) adds the calls
    made at that threshold to the metrics. `masks_dir` holds the tissue masks the scored
    share of a pathology site is measured against. `labelled`: the model learned from lesion
    labels (the `auto` slide score is then the maximum).
    """
    slides = pl.read_parquet(slides_path)
    aggregation = site.aggregation
    tail = TailSettings.of_site(site)
    evaluation = evaluate_site(
        slides,
        {s.slide_id: (s.slide_score, s.heatmap) for s in scores},
        site.tiling.heatmap_downsample,
        site.target_fpr,
        site.domain,
        itc_um=site.froc_itc_um,
        model_threshold=model_threshold,
        candidate_rule=CandidateRule(
            site.candidates.suppress_um, site.candidates.max_per_slide, site.qc.keep_artefacts
        ),
        masks_dir=masks_dir,
        slide_score=aggregation.slide_score,
        labelled=labelled,
        tile_scores={s.slide_id: s.tile_scores for s in scores},
        tail=tail,
    )
    # The run's own folder; the export publishes it as reports/<name> (tasks/exports/latest.py).
    folder = run_folder(reports_dir, name, run_key(name, scores))
    folder.mkdir(parents=True, exist_ok=True)
    evaluation.table.write_csv(folder / "slides.csv")
    metrics = {**evaluation.metrics, **evaluation.froc_points}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots = evaluation_plots(evaluation, folder, f"{site.name} / {name}")
    calibration = _calibration(evaluation, site, slides, scores, tail)
    # The run's own copy: its exports read their probabilities and prediction level from it.
    write_calibration(folder, calibration)
    if model_dir is not None:
        # The threshold travels with the model: scoring new slides predicts with it.
        write_calibration(model_dir, calibration)
    return Evaluated(
        name=name,
        metrics=dict(evaluation.metrics),
        froc_points=dict(evaluation.froc_points),
        threshold=evaluation.threshold,
        value_range=(float(evaluation.value_range[0]), float(evaluation.value_range[1])),
        table=slide_results(evaluation.table),
        report_dir=str(folder),
        plots=plots,
        candidates=dict(evaluation.candidates),
        slide_scores=dict(evaluation.slide_scores),
    )


def _calibration(
    evaluation, site: SiteConfig, slides: pl.DataFrame, scores, tail: TailSettings
) -> Calibration:
    """What the model carries to new slides. A forest cannot score them (it is refitted per
    evaluation, on labels new slides lack), so a forest run hands on the threshold of the
    heatmap maximum, on which new slides are then called. Whatever the slide score, the
    model carries the tail reference of its normal validation tiles: the exports' raw score ->
    anomaly probability."""
    reference = evaluation.tail_reference or _normal_tile_reference(slides, scores, tail)
    if evaluation.slide_score == "forest":
        val = set(slides.filter(pl.col("split") == "val")["slide_id"])
        threshold = slide_threshold(
            [s.slide_score for s in scores if s.slide_id in val], site.target_fpr
        )
        return Calibration(
            threshold, site.target_fpr, evaluation.value_range, "max", tail_reference=reference
        )
    return Calibration(
        evaluation.threshold,
        site.target_fpr,
        evaluation.value_range,
        slide_score=evaluation.slide_score,
        tail_reference=reference,
        alpha=tail.alpha,
        keep_artefacts=tail.keep_artefacts,
    )


def _normal_tile_reference(
    slides: pl.DataFrame, scores: Sequence[SlideScore], tail: TailSettings
) -> TailReference | None:
    """The tail reference of the run's normal validation tiles (None without any)."""
    val = set(slides.filter(pl.col("split") == "val")["slide_id"])
    frames = [
        scored_tiles(pl.read_parquet(s.tile_scores), tail.keep_artefacts)["score"].to_numpy()
        for s in scores
        if s.slide_id in val
    ]
    values = np.concatenate(frames) if frames else np.zeros(0)
    return TailReference.fit(values) if values.size else None


def slide_results(table: pl.DataFrame) -> tuple[SlideResult, ...]:
    """The rows of an evaluation's slide table as records."""
    return tuple(
        SlideResult(
            slide_id=r["slide_id"],
            split=r["split"],
            label=r["label"],
            category=r["category"],
            score=r["score"],
            predicted=r["predicted"],
        )
        for r in table.iter_rows(named=True)
    )
