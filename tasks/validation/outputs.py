"""Every contract on a site's existing outputs, offline (``vadflow validate``): nothing is
quarantined or raised; each check's outcome is in the result and in the run's report folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vadflow.data_contracts.schemas import TILE_SCHEMA, TILE_SCORES_SCHEMA
from vadflow.tasks.validation.boundaries import declared_score_range, family_of_run
from vadflow.tasks.validation.frames import read_frames, slide_scores_frame, tile_grids
from vadflow.tasks.validation.report import report_folder
from vadflow.tasks.validation.stage import StageValidation, check_stage


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
