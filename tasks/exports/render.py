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
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib import colormaps

from vadflow.tasks.evaluation.camelyon import write_camelyon_csv
from vadflow.tasks.evaluation.evaluate import CandidateRule
from vadflow.tasks.exports.asap import write_candidates_asap
from vadflow.tasks.exports.geojson import export_slide_geojson
from vadflow.tasks.exports.overlay import COLOUR_MAP, TARGET_EDGE_PX, heatmap_overlay
from vadflow.tasks.exports.report import write_html_report
from vadflow.tasks.scoring.aggregate import Candidate, heatmap_regions
from vadflow.tasks.scoring.heatmap import (
    SlideScore,
    heatmap_file_shape,
    load_heatmap,
    read_heatmap_tiff,
)
from vadflow.tasks.slides.ground_truth import ground_truth_mask

SCORED_RUN_FILE = "scored.json"  # beside the heatmaps of the run it describes
# The site's `candidates:` defaults (tasks/site.py CandidatesConfig), for runs saved before.
DEFAULT_SUPPRESS_UM = CandidateRule.suppress_um
DEFAULT_MAX_CANDIDATES = CandidateRule.max_per_slide


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
    metrics: dict[str, float] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
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
) -> list[Candidate]:
    """Candidates of a slide with no evaluation to supply them, by evaluation's own rule:
    local maxima above the run's normal floor, one per `suppress_um`, the strongest
    `max_candidates`, unscored cells counting as the floor."""
    return CandidateRule(suppress_um, max_candidates).pick(heatmap, downsample, floor, mpp)


def render_exports(
    run: ScoredRun,
    style: ExportStyle = ExportStyle(),
    threshold: float | None = None,
    candidates: Mapping[str, Sequence[Candidate]] | None = None,
    notes: Sequence[str] = (),
    workers: int | None = None,
) -> ScoredRun:
    """Write every slide's exports and the run's report; save and return the updated record.

    `threshold` replaces the calibrated one for regions, predictions and the colour scale
    (metrics stay as computed at the calibrated threshold, and the report says so).
    The slides in `run.candidate_slides` get lesion candidates: `candidates` (evaluation's) where
    given, else `slide_candidates`, the same rule. Heatmaps and scores are only read.
    Slides are drawn by `workers` threads (default: one per CPU, at most one per slide).
    """
    used = run.calibrated_threshold if threshold is None else float(threshold)
    if not run.scores:
        raise ValueError(f"{run.site}/{run.name}: the run scored no slides, nothing to export")
    slides = pl.read_parquet(run.slides_path)
    rows = {r["slide_id"]: r for r in slides.iter_rows(named=True)}
    missing = [s.slide_id for s in run.scores if s.slide_id not in rows]
    if missing:
        raise ValueError(
            f"{run.slides_path}: no manifest row for scored slide(s) {', '.join(missing)}; "
            "was the site re-ingested since scoring? Re-run `vadflow score`"
        )
    vmin, vmax = colour_scale(run.value_range, used)
    cut = used if math.isfinite(used) else vmax  # regions: above the threshold
    out = Path(run.exports_dir)
    given = candidates or {}

    def render(score: SlideScore) -> SlideExport:
        row = rows[score.slide_id]
        return _render_slide(
            run, score, row, out, style, used, (vmin, vmax), cut, given.get(score.slide_id)
        )

    with ThreadPoolExecutor(max_workers=export_workers(len(run.scores), workers)) as pool:
        exported = list(pool.map(render, run.scores))  # in the run's slide order
    rendered = replace(run, threshold=used, style=style, exported=tuple(exported))
    _write_report(rendered, notes)
    save_scored_run(rendered)
    return rendered


def _render_slide(
    run: ScoredRun,
    score: SlideScore,
    row: Mapping[str, Any],
    out: Path,
    style: ExportStyle,
    threshold: float,
    scale: tuple[float, float],
    cut: float,
    candidates: Sequence[Candidate] | None,
) -> SlideExport:
    sid, ds = score.slide_id, score.heatmap_downsample
    small, small_ds = overlay_heatmap(score.heatmap, ds)
    truth = ground_truth_mask(row["annotation_uri"], row["width"], row["height"], small_ds)
    png = heatmap_overlay(
        row["uri"],
        small,
        small_ds,
        out / f"{sid}.png",
        *scale,
        truth,
        alpha=style.alpha,
        colour_map=style.colour_map,
    )
    files: dict[str, str] = {}
    wanted = candidates is not None or sid in run.candidate_slides
    heatmap = load_heatmap(score.heatmap) if wanted else None  # full resolution: lesion files
    if candidates is None and heatmap is not None:
        candidates = slide_candidates(
            heatmap, ds, run.value_range[0], row["mpp"], run.suppress_um, run.max_candidates
        )
    if candidates is not None and heatmap is not None:
        regions = heatmap_regions(heatmap, ds, cut)
        csv_path = write_camelyon_csv(out / f"{sid}.csv", candidates)
        points, outlines = export_slide_geojson(out, sid, candidates, regions=regions)
        xml = write_candidates_asap(out / f"{sid}.xml", candidates, regions)
        files = {
            "candidates_csv": str(csv_path),
            "candidates_geojson": str(points),
            "regions_geojson": str(outlines),
            "asap_xml": str(xml),
        }
    calibrated = math.isfinite(threshold)
    if candidates is None:
        count = None
    elif calibrated:
        count = sum(p > threshold for _, _, p in candidates)
    else:  # nothing to compare with: every candidate counts
        count = len(candidates)
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
    )


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


def _write_report(run: ScoredRun, notes: Sequence[str]) -> Path:
    columns = ("slide_id", "split", "label", "score", "predicted", "candidates")
    table = [{c: getattr(s, c) for c in columns} for s in run.exported]
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
    if run.candidate_slides:
        most = f"the {run.max_candidates} strongest" if run.max_candidates else "every one"
        lines.append(
            "candidates: lesion candidates above the threshold (all of them without one); "
            f"the CSV, GeoJSON and XML files hold {most} per slide of the local maxima above "
            f"the normal floor, one per {run.suppress_um:g} um"
        )
    if "scored_share" in run.metrics and math.isfinite(run.metrics["scored_share"]):
        lines.append(f"scored: {run.metrics['scored_share']:.1%} of the test pixels")
    return write_html_report(
        run.report,
        f"{run.site} / {run.name}",
        table,
        run.metrics,
        plots=run.plots,
        overlays={s.slide_id: s.overlay for s in run.exported},
        notes=[*lines, *notes],
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
    # Run folders are "<name>-<UTC version>": the newest run has the largest version.
    runs = sorted(
        (folder / "heatmaps").glob(f"*/{SCORED_RUN_FILE}"),
        key=lambda p: p.parent.name.rsplit("-", 1)[-1],
    )
    if runs:
        return runs[-1]
    raise FileNotFoundError(
        f"no {SCORED_RUN_FILE} in {folder}: give the heatmap folder `vadflow score` printed "
        "(<outputs>/<site>/heatmaps/<run>/) or the site's output folder; runs scored before "
        "exports were re-renderable have none, so score them again"
    )


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
