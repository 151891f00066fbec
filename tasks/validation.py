"""Data-contract checks at the pipeline's stage boundaries: run a suite, keep a report, and
either stop the run (strict) or take the failing slides out and let the rest go on (quarantine).

Plain functions, no Prefect: the flow's tasks call them and pass Prefect's
``create_markdown_artifact`` in as a callback. Every check writes its report before it raises,
so a failed night still leaves the reason on disk (and in MLflow, via ``publish_report``).

Report folder, one per run (``report_folder``)::

    <reports>/contracts/<run>/
      index.html        every check of the run: status, failing expectations, example rows,
                        quarantined slides; self-contained, opens offline
      summary.md        the same in Markdown (the Prefect artifact's body)
      <label>.json      one check's result, as data
      <label>.gx.html   great-expectations Data Docs page of that validation
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from vadflow.data_contracts import (
    ContractError,
    ContractResult,
    Grid,
    validate_metrics,
    validate_slide_manifest,
    validate_slide_scores,
    validate_tile_manifest,
    validate_tile_scores,
)
from vadflow.tasks.manifests import TILE_SCHEMA, write_parquet_atomic

log = logging.getLogger(__name__)

Mode = Literal["strict", "quarantine"]
MODES: tuple[Mode, ...] = ("strict", "quarantine")
# (markdown=..., key=..., description=...): prefect.artifacts.create_markdown_artifact fits.
MarkdownArtifact = Callable[..., Any]

# suite -> the function that validates it; the first frame is the one quarantine filters.
VALIDATORS: dict[str, Callable[..., ContractResult]] = {
    "slide_manifest": validate_slide_manifest,
    "tile_manifest": validate_tile_manifest,
    "tile_scores": validate_tile_scores,
    "slide_scores": validate_slide_scores,
    "metrics": validate_metrics,
}


@dataclass(frozen=True)
class QuarantinedSlide:
    """A slide taken out of the run by a contract, and why (suite, expectation, row count)."""

    slide_id: str
    reason: str
    suite: str


@dataclass(frozen=True)
class StageValidation:
    """One contract check. ``frame`` is the checked frame, minus the quarantined slides in
    quarantine mode; ``error`` is what ``validate_stage`` raises (None when the run goes on)."""

    label: str
    mode: Mode
    result: ContractResult
    frame: pl.DataFrame | None
    quarantined: list[QuarantinedSlide] = field(default_factory=list)
    report: str | None = None  # index.html of the run's report folder
    error: ContractError | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """True when the run may go on (possibly without the quarantined slides)."""
        return self.error is None

    @property
    def quarantined_ids(self) -> list[str]:
        return [q.slide_id for q in self.quarantined]


STRICT_HINT = (
    "what to do: fix the named inputs and rerun; a damaged tile manifest is re-tiled once its "
    "tiles/<slide_id>.done.json marker is deleted; or set `contracts: quarantine` in the site "
    "file to set failing slides aside and go on"
)


def check_stage(
    name: str,
    *frames: Any,
    mode: Mode = "strict",
    report_dir: str | Path | None = None,
    label: str | None = None,
    **options: Any,
) -> StageValidation:
    """Run contract ``name`` on ``frames`` (see ``VALIDATORS`` for each suite's arguments) and
    decide what the run does; never raises for a broken contract (``validate_stage`` does).

    quarantine mode: when every failing expectation is pinned on slides, those slides are
    dropped from the first frame and returned with their reasons; a failure no slide owns (a
    missing column, a bad metric), or one that would leave no slide at all, is still an error.
    """
    if mode not in MODES:
        raise ValueError(f"contract mode must be one of {MODES}, not {mode!r}")
    if name not in VALIDATORS:
        raise KeyError(f"no contract named {name!r}; known: {', '.join(VALIDATORS)}")
    label = label or name
    result = VALIDATORS[name](*frames, **options)
    frame = frames[0] if frames and isinstance(frames[0], pl.DataFrame) else None
    quarantined: list[QuarantinedSlide] = []
    hint: str | None = None  # None: the run goes on; otherwise why it cannot
    if not result.success and mode == "strict":
        hint = STRICT_HINT
    elif not result.success and not result.attributable:
        hint = "not every failure belongs to particular slides, so quarantine cannot fix it"
    elif not result.success:
        reasons = result.slide_reasons()
        quarantined = [QuarantinedSlide(s, r, result.suite) for s, r in reasons.items()]
        if frame is not None and "slide_id" in frame.columns:
            kept = frame.filter(~pl.col("slide_id").is_in(list(reasons)))
            if kept.height == 0 and frame.height > 0:
                hint = "every slide fails this contract: none would be left"
            frame = kept
    stage = StageValidation(label, mode, result, frame, quarantined)
    if hint is not None:
        stage = replace(stage, error=ContractError(result, hint=hint))
    if report_dir is not None:
        report = str(write_stage_report(stage, report_dir))
        stage = replace(stage, report=report)
        if hint is not None:
            stage = replace(stage, error=ContractError(result, report=report, hint=hint))
    if hint is None:
        for q in quarantined:
            log.warning("quarantined %s: %s", q.slide_id, q.reason)
    return stage


def validate_stage(
    name: str,
    *frames: Any,
    mode: Mode = "strict",
    report_dir: str | Path | None = None,
    label: str | None = None,
    **options: Any,
) -> StageValidation:
    """``check_stage``, raising ContractError (suite, expectation, count, example rows, report
    path) when the run cannot go on: any failure in strict mode, an unattributable one in
    quarantine mode."""
    stage = check_stage(name, *frames, mode=mode, report_dir=report_dir, label=label, **options)
    if stage.error is not None:
        raise stage.error
    return stage


# --- frames the contracts read -----------------------------------------------------------


def tile_grids(slides: pl.DataFrame, tiling: Any) -> dict[str, Grid]:
    """slide_id -> its tiling grid, from the site's TilingConfig and each slide's MPP.

    Uses tasks.tiling.grid.working_geometry itself, so the contract checks the grid the tiler
    lays (its step depends on the MPP, not on the pyramid level, so any level will do).
    """
    from vadflow.tasks.tiling.grid import working_geometry

    class _AnyLevel:
        def best_level_for_downsample(self, downsample: float) -> int:
            return 0

    grids = {}
    for row in slides.select("slide_id", "mpp").iter_rows(named=True):
        geometry = working_geometry(_AnyLevel(), row["mpp"], tiling)  # type: ignore[arg-type]
        grids[row["slide_id"]] = Grid(step=geometry.step)  # tile_origins starts at (0, 0)
    return grids


TILE_SCORES_SCHEMA = {"slide_id": pl.String, "tile_id": pl.String, "score": pl.Float64}


def read_frames(
    paths: Iterable[str | Path], schema: Mapping[str, pl.DataType] | None = None
) -> pl.DataFrame:
    """Concatenate Parquet files (tile manifests, tile scores); no file gives an empty frame
    with ``schema``'s columns (nothing to check is not a missing column)."""
    frames = [pl.read_parquet(p) for p in paths]
    if frames:
        return pl.concat(frames, how="diagonal_relaxed")
    return pl.DataFrame(schema=dict(schema or {}))


def slide_scores_frame(scores: Iterable[Any]) -> pl.DataFrame:
    """One row per SlideScore (or mapping with its fields), with the heatmap's shape read
    from the .npy header (memory-mapped: the heatmap itself is not loaded)."""
    rows = []
    for s in scores:
        record = s if isinstance(s, Mapping) else vars(s)
        rows_, cols = _heatmap_shape(record.get("heatmap"))
        rows.append(
            {
                "slide_id": record["slide_id"],
                "tiles": record.get("tiles"),
                "slide_score": _float(record.get("slide_score")),
                "heatmap_downsample": record.get("heatmap_downsample"),
                "heatmap_rows": rows_,
                "heatmap_cols": cols,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "slide_id": pl.String,
            "tiles": pl.Int64,
            "slide_score": pl.Float64,
            "heatmap_downsample": pl.Int64,
            "heatmap_rows": pl.Int64,
            "heatmap_cols": pl.Int64,
        },
    )


def _heatmap_shape(path: str | None) -> tuple[int | None, int | None]:
    if not path:
        return None, None
    from vadflow.tasks.scoring.heatmap import (
        heatmap_file_shape,  # torch: only when there are heatmaps
    )

    try:
        shape = heatmap_file_shape(path)
    except (OSError, ValueError):
        return None, None  # unreadable: the contract's "heatmap file is readable" rule says so
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else (None, None)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# --- quarantine ----------------------------------------------------------------------------


def mark_quarantined(slides: pl.DataFrame, quarantined: Sequence[QuarantinedSlide]) -> pl.DataFrame:
    """The slide manifest with these slides' status set to quarantined and their reason."""
    if not quarantined:
        return slides
    reasons = {q.slide_id: q.reason for q in quarantined}
    hit = pl.col("slide_id").is_in(list(reasons))
    return slides.with_columns(
        pl.when(hit).then(pl.lit("quarantined")).otherwise(pl.col("status")).alias("status"),
        pl.when(hit)
        .then(pl.col("slide_id").replace_strict(reasons, default=None, return_dtype=pl.String))
        .otherwise(pl.col("reason"))
        .alias("reason"),
    )


def quarantine_slides(
    quarantined: Sequence[QuarantinedSlide],
    folder: str | Path,
    slides_path: str | Path | None = None,
) -> list[Path]:
    """Write ``<folder>/<slide_id>.json`` per slide (as registration does) and, given the slide
    manifest's path, mark the slides quarantined in it. Returns the JSON files."""
    folder = Path(folder)
    if not quarantined:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    uris: dict[str, str] = {}
    if slides_path is not None:
        slides = pl.read_parquet(slides_path)
        uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))
        write_parquet_atomic(mark_quarantined(slides, quarantined), Path(slides_path))
    written = []
    for q in quarantined:
        path = folder / f"{q.slide_id}.json"
        record = {"slide_id": q.slide_id, "uri": uris.get(q.slide_id), "reason": q.reason}
        path.write_text(json.dumps({**record, "contract": q.suite}, indent=2))
        written.append(path)
    return written


# --- the checks at each boundary of the nightly flow ----------------------------------------


@dataclass(frozen=True)
class BoundaryCheck:
    """What one boundary's checks decided: slides taken out, and where the report is."""

    quarantined: list[QuarantinedSlide]
    report_dir: str
    stages: list[str]  # labels of the checks run

    @property
    def quarantined_ids(self) -> list[str]:
        return sorted({q.slide_id for q in self.quarantined})


def check_manifests(
    slides_path: str | Path,
    tile_paths: Sequence[str | Path],
    *,
    tiling: Any = None,
    mode: Mode = "strict",
    report_dir: str | Path,
    quarantine_dir: str | Path | None = None,
    markdown_artifact: MarkdownArtifact | None = None,
    artifact_key: str = "data-contracts",
) -> BoundaryCheck:
    """The slide and tile manifest contracts, before training.

    ``tiling`` (the site's TilingConfig) turns on the grid rules. Both contracts run and are
    reported before anything raises. In quarantine mode the failing slides get a quarantine
    file and the status ``quarantined`` in the slide manifest; leave their tiles out of training
    and scoring (``BoundaryCheck.quarantined_ids``).
    """
    slides = pl.read_parquet(slides_path)
    tiles = read_frames(tile_paths, TILE_SCHEMA)
    grids = tile_grids(slides, tiling) if tiling is not None else None
    stages = [
        check_stage("slide_manifest", slides, mode=mode, report_dir=report_dir),
        check_stage("tile_manifest", tiles, slides, mode=mode, report_dir=report_dir, grids=grids),
    ]
    return _conclude(
        stages, report_dir, quarantine_dir, slides_path, markdown_artifact, artifact_key
    )


def declared_score_range(family: str) -> tuple[float, float]:
    """The tile-score range `family` declares (Detector.score_range); [0, inf) if unknown."""
    from vadflow.tasks.detectors.registry import available_families, detector_class

    if family not in available_families():
        return (0.0, math.inf)
    return detector_class(family).score_range


def family_of_run(run: str) -> str:
    """The detector family a heatmap run is named after: `ae_l2` for the nightly's `ae_l2`,
    `supervised_cnn` for batch scoring's `batch-supervised_cnn`; the name itself if none."""
    from vadflow.tasks.detectors.registry import available_families

    return next(
        (f for f in available_families() if run == f or run.endswith(f"-{f}")),
        run,
    )


def check_scores(
    family: str,
    scores: Sequence[Any],
    slides_path: str | Path,
    tile_paths: Sequence[str | Path],
    *,
    expected_slides: Iterable[str] | None = None,
    score_range: tuple[float, float] | None = None,
    mode: Mode = "strict",
    report_dir: str | Path,
    quarantine_dir: str | Path | None = None,
    markdown_artifact: MarkdownArtifact | None = None,
    artifact_key: str = "data-contracts",
) -> BoundaryCheck:
    """The tile and slide score contracts of one detector family, before evaluation.

    ``scores`` are the family's SlideScore records; ``tile_paths`` the tile manifests of the
    scored slides; ``expected_slides`` the slides sent to scoring (default: the scored ones);
    ``score_range`` the tile-score range (default: the one the family declares).
    """
    slides = pl.read_parquet(slides_path)
    tile_scores = read_frames(_tile_score_paths(scores), TILE_SCORES_SCHEMA)
    tiles = read_frames(tile_paths, TILE_SCHEMA)
    stages = [
        check_stage(
            "tile_scores",
            tile_scores,
            tiles,
            mode=mode,
            report_dir=report_dir,
            label=f"tile_scores-{family}",
            score_range=score_range or declared_score_range(family),
        ),
        check_stage(
            "slide_scores",
            slide_scores_frame(scores),
            slides,
            mode=mode,
            report_dir=report_dir,
            label=f"slide_scores-{family}",
            expected_slides=expected_slides,
        ),
    ]
    return _conclude(
        stages, report_dir, quarantine_dir, slides_path, markdown_artifact, artifact_key
    )


def _tile_score_paths(scores: Sequence[Any]) -> list[str]:
    out = []
    for s in scores:
        path = s["tile_scores"] if isinstance(s, Mapping) else s.tile_scores
        if path and Path(path).exists():
            out.append(path)
    return out


def check_metrics(
    family: str,
    metrics: Mapping[str, float],
    *,
    report_dir: str | Path,
    markdown_artifact: MarkdownArtifact | None = None,
    artifact_key: str = "data-contracts",
) -> BoundaryCheck:
    """The metrics record of one family, before tracking and promotion. Always strict: a bad
    metric belongs to no slide."""
    stage = check_stage(
        "metrics",
        metrics,
        mode="strict",
        report_dir=report_dir,
        label=f"metrics-{family}",
        record=family,
    )
    return _conclude([stage], report_dir, None, None, markdown_artifact, artifact_key)


def _conclude(
    stages: list[StageValidation],
    report_dir: str | Path,
    quarantine_dir: str | Path | None,
    slides_path: str | Path | None,
    markdown_artifact: MarkdownArtifact | None,
    artifact_key: str,
) -> BoundaryCheck:
    """Quarantine, publish the report's Markdown, then raise the first error (if any)."""
    errors = [s.error for s in stages if s.error is not None]
    quarantined = [q for s in stages for q in s.quarantined]
    if quarantined and not errors and quarantine_dir is not None:
        quarantine_slides(_merge(quarantined), quarantine_dir, slides_path)
    if markdown_artifact is not None:
        publish_markdown(report_dir, markdown_artifact, artifact_key)
    if errors:
        raise errors[0]
    return BoundaryCheck(_merge(quarantined), str(report_dir), [s.label for s in stages])


def _merge(quarantined: Iterable[QuarantinedSlide]) -> list[QuarantinedSlide]:
    """One entry per slide; reasons from several contracts are joined."""
    merged: dict[str, QuarantinedSlide] = {}
    for q in quarantined:
        if q.slide_id in merged:
            old = merged[q.slide_id]
            q = QuarantinedSlide(q.slide_id, f"{old.reason} | {q.reason}", f"{old.suite}+{q.suite}")
        merged[q.slide_id] = q
    return list(merged.values())


# --- reports -------------------------------------------------------------------------------


def report_folder(reports: str | Path, run: str) -> Path:
    """``<reports>/contracts/<run>``: one report folder per run (run: a version or timestamp)."""
    return Path(reports) / "contracts" / _safe(run)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "report"


def write_stage_report(stage: StageValidation, folder: str | Path) -> Path:
    """Write ``<label>.json`` and ``<label>.gx.html`` for one check, then rebuild the folder's
    ``index.html`` and ``summary.md`` from every check in it. Returns index.html."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = _safe(stage.label)
    gx_page = _write_data_docs(stage.result, folder / f"{name}.gx.html")
    record = {
        "label": stage.label,
        "mode": stage.mode,
        "checked_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "outcome": _outcome(stage),
        "result": stage.result.to_dict(),
        "quarantined": [vars(q) for q in stage.quarantined],
        "data_docs": gx_page.name if gx_page else None,
    }
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    return _rebuild_index(folder)


def _outcome(stage: StageValidation) -> str:
    if stage.result.success:
        return "passed"
    if stage.error is None:
        return f"quarantined {len(stage.quarantined)} slide(s)"
    return "FAILED"


def _write_data_docs(result: ContractResult, path: Path) -> Path | None:
    """great-expectations' own Data Docs page for the validation (rendered, not site-built:
    no store, no context files). A rendering failure costs the page, never the check."""
    if result.gx_result is None:
        return None
    try:
        from great_expectations.render.renderer.page_renderer import (
            ValidationResultsPageRenderer,
        )
        from great_expectations.render.view.view import DefaultJinjaPageView

        document = ValidationResultsPageRenderer().render(result.gx_result)
        path.write_text(DefaultJinjaPageView().render(document))
    except Exception as exc:  # noqa: BLE001 - a report page must never fail the pipeline
        log.warning("could not render Data Docs for %s: %s", result.suite, exc)
        return None
    return path


def load_report(folder: str | Path) -> list[dict[str, Any]]:
    """Every check recorded in a report folder, oldest first."""
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    return sorted(records, key=lambda r: (r["checked_at"], r["label"]))


def report_markdown(folder: str | Path) -> str:
    """The folder's checks as Markdown: a status table, then each failing contract."""
    records = load_report(folder)
    lines = [
        f"## Data contracts: {Path(folder).name}",
        "",
        "| check | mode | rows | expectations | outcome |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in records:
        res = r["result"]
        lines.append(
            f"| {r['label']} | {r['mode']} | {res['rows']} | {res['evaluated']} | {r['outcome']} |"
        )
    for r in records:
        result = ContractResult.from_dict(r["result"])
        if result.success and not result.notes:
            continue
        lines += ["", result.to_markdown().rstrip()]
        examples = [
            f"- `{failure.expectation}` on `{failure.column}`: `{row}`"
            for failure in result.failures
            for row in failure.example_rows[:3]
        ]
        if examples:
            lines += ["", "Example rows:", "", *examples]
        if r["quarantined"]:
            lines += ["", "Quarantined:", ""]
            lines += [f"- `{q['slide_id']}`: {q['reason']}" for q in r["quarantined"]]
    return "\n".join(lines) + "\n"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.passed { color: #17702f; } .FAILED { color: #b00020; font-weight: bold; }
.quarantined { color: #9a6700; font-weight: bold; }
code { background: #f6f6f6; padding: 0 3px; }
"""


def _rebuild_index(folder: Path) -> Path:
    records = load_report(folder)
    (folder / "summary.md").write_text(report_markdown(folder))
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Data contracts: {e(folder.name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Data contracts: {e(folder.name)}</h1>",
        "<table><tr><th>check</th><th>mode</th><th>rows</th><th>expectations</th>"
        "<th>outcome</th><th>Data Docs</th></tr>",
    ]
    for r in records:
        res = r["result"]
        css = r["outcome"].split()[0]
        docs = (
            f"<a href='{e(r['data_docs'])}'>great-expectations page</a>" if r["data_docs"] else ""
        )
        parts.append(
            f"<tr><td><a href='#{e(_safe(r['label']))}'>{e(r['label'])}</a></td>"
            f"<td>{e(r['mode'])}</td><td>{res['rows']}</td><td>{res['evaluated']}</td>"
            f"<td class='{e(css)}'>{e(r['outcome'])}</td><td>{docs}</td></tr>"
        )
    parts.append("</table>")
    for r in records:
        parts += _section_html(r)
    parts.append("</body></html>")
    index = folder / "index.html"
    index.write_text("\n".join(parts))
    return index


def _section_html(record: dict[str, Any]) -> list[str]:
    e = html.escape
    res = record["result"]
    out = [
        f"<h2 id='{e(_safe(record['label']))}'>{e(record['label'])}: "
        f"<span class='{e(record['outcome'].split()[0])}'>{e(record['outcome'])}</span></h2>",
        f"<p>suite <code>{e(res['suite'])}</code>, mode {e(record['mode'])}, "
        f"{res['evaluated']} expectations on {res['rows']} rows, checked {e(record['checked_at'])}"
        "</p>",
    ]
    out += [f"<p>note: {e(n)}</p>" for n in res["notes"]]
    if res["failures"]:
        out.append(
            "<table><tr><th>expectation</th><th>column</th><th>unexpected</th><th>examples</th>"
            "<th>detail</th><th>example rows</th><th>slides</th></tr>"
        )
        for f in res["failures"]:
            rows = "<br>".join(e(json.dumps(row, default=str)) for row in f["example_rows"])
            slides = ", ".join(f"{e(s)} ({n})" for s, n in f["slide_counts"].items())
            out.append(
                f"<tr><td><code>{e(f['expectation'])}</code></td><td>{e(str(f['column']))}</td>"
                f"<td>{f['unexpected_count']}</td><td>{e(repr(f['examples']))}</td>"
                f"<td>{e(f['detail'])}</td><td>{rows}</td><td>{slides}</td></tr>"
            )
        out.append("</table>")
    if record["quarantined"]:
        out.append("<h3>Quarantined slides</h3><ul>")
        out += [
            f"<li><code>{e(q['slide_id'])}</code>: {e(q['reason'])}</li>"
            for q in record["quarantined"]
        ]
        out.append("</ul>")
    return out


def publish_markdown(
    report_dir: str | Path,
    markdown_artifact: MarkdownArtifact,
    key: str = "data-contracts",
) -> str:
    """Hand the report's Markdown to ``markdown_artifact`` (Prefect's
    ``create_markdown_artifact``, callable only inside a flow or task). Returns the Markdown."""
    markdown = report_markdown(report_dir)
    key = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-") or "data-contracts"
    markdown_artifact(
        markdown=markdown, key=key, description=f"data contracts, {Path(report_dir).name}"
    )
    return markdown


def log_report_to_mlflow(
    report_dir: str | Path,
    run_id: str,
    tracking_uri: str | None = None,
    artifact_path: str = "data_contracts",
) -> None:
    """Log the report folder as artifacts of an MLflow run (under ``artifact_path``)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).log_artifacts(run_id, str(report_dir), artifact_path)


def publish_report(
    report_dir: str | Path,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    markdown_artifact: MarkdownArtifact | None = None,
    key: str = "data-contracts",
    artifact_path: str = "data_contracts",
) -> str:
    """Both of the above, each when asked for: MLflow artifacts given ``run_id``, a markdown
    artifact given ``markdown_artifact``. Returns the report's Markdown."""
    if run_id is not None:
        log_report_to_mlflow(report_dir, run_id, tracking_uri, artifact_path)
    if markdown_artifact is not None:
        return publish_markdown(report_dir, markdown_artifact, key)
    return report_markdown(report_dir)


# --- every contract on a site's existing outputs (`vadflow validate`) ---------------------


@dataclass(frozen=True)
class OutputsValidation:
    """Every check run on a site's outputs, the report folder, and what was not checked."""

    stages: list[StageValidation]
    report_dir: Path
    skipped: list[str]

    @property
    def passed(self) -> bool:
        return all(s.result.success for s in self.stages)


def validate_outputs(
    root: str | Path,
    site: Any = None,
    *,
    run: str | None = None,
) -> OutputsValidation:
    """Run every contract on ``root`` = ``<outputs>/<site>/`` as the nightly flow left it:
    slide manifest, tile manifests (of slides not quarantined), and for the latest model of
    each family its tile scores, slide scores and metrics. Nothing is quarantined or raised:
    the outcome of each check is in the result and in ``<root>/reports/contracts/<run>/``.

    ``site`` (its SiteConfig) supplies the tiling grid and heatmap downsample; without it the
    grid rules are skipped and the downsample is read from nowhere, so slide scores are skipped.
    """
    root = Path(root)
    slides_path = root / "slides.parquet"
    if not slides_path.exists():
        raise FileNotFoundError(
            f"no slide manifest at {slides_path}: run the nightly flow on this site first"
        )
    run = run or f"validate-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    report_dir = report_folder(root / "reports", run)
    tiling = getattr(site, "tiling", None)
    skipped: list[str] = []

    def check(name: str, *frames: Any, **options: Any) -> StageValidation:
        return check_stage(name, *frames, mode="strict", report_dir=report_dir, **options)

    slides = pl.read_parquet(slides_path)
    stages = [check("slide_manifest", slides)]
    usable = set(slides.filter(pl.col("status") == "ok")["slide_id"].to_list())
    tile_files = sorted((root / "tiles").glob("*.parquet"))
    left_out = [p.stem for p in tile_files if p.stem not in usable]
    if left_out:
        skipped.append(f"tile manifests of slides not in use (quarantined?): {left_out}")
    tiles = read_frames((p for p in tile_files if p.stem in usable), TILE_SCHEMA)
    grids = tile_grids(slides, tiling) if tiling is not None else None
    stages.append(check("tile_manifest", tiles, slides, grids=grids))

    tiled = set(tiles["slide_id"].unique().to_list()) if tiles.height else set()
    to_score = slides.filter(
        pl.col("slide_id").is_in(list(tiled)) & pl.col("split").is_in(["val", "test"])
    )["slide_id"].to_list()
    for family, folder in _latest_models(root / "heatmaps").items():
        score_files = sorted(folder.glob("*.tiles.parquet"))
        scored = [p.name.removesuffix(".tiles.parquet") for p in score_files]
        stages.append(
            check(
                "tile_scores",
                read_frames(score_files, TILE_SCORES_SCHEMA),
                tiles.filter(pl.col("slide_id").is_in(scored)),
                label=f"tile_scores-{family}",
                score_range=declared_score_range(family_of_run(family)),
            )
        )
        if tiling is None:
            skipped.append(f"slide scores of {family}: heatmap downsample unknown without a site")
            continue
        records = [
            _slide_score_record(folder, slide_id, tiling.heatmap_downsample)
            for slide_id in sorted(
                {p.name.split(".heatmap.")[0] for p in folder.glob("*.heatmap.*")}
            )
        ]
        stages.append(
            check(
                "slide_scores",
                slide_scores_frame(records),
                slides,
                label=f"slide_scores-{family}",
                expected_slides=to_score,
            )
        )
    for metrics_path in sorted((root / "reports").glob("*/metrics.json")):
        family = metrics_path.parent.name
        stages.append(
            check(
                "metrics",
                json.loads(metrics_path.read_text()),
                label=f"metrics-{family}",
                record=family,
            )
        )
    return OutputsValidation(stages, report_dir, skipped)


def _latest_models(heatmaps: Path) -> dict[str, Path]:
    """family -> its newest ``<family>-<version>`` folder (versions are UTC timestamps)."""
    latest: dict[str, Path] = {}
    for folder in sorted(p for p in heatmaps.glob("*-*") if p.is_dir()):
        family = folder.name.rsplit("-", 1)[0]
        latest[family] = folder  # sorted: the last one is the newest
    return latest


def _slide_score_record(folder: Path, slide_id: str, downsample: int) -> dict[str, Any]:
    """A SlideScore rebuilt from the files scoring left (its record is not kept on disk)."""
    from vadflow.tasks.scoring.heatmap import load_heatmap

    heatmap = folder / f"{slide_id}.heatmap.tif"
    if not heatmap.exists() and (folder / f"{slide_id}.heatmap.npy").exists():
        heatmap = folder / f"{slide_id}.heatmap.npy"  # a run from before the TIFF heatmaps
    tile_scores = folder / f"{slide_id}.tiles.parquet"
    try:
        values = load_heatmap(heatmap)
    except (OSError, ValueError):  # the slide-scores contract reports the unreadable heatmap
        values = np.full(1, np.nan)
    finite = values[np.isfinite(values)]
    return {
        "slide_id": slide_id,
        "tiles": pl.scan_parquet(tile_scores).select(pl.len()).collect().item()
        if tile_scores.exists()
        else 0,
        "slide_score": float(finite.max()) if finite.size else math.nan,
        "heatmap": str(heatmap),
        "tile_scores": str(tile_scores),
        "heatmap_downsample": downsample,
    }
