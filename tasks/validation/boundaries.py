"""The contract checks at each boundary of the nightly flow: manifests before training, scores
before evaluation, metrics before tracking and promotion.

Plain functions, no Prefect: the flow's tasks call them and pass Prefect's
``create_markdown_artifact`` in as a callback. Each runs its contracts, writes the report, sets
failing slides aside (quarantine mode), publishes the report's Markdown, and only then raises
the first error, so a failed night still leaves the reason on disk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from vadflow.data_contracts.schemas import TILE_SCHEMA, TILE_SCORES_SCHEMA
from vadflow.tasks.validation.frames import read_frames, slide_scores_frame, tile_grids
from vadflow.tasks.validation.passed import PassedResults, contract_key
from vadflow.tasks.validation.publish import MarkdownArtifact, publish_markdown
from vadflow.tasks.validation.quarantine import (
    QuarantinedSlide,
    merge_quarantined,
    quarantine_slides,
)
from vadflow.tasks.validation.stage import Mode, StageValidation, check_stage

log = logging.getLogger(__name__)


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
    reuse: bool = False,
) -> BoundaryCheck:
    """The slide and tile manifest contracts, before training.

    ``tiling`` (the site's TilingConfig) turns on the grid rules. Both contracts run and are
    reported before anything raises. In quarantine mode the failing slides get a quarantine
    file and the status ``quarantined`` in the slide manifest; leave their tiles out of training
    and scoring (``BoundaryCheck.quarantined_ids``).

    With ``reuse`` (the nightly), manifests whose bytes, parameters and contracts code match a
    check that passed before are not checked again (``passed.json`` beside the run reports,
    ``tasks/validation/passed.py``); the returned check's stages say which run passed them.
    """
    remembered = PassedResults(Path(report_dir).parent) if reuse else None
    key = None
    if remembered is not None:
        tiling_params = tiling.model_dump() if hasattr(tiling, "model_dump") else tiling
        params = {"check": "manifests", "tiling": tiling_params, "mode": mode}
        key = contract_key([slides_path, *tile_paths], params)
        if (run := remembered.passed_in(key)) is not None:
            log.info("manifest contracts: manifests unchanged since run %s, which passed", run)
            labels = [f"{s} (unchanged since {run})" for s in ("slide_manifest", "tile_manifest")]
            return BoundaryCheck([], str(report_dir), labels)
    slides = pl.read_parquet(slides_path)
    tiles = read_frames(tile_paths, TILE_SCHEMA)
    grids = tile_grids(slides, tiling) if tiling is not None else None
    stages = [
        check_stage("slide_manifest", slides, mode=mode, report_dir=report_dir),
        check_stage("tile_manifest", tiles, slides, mode=mode, report_dir=report_dir, grids=grids),
    ]
    check = _conclude(
        stages, report_dir, quarantine_dir, slides_path, markdown_artifact, artifact_key
    )
    if remembered is not None and key is not None and all(s.result.success for s in stages):
        remembered.record(key, Path(report_dir).name, report_dir)
    return check


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
        quarantine_slides(merge_quarantined(quarantined), quarantine_dir, slides_path)
    if markdown_artifact is not None:
        publish_markdown(report_dir, markdown_artifact, artifact_key)
    if errors:
        raise errors[0]
    return BoundaryCheck(merge_quarantined(quarantined), str(report_dir), [s.label for s in stages])
