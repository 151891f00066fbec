"""Register a slide: open it, fingerprint it, and record what the pipeline needs to know.

A slide that cannot be opened, or whose MPP is missing or absurd, is quarantined with its reason;
it never stops the batch. Where the MPP came from is recorded: `metadata` (the file), `site`
(the site file's `mpp_override`, used when the file has none or an implausible one) or `none`
(industrial images, which need none).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl

from tasks.manifests import SCHEMA_VERSION, SLIDE_SCHEMA, conform
from tasks.slides.discover import SlideSource
from tasks.slides.reader import Slide
from tasks.slides.storage import (
    StorageOptions,
    is_remote,
    join,
    local_path,
    name_of,
    storage_for,
)

DEFAULT_MPP_BOUNDS = (0.05, 20.0)  # um/px: a 0.5x overview to a 200x oil objective


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def slide_sha256(uri: str, storage: StorageOptions | None = None) -> str:
    """Content hash of a slide; for S3, of the cached download (remembered beside it)."""
    path = local_path(uri, storage)
    if not is_remote(uri):
        return sha256_file(path)
    sidecar = path.with_name(path.name + ".sha256")  # the cache folder is keyed by ETag
    if sidecar.is_file():
        return sidecar.read_text().strip()
    digest = sha256_file(path)
    sidecar.write_text(digest)
    return digest


def register_slide(
    source: SlideSource,
    site: str,
    domain: str,
    mpp_override: float | None = None,
    mpp_bounds: tuple[float, float] = DEFAULT_MPP_BOUNDS,
    storage: StorageOptions | None = None,
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
    name = name_of(source.uri)
    try:
        row["size_bytes"] = storage_for(source.uri, storage).size(source.uri)
        row["sha256"] = slide_sha256(source.uri, storage)
        with Slide(source.uri, storage) as slide:
            row.update(
                format=slide.format,
                levels=slide.level_count,
                width=slide.width,
                height=slide.height,
            )
            found = slide.mpp
    except Exception as exc:  # unreadable, truncated, not an image, unreachable: quarantine
        reason = str(exc) if name in str(exc) else f"{name}: {exc}"
        return {**row, "status": "quarantined", "reason": reason}
    lo, hi = mpp_bounds
    plausible = found is not None and lo <= found <= hi
    if plausible:
        row.update(mpp=found, mpp_source="metadata")
    elif mpp_override is not None:
        row.update(mpp=mpp_override, mpp_source="site")
    elif domain == "pathology":
        if found is None:
            why = f"{name}: no MPP in the file's metadata"
        else:
            why = (
                f"{name}: MPP {found:.4g} um/px in the file's metadata is outside the "
                f"plausible {lo:g}-{hi:g} um/px"
            )
        return {
            **row,
            "status": "quarantined",
            "reason": f"{why}; set mpp_override in the site file if all its slides share one",
        }
    # Industrial images need no MPP; an absurd one (a 72-dpi PNG) is simply not used.
    return row


def slide_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return conform(pl.DataFrame(rows, schema=SLIDE_SCHEMA), SLIDE_SCHEMA)


def write_quarantine(
    rows: list[dict[str, Any]], folder: str | Path, storage: StorageOptions | None = None
) -> list[Path] | list[str]:
    """One JSON file per quarantined slide, so an operator sees what failed and why.

    `folder` is a local folder (Paths come back) or an `s3://` prefix (URIs come back). The
    reason file of a slide that is usable again is removed.
    """
    store = storage_for(folder, storage)
    written = []
    for row in rows:
        uri = join(folder, f"{row['slide_id']}.json")
        if row["status"] != "quarantined":
            if store.exists(uri):
                store.delete(uri)
            continue
        body = json.dumps({k: row[k] for k in ("slide_id", "uri", "reason")}, indent=2)
        store.write_bytes(uri, body.encode())
        written.append(uri)
    return written if is_remote(folder) else [Path(p) for p in written]
