"""Register a slide: open it, fingerprint it, and record what the pipeline needs to know.

A slide that cannot be opened is quarantined with its reason; it never stops the batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl

from tasks.manifests import SCHEMA_VERSION, SLIDE_SCHEMA, conform
from tasks.slides.discover import SlideSource
from tasks.slides.reader import Slide, SlideOpenError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def register_slide(
    source: SlideSource, site: str, domain: str, mpp_override: float | None = None
) -> dict[str, Any]:
    """One slide-manifest row; status `quarantined` with a reason when the slide is unusable."""
    row: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "site": site,
        "slide_id": source.slide_id,
        "uri": source.uri,
        "sha256": None,
        "size_bytes": None,
        "format": None,
        "levels": None,
        "width": None,
        "height": None,
        "mpp": None,
        "mpp_source": "none",
        "label": source.label,
        "category": source.category,
        "split": source.split,
        "annotation_uri": source.annotation_uri,
        "status": "ok",
        "reason": None,
    }
    try:
        row["size_bytes"] = Path(source.uri).stat().st_size
        row["sha256"] = sha256_file(source.uri)
        slide = Slide(source.uri)
    except (OSError, SlideOpenError) as exc:
        return {**row, "status": "quarantined", "reason": str(exc)}
    row.update(
        format=slide.format, levels=slide.level_count, width=slide.width, height=slide.height
    )
    if slide.mpp is not None:
        row.update(mpp=slide.mpp, mpp_source="metadata")
    elif mpp_override is not None:
        row.update(mpp=mpp_override, mpp_source="site")
    elif domain == "pathology":
        return {
            **row,
            "status": "quarantined",
            "reason": f"{Path(source.uri).name}: no MPP in the file's metadata; "
            "set mpp_override in the site file if all its slides share one",
        }
    return row


def slide_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return conform(pl.DataFrame(rows, schema=SLIDE_SCHEMA), SLIDE_SCHEMA)


def write_quarantine(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One JSON file per quarantined slide, so an operator sees what failed and why."""
    written = []
    for row in rows:
        if row["status"] != "quarantined":
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{row['slide_id']}.json"
        path.write_text(json.dumps({k: row[k] for k in ("slide_id", "uri", "reason")}, indent=2))
        written.append(path)
    return written
