"""Quarantine: which slides a failed contract sets aside, and the files that record it.

A slide is set aside only when every failing expectation is pinned on slides; the run then
goes on without them. ``quarantine_slides`` writes ``<quarantine>/<slide_id>.json`` (as
registration does for unreadable files) and marks the slide in the slide manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from vadflow.data_contracts import ContractResult
from vadflow.tasks.manifests import write_parquet_atomic


@dataclass(frozen=True)
class QuarantinedSlide:
    """A slide taken out of the run by a contract, and why (suite, expectation, row count)."""

    slide_id: str
    reason: str
    suite: str


def set_aside(
    result: ContractResult, frame: pl.DataFrame | None
) -> tuple[pl.DataFrame | None, list[QuarantinedSlide], str | None]:
    """What quarantine makes of a contract ``result`` on ``frame``: the frame without the
    failing slides, those slides with their reasons, and why quarantine cannot save the run
    (None when it can, or when the contract passed)."""
    if result.success:
        return frame, [], None
    if not result.attributable:
        return (
            frame,
            [],
            "not every failure belongs to particular slides, so quarantine cannot fix it",
        )
    reasons = result.slide_reasons()
    quarantined = [QuarantinedSlide(s, r, result.suite) for s, r in reasons.items()]
    if frame is None or "slide_id" not in frame.columns:
        return frame, quarantined, None
    kept = frame.filter(~pl.col("slide_id").is_in(list(reasons)))
    if kept.height == 0 and frame.height > 0:
        return kept, quarantined, "every slide fails this contract: none would be left"
    return kept, quarantined, None


def merge_quarantined(quarantined: Iterable[QuarantinedSlide]) -> list[QuarantinedSlide]:
    """One entry per slide; reasons from several contracts are joined."""
    merged: dict[str, QuarantinedSlide] = {}
    for q in quarantined:
        if q.slide_id in merged:
            old = merged[q.slide_id]
            q = QuarantinedSlide(q.slide_id, f"{old.reason} | {q.reason}", f"{old.suite}+{q.suite}")
        merged[q.slide_id] = q
    return list(merged.values())


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
