"""Render every export of a scored run, and again later without rescoring.

A *scored run* is one model's heatmaps over a site's slides. Rendering turns them into what
people open, per slide: the overlay PNG (colour map, alpha, colour bar), lesion candidates as
Camelyon16 CSV, QuPath GeoJSON (points and regions above the threshold) and ASAP XML; then the
run's HTML report. The inputs are saved beside the heatmaps as `scored.json`, so
`vadflow export` can redraw everything from the files alone: another colour map or alpha, or
another threshold (regions, predictions), with the slides' heatmaps untouched.

Lesion candidates are the heatmap's local maxima above the run's normal floor (the low end of
its value range), one per `suppress_um` neighbourhood and at most `max_candidates` per slide
(the site's `candidates:` setting, saved in `scored.json`), as evaluation computes them for
FROC, so the same candidates come out whether or not the slide had annotations to evaluate
against, and again on every re-render.

Slides are rendered in parallel threads (reading, resizing and PNG encoding release the GIL);
an overlay is drawn from the heatmap TIFF's pyramid level nearest the overlay's size and a
slide thumbnail at that scale, never from the full-resolution heatmap.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib import colormaps
from PIL import Image

from vadflow.tasks.evaluation.camelyon import write_camelyon_csv
from vadflow.tasks.evaluation.evaluate import CandidateRule
from vadflow.tasks.exports.asap import write_candidates_asap
from vadflow.tasks.exports.geojson import check_object_type, export_slide_geojson, region_area_um2
from vadflow.tasks.exports.overlay import COLOUR_MAP, TARGET_EDGE_PX, heatmap_overlay
from vadflow.tasks.exports.probability import ProbabilityScale
from vadflow.tasks.exports.report import SlideSection, write_html_report
from vadflow.tasks.scoring.aggregate import Candidate, Region, strongest_regions
from vadflow.tasks.scoring.heatmap import (
    SlideScore,
    heatmap_file_shape,
    load_heatmap,
    read_heatmap_tiff,
)
from vadflow.tasks.scoring.tail import DEFAULT_ALPHA, scored_tiles
from vadflow.tasks.slides.ground_truth import ground_truth_mask

SCORED_RUN_FILE = "scored.json"  # beside the heatmaps of the run it describes
# The site's `candidates:` defaults (tasks/site.py CandidatesConfig), for runs saved before.
DEFAULT_SUPPRESS_UM = CandidateRule.suppress_um
DEFAULT_MAX_CANDIDATES = CandidateRule.max_per_slide
TOP_REGIONS = 3  # regions per slide the report lists
# Regions a slide's GeoJSON/ASAP files hold when the run sets no candidates cap: a noisy
# heatmap has up to a million regions, which no viewer opens and no reader uses.
MAX_REGIONS_UNCAPPED = 10_000


@dataclass(frozen=True)
class ExportStyle:
    """How overlays look; nothing here changes a score or a prediction."""

    colour_map: str = COLOUR_MAP
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.colour_map not in colormaps:
            raise ValueError(
                f"unknown colour map {self.colour_map!r}; use a matplotlib name such as "
                "inferno, viridis, magma, jet or RdYlBu_r"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1] (0: slide only, 1: heatmap only), got {self.alpha}"
            )


@dataclass(frozen=True)
class SlideExport:
    """One slide's line of a rendered run: its score, the call, and where its files are."""

    slide_id: str
    split: str
    label: str
    score: float
    predicted: bool | None  # score > threshold; None without a threshold
    candidates: int | None  # lesion candidates above the threshold; None: not computed
    heatmap_tiff: str
    overlay: str
    candidates_csv: str = ""
    candidates_geojson: str = ""
    regions_geojson: str = ""
    asap_xml: str = ""
    # The slide's strongest location: its raw heatmap score and calibrated probability
    # (None: the model has no tail reference, or nothing was scored).
    peak_raw: float | None = None
    probability: float | None = None
    thumbnail: str = ""  # the plain slide thumbnail the overlay is drawn on
    # The strongest regions above the prediction level: rank, anomaly_probability (None
    # without a reference), raw_score, x, y (level-0 centre), area_um2 (None without mpp).
    top_regions: list[dict[str, Any]] = field(default_factory=list)
    regions_omitted: int = 0  # weaker regions above the prediction level left out of the files


@dataclass(frozen=True)
class ScoredRun:
    """What rendering needs, saved as `scored.json` beside the run's heatmaps."""

    site: str
    name: str  # the run's folder name under exports/ and reports/, e.g. "ae_l2", "score-ae_l2"
    model: str
    slides_path: str
    scores: tuple[SlideScore, ...]
    calibrated_threshold: float  # NaN: the model was never calibrated
    threshold_source: str  # where the calibrated threshold came from, for the report
    value_range: tuple[float, float]  # overlay colour scale (and candidates' floor)
    exports_dir: str
    report_dir: str
    candidate_slides: tuple[str, ...] = ()  # slides that get lesion candidates (pathology)
    suppress_um: float = DEFAULT_SUPPRESS_UM  # candidates: one per neighbourhood this wide
    max_candidates: int | None = DEFAULT_MAX_CANDIDATES  # the strongest this many per slide
    qc_dir: str = ""  # artefact QC masks (<slide>.png): no candidate under one; "": keep all
    metrics: dict[str, float] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    # The model's calibration beyond its threshold (`tasks/exports/probability.py`): the
    # slide score the threshold is on, the raw level a location is a prediction above (NaN:
    # none) and the tail reference of its normal tiles (`TailReference.to_dict`; None: the
    # model has none, so exports show raw scores only and say so).
    slide_score: str = "max"
    prediction_level: float = math.nan
    tail_reference: dict[str, Any] | None = None
    alpha: float = DEFAULT_ALPHA
    # Lesion files: every candidate, or (default) only those above the prediction level; and
    # the QuPath object type predictions are written as.
    all_candidates: bool = False
    qupath_objects: str = "detection"
    # Filled in by `render_exports`: the threshold and style used and what was written.
    threshold: float = math.nan
    style: ExportStyle = ExportStyle()
    exported: tuple[SlideExport, ...] = ()

    @property
    def heatmap_dir(self) -> Path:
        return Path(self.scores[0].heatmap).parent

    @property
    def report(self) -> Path:
        return Path(self.report_dir) / "report.html"


def colour_scale(value_range: Sequence[float], threshold: float) -> tuple[float, float]:
    """(vmin, vmax) of the overlays: the run's range, stretched so the threshold sits at or
    below mid-scale (a slide just over the threshold is visibly warm, not black)."""
    vmin, vmax = float(value_range[0]), float(value_range[1])
    if math.isfinite(threshold) and threshold > vmin:
        vmax = max(vmax, 2 * threshold - vmin)
    return vmin, vmax


def slide_candidates(
    heatmap: np.ndarray,
    downsample: int,
    floor: float,
    mpp: float | None = None,
    suppress_um: float = DEFAULT_SUPPRESS_UM,
    max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
    artefacts: np.ndarray | None = None,
) -> list[Candidate]:
    """Candidates of a slide with no evaluation to supply them, by evaluation's own rule:
    local maxima above the run's normal floor, one per `suppress_um`, the strongest
    `max_candidates`, unscored cells counting as the floor, none under `artefacts` (the
    slide's QC mask)."""
    rule = CandidateRule(suppress_um, max_candidates)
    return rule.pick(heatmap, downsample, floor, mpp, artefacts)


def _qc_mask(folder: str, slide_id: str) -> np.ndarray | None:
    """A slide's artefact QC mask (any QC label), if the run leaves artefacts out and tiling
    made one."""
    path = Path(folder) / f"{slide_id}.png" if folder else None
    if path is None or not path.is_file():
        return None
    return np.asarray(Image.open(path).convert("L")) > 0


def render_exports(
    run: ScoredRun,
    style: ExportStyle = ExportStyle(),
    threshold: float | None = None,
    candidates: Mapping[str, Sequence[Candidate]] | None = None,
    notes: Sequence[str] = (),
    workers: int | None = None,
    *,
    all_candidates: bool | None = None,
    qupath_objects: str | None = None,
) -> ScoredRun:
    """Write every slide's exports and the run's report; save and return the updated record.

    `threshold` replaces the calibrated one for predictions (slide calls) and, on a `max`
    calibration, for the prediction level of regions, lesion files and overlay colour (metrics
    stay as computed at the calibrated threshold, and the report says so).
    The slides in `run.candidate_slides` get lesion candidates: `candidates` (evaluation's) where
    given, else `slide_candidates`, the same rule. The Camelyon16 CSV holds all of them with
    their calibrated probability as `p`; the GeoJSON and ASAP files those above the prediction
    level, or every one with `all_candidates`. `qupath_objects` is the GeoJSON object type
    (`detection` or `annotation`); both default to the run's saved choice.
    Heatmaps and scores are only read.
    Slides are drawn by `workers` threads (default: one per CPU, at most one per slide).
    """
    used = run.calibrated_threshold if threshold is None else float(threshold)
    if not run.scores:
        raise ValueError(f"{run.site}/{run.name}: the run scored no slides, nothing to export")
    run = replace(
        run,
        all_candidates=run.all_candidates if all_candidates is None else bool(all_candidates),
        qupath_objects=check_object_type(qupath_objects or run.qupath_objects),
    )
    slides = pl.read_parquet(run.slides_path)
    rows = {r["slide_id"]: r for r in slides.iter_rows(named=True)}
    missing = [s.slide_id for s in run.scores if s.slide_id not in rows]
    if missing:
        raise ValueError(
            f"{run.slides_path}: no manifest row for scored slide(s) {', '.join(missing)}; "
            "was the site re-ingested since scoring? Re-run `vadflow score`"
        )
    vmin, vmax = colour_scale(run.value_range, used)
    run_scale = probability_scale(run, threshold)
    out = Path(run.exports_dir)
    given = candidates or {}

    def render(score: SlideScore) -> SlideExport:
        row = rows[score.slide_id]
        scale = _slide_scale(run, score, run_scale)
        cut = scale.cut if scale.has_cut else vmax  # regions: above the prediction level
        return _render_slide(
            run, score, row, out, style, used, (vmin, vmax), cut, scale, given.get(score.slide_id)
        )

    with ThreadPoolExecutor(max_workers=export_workers(len(run.scores), workers)) as pool:
        exported = list(pool.map(render, run.scores))  # in the run's slide order
    rendered = replace(run, threshold=used, style=style, exported=tuple(exported))
    _write_report(rendered, run_scale, notes)
    save_scored_run(rendered)
    return rendered


def probability_scale(run: ScoredRun, threshold: float | None = None) -> ProbabilityScale:
    """The run's raw score -> probability map and prediction level. On a `max` calibration the
    level is the slide threshold itself (a raw heatmap level), so a `threshold` given for
    this rendering moves it; runs saved before the level was recorded use their threshold."""
    level = run.prediction_level
    if run.slide_score == "max" and (threshold is not None or not math.isfinite(level)):
        level = run.calibrated_threshold if threshold is None else float(threshold)
    return ProbabilityScale.from_record(run.tail_reference, level)


def _slide_scale(run: ScoredRun, score: SlideScore, scale: ProbabilityScale) -> ProbabilityScale:
    """The run's scale as this slide reads it: with a slide baseline, aligned on the slide's
    own tile scores (the tiles its slide call counted: QC'd ones left out unless kept)."""
    reference = scale.reference
    if reference is None or reference.baseline is None or not Path(score.tile_scores).is_file():
        return scale
    tiles = scored_tiles(pl.read_parquet(score.tile_scores), keep_artefacts=not run.qc_dir)
    return scale.for_slide(tiles["score"].to_numpy(), cut_is_tail=run.slide_score == "tail")


def predicted_candidates(
    candidates: Sequence[Candidate], scale: ProbabilityScale
) -> list[Candidate]:
    """The candidates above the prediction level (every one when there is none)."""
    return [c for c in candidates if scale.is_prediction(c[2])]


def _region_rows(
    regions: Sequence[Region], scale: ProbabilityScale, mpp: float | None
) -> list[dict[str, Any]]:
    rows = []
    for rank, region in enumerate(regions[:TOP_REGIONS], start=1):
        x, y = np.asarray(region.outline, dtype=np.float64).mean(axis=0)
        rows.append(
            {
                "rank": rank,
                "anomaly_probability": scale.probability_of(region.max_probability),
                "raw_score": float(region.max_probability),  # raw: aggregate's field name
                "x": round(float(x)),
                "y": round(float(y)),
                "area_um2": region_area_um2(region, mpp),
            }
        )
    return rows


def _render_slide(
    run: ScoredRun,
    score: SlideScore,
    row: Mapping[str, Any],
    out: Path,
    style: ExportStyle,
    threshold: float,
    colours: tuple[float, float],
    cut: float,
    scale: ProbabilityScale,
    candidates: Sequence[Candidate] | None,
) -> SlideExport:
    sid, ds = score.slide_id, score.heatmap_downsample
    small, small_ds = overlay_heatmap(score.heatmap, ds)
    truth = ground_truth_mask(row["annotation_uri"], row["width"], row["height"], small_ds)
    thumbnail = out / f"{sid}.thumbnail.png"
    png = heatmap_overlay(
        row["uri"],
        small,
        small_ds,
        out / f"{sid}.png",
        *colours,
        truth,
        alpha=style.alpha,
        colour_map=style.colour_map,
        scale=scale,
        thumbnail_png=thumbnail,
    )
    files: dict[str, str] = {}
    wanted = candidates is not None or sid in run.candidate_slides
    heatmap = load_heatmap(score.heatmap) if wanted else None  # full resolution: lesion files
    if candidates is None and heatmap is not None:
        candidates = slide_candidates(
            heatmap,
            ds,
            run.value_range[0],
            row["mpp"],
            run.suppress_um,
            run.max_candidates,
            _qc_mask(run.qc_dir, sid),
        )
    regions: Sequence[Region] = ()
    omitted = 0
    if candidates is not None and heatmap is not None:
        # The strongest regions, as many as candidates (the site's cap), the rest counted.
        cap = run.max_candidates if run.max_candidates is not None else MAX_REGIONS_UNCAPPED
        found = strongest_regions(heatmap, ds, cut, cap)
        regions, omitted = found.regions, found.omitted
        shown = list(candidates) if run.all_candidates else predicted_candidates(candidates, scale)
        # Camelyon16's p: the calibrated probability, strictly increasing in the raw score, so
        # FROC ranks exactly as on raw scores; raw where the model has no reference.
        probabilities = scale.probability([c[2] for c in candidates]) if candidates else []
        submitted = [
            (x, y, float(p)) if scale.calibrated else (x, y, raw)
            for (x, y, raw), p in zip(candidates, probabilities, strict=True)
        ]
        csv_path = write_camelyon_csv(out / f"{sid}.csv", submitted)
        points, outlines = export_slide_geojson(
            out,
            sid,
            shown,
            regions=regions,
            scale=scale,
            object_type=run.qupath_objects,
            mpp=row.get("mpp"),
            regions_omitted=omitted,
        )
        xml = write_candidates_asap(out / f"{sid}.xml", shown, regions, scale)
        files = {
            "candidates_csv": str(csv_path),
            "candidates_geojson": str(points),
            "regions_geojson": str(outlines),
            "asap_xml": str(xml),
        }
    # Above the prediction level; without one, every candidate counts.
    count = None if candidates is None else len(predicted_candidates(candidates, scale))
    peak = _peak(score, run, heatmap if heatmap is not None else small)
    calibrated = math.isfinite(threshold)
    return SlideExport(
        slide_id=sid,
        split=row["split"],
        label=row["label"],
        score=score.slide_score,
        predicted=bool(score.slide_score > threshold) if calibrated else None,
        candidates=count,
        heatmap_tiff=score.heatmap,
        overlay=str(png),
        **files,
        peak_raw=peak,
        probability=None if peak is None else scale.probability_of(peak),
        thumbnail=str(thumbnail),
        top_regions=_region_rows(regions, scale, row.get("mpp")),
        regions_omitted=omitted,
    )


def _peak(score: SlideScore, run: ScoredRun, heatmap: np.ndarray) -> float | None:
    """The slide's strongest raw score: its `max` slide score where that is what it is, else
    the maximum of the heatmap at hand (full resolution where it was read)."""
    if run.slide_score == "max" and math.isfinite(score.slide_score):
        return float(score.slide_score)
    finite = heatmap[np.isfinite(heatmap)]
    return float(finite.max()) if finite.size else None


def export_workers(slides: int, workers: int | None = None) -> int:
    """Threads drawing a run's slides: `workers`, else one per CPU; never more than slides."""
    return max(1, min(slides, workers or os.cpu_count() or 1))


def overlay_heatmap(path: str, downsample: int) -> tuple[np.ndarray, int]:
    """The heatmap an overlay is drawn from, and its downsample: the finest pyramid level of
    the heatmap TIFF whose longer side fits the overlay (`TARGET_EDGE_PX`), so a whole slide's
    heatmap is never read, coloured and blended at full resolution for a 1024 px picture.
    Older runs' `.npy` heatmaps have no pyramid and are read whole."""
    if str(path).endswith(".npy"):
        return load_heatmap(path), downsample
    rows, cols = heatmap_file_shape(path)[:2]
    level = 0
    while max(rows, cols) > TARGET_EDGE_PX:  # each level halves the one before, rounding up
        rows, cols, level = -(-rows // 2), -(-cols // 2), level + 1
    # The writer halves down to one 256 px tile, so every level up to this one exists.
    heatmap, geometry = read_heatmap_tiff(path, level)
    return heatmap, geometry.downsample


def _write_report(run: ScoredRun, scale: ProbabilityScale, notes: Sequence[str]) -> Path:
    columns = ("slide_id", "split", "label", "score", "predicted", "candidates")
    table = [
        {
            **{c: getattr(s, c) for c in columns},
            "peak raw score": s.peak_raw,
            "peak probability": s.probability,
        }
        for s in run.exported
    ]
    lines = [f"model: {run.model}"] if run.model else []
    if math.isfinite(run.threshold):
        lines.append(f"threshold {run.threshold:.5g} ({run.threshold_source})")
        if run.threshold != run.calibrated_threshold and run.metrics:
            lines.append(
                f"metrics were computed at the calibrated threshold "
                f"{run.calibrated_threshold:.5g}; predictions and regions use {run.threshold:.5g}"
            )
    else:
        lines.append("no calibrated threshold: slides are ranked by score, not called")
    lines.append(_probability_note(scale))
    if run.candidate_slides:
        most = f"the {run.max_candidates} strongest" if run.max_candidates else "every one"
        which = "every candidate" if run.all_candidates else "the candidates above it"
        lines.append(
            f"lesion files: the Camelyon16 CSV holds {most} per slide of the local maxima above "
            f"the normal floor, one per {run.suppress_um:g} um, with p the calibrated "
            f"probability; the QuPath GeoJSON ({run.qupath_objects}s of class Anomaly) and the "
            f"ASAP XML (group vadflow) hold {which} and the regions above the prediction level"
        )
    capped = [f"{s.slide_id} {s.regions_omitted:,}" for s in run.exported if s.regions_omitted]
    if capped:
        lines.append(
            f"regions: each slide's files hold its {run.max_candidates or MAX_REGIONS_UNCAPPED:,} "
            f"strongest regions; weaker ones left out: {', '.join(capped)}"
        )
    if "scored_share" in run.metrics and math.isfinite(run.metrics["scored_share"]):
        lines.append(f"scored: {run.metrics['scored_share']:.1%} of the test pixels")
    sections = [
        SlideSection(
            slide_id=s.slide_id,
            call=_call(s),
            score=s.score,
            peak_raw=s.peak_raw,
            probability=s.probability,
            top_regions=s.top_regions,
            thumbnail=s.thumbnail,
            overlay=s.overlay,
        )
        for s in run.exported
    ]
    return write_html_report(
        run.report,
        f"{run.site} / {run.name}",
        table,
        run.metrics,
        plots=run.plots,
        notes=[*lines, *notes],
        sections=sections,
    )


def _call(line: SlideExport) -> str:
    if line.predicted is None:
        return "not called (no calibrated threshold)"
    return "anomalous" if line.predicted else "normal"


def _probability_note(scale: ProbabilityScale) -> str:
    if not scale.calibrated:
        return (
            "no calibrated probability: this model carries no tail reference of normal tiles "
            "(calibrated before it did), so raw scores are shown and the CSV's p is raw; "
            "re-run the nightly flow to recalibrate it"
        )
    level = scale.cut_probability
    where = f"; predictions start at probability {level:.3f}" if level is not None else ""
    return (
        "probability: the calibrated anomaly probability, the share of the model's normal "
        f"validation tiles scoring below a raw score{where}; heatmaps keep raw scores"
    )


def save_scored_run(run: ScoredRun) -> Path:
    """Write `scored.json` beside the run's heatmaps (replaced atomically)."""
    record = asdict(run)
    path = run.heatmap_dir / SCORED_RUN_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)
    return path


def find_scored_run(folder: str | Path) -> Path:
    """The `scored.json` a path means: the file, a run's heatmap folder, or a site's output
    folder (then its newest scored run)."""
    folder = Path(folder)
    if folder.is_file() and folder.name == SCORED_RUN_FILE:
        return folder
    if (folder / SCORED_RUN_FILE).is_file():
        return folder / SCORED_RUN_FILE
    # Run folders are "<name>-<UTC stamp>[-<suffix>]": the newest run has the latest stamp
    # (the random suffix of newer versions must not decide).
    runs = sorted((folder / "heatmaps").glob(f"*/{SCORED_RUN_FILE}"), key=_run_stamp)
    if runs:
        return runs[-1]
    raise FileNotFoundError(
        f"no {SCORED_RUN_FILE} in {folder}: give the heatmap folder `vadflow score` printed "
        "(<outputs>/<site>/heatmaps/<run>/) or the site's output folder; runs scored before "
        "exports were re-renderable have none, so score them again"
    )


_STAMP = re.compile(r"\d{8}T\d{6}(?:\.\d+)?")


def _run_stamp(path: Path) -> str:
    """The UTC stamp in a run folder's name (its last part where it has none)."""
    found = _STAMP.findall(path.parent.name)
    return found[-1] if found else path.parent.name.rsplit("-", 1)[-1]


def _slide_score(record: dict[str, Any]) -> SlideScore:
    """A SlideScore from scored.json; older runs also recorded a `heatmap_tiff` beside a
    `.npy` heatmap, which `load_heatmap` still reads."""
    names = {f.name for f in fields(SlideScore)}
    return SlideScore(**{k: v for k, v in record.items() if k in names})


def load_scored_run(path: str | Path) -> ScoredRun:
    """A run saved by `save_scored_run`; raises naming the file when it is not one."""
    path = find_scored_run(path)
    try:
        record = json.loads(path.read_text())
        return ScoredRun(
            **{
                **record,
                "scores": tuple(_slide_score(s) for s in record["scores"]),
                "value_range": tuple(record["value_range"]),
                "candidate_slides": tuple(record["candidate_slides"]),
                "style": ExportStyle(**record["style"]),
                "exported": tuple(SlideExport(**s) for s in record["exported"]),
            }
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable scored-run record ({exc})") from exc
