"""Register a slide: open it, fingerprint it, and record what the pipeline needs to know.

A slide that cannot be opened, whose TIFF structure is damaged (truncated, a tile that is not
JPEG data), whose ASAP annotation cannot be read, whose MPP is missing or absurd, or that
discovery rejected (a link out of the site, two files for one slide id) is quarantined with its
reason; it never stops the batch. Where the MPP came from is recorded: `metadata` (the file), `site`
(the site file's `mpp_override`, used when the file has none or an implausible one) or `none`
(industrial images, which need none).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl

from vadflow.tasks.manifests import SCHEMA_VERSION, SLIDE_SCHEMA, conform
from vadflow.tasks.site import LimitsConfig, TilingConfig
from vadflow.tasks.slides.annotations import read_asap_xml
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.identity import check_slide_id
from vadflow.tasks.slides.reader import TIFF_FORMATS, Slide, tiff_damage
from vadflow.tasks.slides.storage import (
    StorageOptions,
    is_remote,
    join,
    local_path,
    name_of,
    storage_for,
)

DEFAULT_MPP_BOUNDS = (0.05, 20.0)  # um/px: a 0.5x overview to a 200x oil objective
NOT_HASHED = ""  # sha256 of a quarantined slide whose bytes were never read


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
    tiling: TilingConfig | None = None,
    limits: LimitsConfig | None = None,
) -> dict[str, Any]:
    """One slide-manifest row; status `quarantined` with a reason when the slide is unusable.

    With `limits`, a slide whose header says it is too large to mask (`Slide`'s
    `max_decode_megapixels`) or to tile (`tile_count_problem`) is quarantined before any pixel
    is decoded.
    """
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
    if source.reject is not None:  # never opened: it may lie outside the site, or be ambiguous
        return _quarantined(row, source.reject)
    try:
        row["size_bytes"] = storage_for(source.uri, storage).size(source.uri)
        row["sha256"] = slide_sha256(source.uri, storage)
        max_mp = limits.max_mask_megapixels if limits is not None else None
        with Slide(source.uri, storage, max_decode_megapixels=max_mp) as slide:
            row.update(
                format=slide.format,
                levels=slide.level_count,
                width=slide.width,
                height=slide.height,
            )
            found = slide.mpp
            damage = tiff_damage(slide.path) if slide.format in TIFF_FORMATS else None
        if damage is not None:
            raise ValueError(damage)
        if source.annotation_uri is not None and source.annotation_uri.lower().endswith(".xml"):
            _check_annotation(source.annotation_uri, storage)
        elif source.annotation_uri is not None:
            _check_mask_size(source.annotation_uri, row["width"], row["height"], storage)
    except Exception as exc:  # unreadable, truncated, not an image, unreachable: quarantine
        reason = str(exc) if name in str(exc) else f"{name}: {exc}"
        return _quarantined(row, reason)
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
        return _quarantined(
            row, f"{why}; set mpp_override in the site file if all its slides share one"
        )
    # Industrial images need no MPP; an absurd one (a 72-dpi PNG) is simply not used.
    if limits is not None and (too_many := tile_count_problem(row, tiling, limits)):
        return _quarantined(row, f"{name}: {too_many}")
    return row


def grid_count(length: int, extent: int, step: int) -> int:
    """Tiles along one axis of the grid `tasks.tiling.grid.tile_origins` cuts (with the flush
    last tile), counted without building it."""
    if length < extent:
        return 0
    on_grid = (length - extent) // step + 1
    return on_grid + (1 if (on_grid - 1) * step + extent < length else 0)


def tile_grid(row: dict[str, Any], tiling: TilingConfig | None) -> tuple[int, int, int]:
    """(grid positions, tile extent, step) in level-0 px of a registered slide, from its size
    and MPP alone."""
    tiling = tiling or TilingConfig()
    scale = tiling.target_mpp / row["mpp"] if tiling.target_mpp and row["mpp"] else 1.0
    extent = max(1, round(tiling.tile_size * scale))
    step = max(1, round(tiling.step * scale))
    tiles = grid_count(row["width"], extent, step) * grid_count(row["height"], extent, step)
    return tiles, extent, step


def run_tile_budget_problem(
    rows: list[dict[str, Any]], tiling: TilingConfig | None, limits: LimitsConfig
) -> str | None:
    """Why the usable slides of a run hold more tile positions than `limits.max_tiles_per_run`
    (naming the three largest), or None."""
    counts = sorted(((tile_grid(r, tiling)[0], r["slide_id"]) for r in rows), reverse=True)
    total = sum(n for n, _ in counts)
    if total <= limits.max_tiles_per_run:
        return None
    largest = ", ".join(f"{s} ({n:,})" for n, s in counts[:3])
    return (
        f"the {len(rows)} slides to tile hold {total:,} tile positions, more than "
        f"limits.max_tiles_per_run ({limits.max_tiles_per_run:,}); largest: {largest}. "
        "Raise the limit, tile coarser (tiling.target_mpp, tile_size), or split the site"
    )


def tile_count_problem(
    row: dict[str, Any], tiling: TilingConfig | None, limits: LimitsConfig
) -> str | None:
    """Why a registered slide has too many tile positions to process, from its size and MPP
    alone; None if it fits. (Too many pixels to mask is caught when the slide is opened.)"""
    tiles, extent, step = tile_grid(row, tiling)
    if tiles > limits.max_tiles_per_slide:
        return (
            f"{row['width']:,} x {row['height']:,} px makes {tiles:,} tiles of {extent} px every "
            f"{step} px, more than limits.max_tiles_per_slide ({limits.max_tiles_per_slide:,}); "
            "raise the limit, or use larger tiles or a coarser tiling.target_mpp"
        )
    return None


def _quarantined(row: dict[str, Any], reason: str) -> dict[str, Any]:
    # A file never read (a link out of the site, an unreachable object) has no content hash;
    # "" says so without breaking the manifest contract's non-null sha256.
    return {**row, "sha256": row["sha256"] or NOT_HASHED, "status": "quarantined", "reason": reason}


def _check_mask_size(uri: str, width: int, height: int, storage: StorageOptions | None) -> None:
    """A ground-truth mask image must cover its image pixel for pixel; read from its header
    only, so a wrong one is a quarantine reason at registration, not a tiling failure."""
    import pyvips

    try:
        mask = pyvips.Image.new_from_file(str(local_path(uri, storage)), access="sequential")
    except pyvips.Error as exc:
        raise ValueError(f"mask {name_of(uri)} cannot be read ({exc}); fix or remove it") from None
    if (mask.width, mask.height) != (width, height):
        raise ValueError(
            f"mask {name_of(uri)} is {mask.width}x{mask.height} px but its image is "
            f"{width}x{height}; a mask must match its image (fix or remove it)"
        )


def _check_annotation(uri: str, storage: StorageOptions | None) -> None:
    """Read the slide's ASAP XML now, so a broken one is a quarantine reason, not a tiling crash."""
    try:
        read_asap_xml(local_path(uri, storage))
    except ValueError as exc:
        raise ValueError(
            f"annotation {name_of(uri)} cannot be used ({exc}); fix or remove it, the slide's "
            "label and lesion ground truth come from it"
        ) from None


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
        uri = join(folder, f"{check_slide_id(row['slide_id'])}.json")
        if row["status"] != "quarantined":
            if store.exists(uri):
                store.delete(uri)
            continue
        body = json.dumps({k: row[k] for k in ("slide_id", "uri", "reason")}, indent=2)
        store.write_bytes(uri, body.encode())
        written.append(uri)
    return written if is_remote(folder) else [Path(p) for p in written]
