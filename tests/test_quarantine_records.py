"""Quarantine means the same everywhere: manifest status, reason file, summary line (#24, 6)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from vadflow.tasks.manifests import SLIDE_SCHEMA
from vadflow.tasks.pipeline.ingest import quarantine_failed
from vadflow.tasks.records import Ingested
from vadflow.tasks.site import SiteLayout
from vadflow.tasks.slides.register import slide_frame
from vadflow.tasks.tiling.grid import TilingResult
from vadflow.tasks.validation.boundaries import BoundaryCheck


def _row(slide_id: str) -> dict:
    row = {name: None for name in SLIDE_SCHEMA}
    return row | {
        "slide_id": slide_id,
        "uri": f"/data/{slide_id}.tif",
        "site": "s",
        "domain": "pathology",
        "split": "test",
        "label": "normal",
        "category": "normal",
        "status": "ok",
        "sha256": "ab" * 32,
    }


def test_a_slide_whose_tiling_failed_is_quarantined_in_the_manifest_and_a_file(tmp_path: Path):
    layout = SiteLayout(tmp_path, "s")
    layout.root.mkdir(parents=True)
    slide_frame([_row("good"), _row("broken")]).write_parquet(layout.slides_manifest)
    results = [
        TilingResult("good", 10, "ok", "good.parquet", "", 0.5),
        TilingResult("broken", 0, "failed", "", "", 0.0, reason="mask is 64x64 px but ..."),
    ]
    quarantine_failed(layout, results)
    slides = {r["slide_id"]: r for r in pl.read_parquet(layout.slides_manifest).to_dicts()}
    assert slides["good"]["status"] == "ok"
    assert slides["broken"]["status"] == "quarantined"
    assert slides["broken"]["reason"] == "tiling failed: mask is 64x64 px but ..."
    record = json.loads((layout.quarantine / "broken.json").read_text())
    assert record["reason"].startswith("tiling failed") and record["uri"] == "/data/broken.tif"
    assert not (layout.quarantine / "good.json").exists()
    checked = BoundaryCheck([], "", [])
    ingested = Ingested(str(layout.slides_manifest), (results[0],), (results[1],), checked)
    assert [q.slide_id for q in ingested.quarantined] == ["broken"]  # listed once
