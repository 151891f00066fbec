"""Register a slide: open it, fingerprint it, and record what the pipeline needs to know.

A slide that cannot be opened, whose TIFF structure is damaged (truncated, a tile that is not
JPEG data), whose ASAP annotation cannot be read, whose MPP is missing or absurd, or that
discovery rejected (a link out of the site, two files for one slide id) is quarantined with its
reason; it never stops the batch. Where the MPP came from is recorded: `metadata` (the file), `site`
(the site file's `mpp_override`, used when the file has none or an implausible one) or `none`
(industrial images, which need none).

A rerun costs what changed (`register_slides`): each slide is fingerprinted cheaply (size,
mtime, inode and a hash of its first and last 64 KiB; the ETag on S3) and its full sha256 is
computed only when it is first seen or its fingerprint changed. A slide whose fingerprint and
registration inputs (its place in the site, annotation file, site settings, code version) are
unchanged keeps its previous manifest row, TIFF structure check included: nothing is opened.
The fingerprints live in `<outputs>/<site>/slide_index.json`, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    split_member,
    storage_for,
)

DEFAULT_MPP_BOUNDS = (0.05, 20.0)  # um/px: a 0.5x overview to a 200x oil objective
NOT_HASHED = ""  # sha256 of a quarantined slide whose bytes were never read
INDEX_FILE = "slide_index.json"  # fingerprints and rows of registered slides, per site
INDEX_VERSION = 1
SAMPLE_BYTES = 64 * 1024  # hashed from each end of a file: a cheap check that catches edits


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
    known_sha256: str | None = None,
) -> dict[str, Any]:
    """One slide-manifest row; status `quarantined` with a reason when the slide is unusable.

    With `limits`, a slide whose header says it is too large to mask (`Slide`'s
    `max_decode_megapixels`) or to tile (`tile_count_problem`) is quarantined before any pixel
    is decoded. `known_sha256` is the slide's content hash when its fingerprint says it is
    unchanged since it was last hashed (`register_slides`): the file is then not read twice.
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
        row["sha256"] = known_sha256 or slide_sha256(source.uri, storage)
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


# --- a rerun costs what changed -------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What says a slide file is the one hashed before, without reading it all.

    Local files: size, mtime (ns), inode and `sample` (sha256 of the first and last
    `SAMPLE_BYTES`, which catches an edit that kept the size and restored the mtime). S3
    objects: size and ETag (the store's own content tag; no byte is fetched)."""

    size: int
    mtime_ns: int | None = None
    inode: int | None = None
    etag: str | None = None
    sample: str = ""


def fingerprint(uri: str, storage: StorageOptions | None = None) -> Fingerprint:
    """The cheap fingerprint of a slide (a stat and 128 KiB read, or a HEAD request)."""
    container, _ = split_member(uri)
    store = storage_for(container, storage)
    if is_remote(container):
        return Fingerprint(size=store.size(container), etag=store.etag(container))
    stat = os.stat(container)
    digest = hashlib.sha256()
    with open(container, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if stat.st_size > SAMPLE_BYTES:
            handle.seek(max(SAMPLE_BYTES, stat.st_size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
    return Fingerprint(stat.st_size, stat.st_mtime_ns, stat.st_ino, None, digest.hexdigest())


class SlideIndex:
    """The site's fingerprint index: per slide URI its fingerprint, full sha256 and the
    manifest row it was registered as (with the key of the inputs that row came from).

    Stored as JSON under the site's outputs (`INDEX_FILE`); a missing, unreadable or
    older-version index is an empty one (every slide is hashed again, nothing is lost)."""

    def __init__(self, uri: str, storage: StorageOptions | None = None) -> None:
        self.uri = uri
        self.storage = storage
        self.entries: dict[str, dict[str, Any]] = {}
        store = storage_for(uri, storage)
        try:
            if store.exists(uri):
                body = json.loads(store.read_bytes(uri))
                if body.get("version") == INDEX_VERSION:
                    self.entries = dict(body.get("slides", {}))
        except (OSError, ValueError):
            self.entries = {}  # a damaged index costs one full rehash, never a wrong row

    def known_sha256(self, uri: str, found: Fingerprint) -> str | None:
        """The slide's full sha256 if its fingerprint is the one recorded with it."""
        entry = self.entries.get(uri)
        if entry is None or entry.get("fingerprint") != asdict(found):
            return None
        return entry.get("sha256") or None

    def known_row(self, uri: str, found: Fingerprint, key: str) -> dict[str, Any] | None:
        """The slide's previous usable row if neither its bytes nor its inputs changed."""
        entry = self.entries.get(uri)
        if self.known_sha256(uri, found) is None or entry.get("key") != key:
            return None
        row = entry.get("row")
        return dict(row) if row and row.get("status") == "ok" else None

    def record(self, uri: str, found: Fingerprint, key: str, row: dict[str, Any]) -> None:
        if not row.get("sha256"):  # never read: nothing to remember
            self.entries.pop(uri, None)
            return
        self.entries[uri] = {
            "fingerprint": asdict(found),
            "sha256": row["sha256"],
            "key": key,
            "row": row,
        }

    def save(self, keep: set[str]) -> None:
        """Write the index atomically, keeping only the slides of this run (`keep`)."""
        slides = {u: e for u, e in sorted(self.entries.items()) if u in keep}
        body = json.dumps({"version": INDEX_VERSION, "slides": slides}, default=str)
        storage_for(self.uri, self.storage).write_bytes(self.uri, body.encode())


@dataclass
class Registration:
    """The rows of one registration pass and what it cost: the slides whose full sha256 was
    computed, and those whose earlier row was reused without opening the file."""

    rows: list[dict[str, Any]]
    hashed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def registration_key(
    source: SlideSource,
    site: str,
    domain: str,
    settings: dict[str, Any],
    storage: StorageOptions | None = None,
) -> str | None:
    """A hash of everything besides the slide's bytes that its manifest row depends on: where
    it sits in the site (label, split, category, annotation and that file's fingerprint), the
    site's registration settings and the code version. None when the annotation cannot be
    fingerprinted (the slide is registered again, which reports why)."""
    from vadflow import __version__

    annotation = None
    if source.annotation_uri is not None:
        container, _ = split_member(source.annotation_uri)
        try:
            if is_remote(container):
                annotation = storage_for(container, storage).etag(container)
            else:
                stat = os.stat(container)
                annotation = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        except OSError:
            return None
    body = {
        "source": asdict(source),
        "annotation": annotation,
        "site": site,
        "domain": domain,
        "settings": settings,
        "schema": SCHEMA_VERSION,
        "code": __version__,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def register_slides(
    sources: Sequence[SlideSource],
    site: str,
    domain: str,
    mpp_override: float | None = None,
    mpp_bounds: tuple[float, float] = DEFAULT_MPP_BOUNDS,
    storage: StorageOptions | None = None,
    tiling: TilingConfig | None = None,
    limits: LimitsConfig | None = None,
    *,
    index_uri: str | None = None,
    force: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Registration:
    """Register every slide, reusing what the index at `index_uri` knows (see the module's
    docstring); `force` hashes and opens every slide again. `on_row` is called with each row
    as it is ready (progress). Without `index_uri` every slide is registered from scratch."""
    index = SlideIndex(index_uri, storage) if index_uri is not None else None
    settings = {
        "mpp_override": mpp_override,
        "mpp_bounds": list(mpp_bounds),
        "tiling": tiling.model_dump() if tiling is not None else None,
        "limits": limits.model_dump() if limits is not None else None,
    }
    out = Registration(rows=[])
    for source in sources:
        row, found, key = None, None, None
        if index is not None and source.reject is None:
            try:
                found = fingerprint(source.uri, storage)
            except (OSError, ValueError):
                found = None  # unreachable or gone: register_slide says why and quarantines
            key = registration_key(source, site, domain, settings, storage)
        known = None if force or found is None else index.known_sha256(source.uri, found)
        if known is not None and key is not None:
            row = index.known_row(source.uri, found, key)
        if row is not None:
            out.reused.append(source.slide_id)
        else:
            row = register_slide(
                source,
                site,
                domain,
                mpp_override,
                mpp_bounds,
                storage,
                tiling=tiling,
                limits=limits,
                known_sha256=known,
            )
            if known is None and row["sha256"]:
                out.hashed.append(source.slide_id)
        if index is not None and found is not None and key is not None:
            index.record(source.uri, found, key, row)
        out.rows.append(row)
        if on_row is not None:
            on_row(row)
    if index is not None:
        index.save({s.uri for s in sources})
    return out
