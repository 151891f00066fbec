"""The tile grid and the tile manifest of one slide, and of many slides in parallel.

Tiles are square, cut at a working resolution, and recorded by their level-0 top-left corner
and level-0 extent; pixels are read later. A tile is kept when enough of it is tissue.

Manifests are partitioned by site and slide: `<root>/<site>/tiles/<slide_id>.parquet`, one file
per slide, under a local folder or an S3 prefix. A slide is committed in order: mask PNG and the
tissue-percentage overlay (`masks/tile-tissue/<slide_id>.png`, tasks/tiling/overlay.py), then the
manifest (whole-file writes: temporary name + rename locally, one PUT on S3), then
`<slide_id>.done.json` last. The marker carries a fingerprint of the slide's content hash and the
tiling settings, so a rerun skips a slide only when its marker exists and still matches: a run
killed at any point resumes without duplicate or missing tiles, and an unchanged slide is never
re-tiled. Tile ids (`<slide_id>:<x>:<y>`) and row order (row-major on the grid) are
deterministic, so a resumed run's manifests equal an uninterrupted run's row for row.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vadflow.tasks.manifests import SCHEMA_VERSION, TILE_SCHEMA, conform
from vadflow.tasks.site import QcConfig, TilingConfig
from vadflow.tasks.slides.ground_truth import ground_truth_mask
from vadflow.tasks.slides.identity import check_slide_id
from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.slides.storage import (
    StorageOptions,
    is_remote,
    join,
    local_path,
    storage_for,
    write_parquet,
)
from vadflow.tasks.tiling import mask as masking
from vadflow.tasks.tiling import overlay
from vadflow.tasks.tiling import qc as quality

# Part of every fingerprint: bump when the masking or grid code changes what it writes.
# 3: the tissue-percentage overlay PNG; 4: last row and column flush; 5: artefact QC
TILING_VERSION = 5


@dataclass(frozen=True)
class Geometry:
    """Where tiles come from: read level, tile size there, and the level-0 extent and step."""

    level: int
    size: int
    extent: int
    step: int
    mpp: float | None


def working_geometry(slide: Slide, mpp0: float | None, tiling: TilingConfig) -> Geometry:
    """Pick the pyramid level to read from so only what must be is downsampled."""
    wanted = 1.0 if tiling.target_mpp is None or mpp0 is None else tiling.target_mpp / mpp0
    level = slide.best_level_for_downsample(wanted)
    extent = max(1, round(tiling.tile_size * wanted))
    step = max(1, round(tiling.step * wanted))
    mpp = None if mpp0 is None or tiling.target_mpp is None else tiling.target_mpp
    return Geometry(level=level, size=tiling.tile_size, extent=extent, step=step, mpp=mpp)


def grid_starts(length: int, extent: int, step: int) -> np.ndarray:
    """Tile starts along one axis: every `step` from 0, plus one tile flush with the far edge
    when the grid leaves a strip there, so every pixel is in a tile. None when the image is
    shorter than one tile (no tile is padded with invented pixels)."""
    if length < extent:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, length - extent + 1, step, dtype=np.int64)
    if starts[-1] + extent < length:  # the strip the grid misses: a last tile, shifted inward
        starts = np.append(starts, np.int64(length - extent))
    return starts


def tile_origins(width: int, height: int, extent: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of the tiles covering the whole slide, row-major.

    Tiles lie on the grid (multiples of `step` from the origin), except the last column and row,
    which end flush with the right and bottom edges where the grid does not reach them: a
    224 px image in 64 px tiles is cut at 0, 64, 128 and 160, so no strip goes unscored.
    """
    gx, gy = np.meshgrid(grid_starts(width, extent, step), grid_starts(height, extent, step))
    return gx.ravel(), gy.ravel()


def coverage(
    mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, extent: int, ds: float
) -> np.ndarray:
    """Mean of a coarse mask (cell = `ds` level-0 px) over each tile's footprint."""
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(xs / ds).astype(int), 0, w)
    y0 = np.clip(np.floor(ys / ds).astype(int), 0, h)
    x1 = np.clip(np.ceil((xs + extent) / ds).astype(int), 0, w)
    y1 = np.clip(np.ceil((ys + extent) / ds).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return np.clip(total / area, 0.0, 1.0)


def mask_downsample(slide: Slide, mpp0: float | None, tiling: TilingConfig) -> float:
    """Level-0 px per mask cell: a pyramid level at `mask_mpp`-`mask_mpp_max` um/px if any."""
    return masking.mask_downsample(slide.levels, mpp0, (tiling.mask_mpp, tiling.mask_mpp_max))


def preset_for(tiling: TilingConfig, domain: str) -> masking.MaskPreset:
    """The site's mask preset, with the site's `min_object_um2` if it sets one."""
    preset = masking.mask_preset(tiling.mask_preset or masking.DEFAULT_PRESET[domain])
    if tiling.min_object_um2 is not None:
        preset = masking.MaskPreset(**{**asdict(preset), "min_object_um2": tiling.min_object_um2})
    return preset


@dataclass(frozen=True)
class TilingResult:
    slide_id: str
    tiles: int
    status: str  # ok | no_tissue | failed
    manifest: str  # local path or s3:// URI of the slide's tile manifest ("" when failed)
    mask_png: str
    tissue_fraction: float
    reason: str | None = None  # why a slide failed or has no tissue
    overlay_png: str = ""  # the tissue-percentage overlay (tasks/tiling/overlay.py)
    qc_png: str = ""  # the QC label image (tasks/tiling/qc.py); "" when QC did not run
    artefact_share: float | None = None  # share of the tissue under the QC mask


def slide_mask(
    slide: Slide, mpp0: float | None, tiling: TilingConfig, domain: str
) -> tuple[np.ndarray, float]:
    """(mask (H, W) bool, level-0 px per mask cell) for one slide."""
    ds = mask_downsample(slide, mpp0, tiling)
    if domain == "industrial" and not tiling.foreground_mask:
        shape = (int(np.ceil(slide.height / ds)), int(np.ceil(slide.width / ds)))
        return np.ones(shape, dtype=bool), ds  # the whole image: nothing to read
    thumb = slide.thumbnail(ds)  # (H, W, 3) uint8 at ~ds
    um_per_px = None if mpp0 is None else mpp0 * ds
    return masking.tissue_mask(thumb, preset_for(tiling, domain), um_per_px), ds


def runs_qc(qc: QcConfig | None, domain: str) -> bool:
    """Whether artefact QC runs: pathology slides, with the site's `qc.enabled`."""
    return qc is not None and qc.enabled and domain == "pathology" and bool(qc.kinds)


def slide_qc(
    slide: Slide, mpp0: float | None, tissue: np.ndarray, qc: QcConfig
) -> tuple[np.ndarray, float]:
    """(QC label image (h, w) uint8, level-0 px per QC pixel) for one slide; see tiling/qc.py."""
    ds = quality.qc_downsample(slide.width, slide.height, mpp0, qc.qc_mpp)
    rgb = slide.thumbnail(ds)  # (h, w, 3) uint8
    inside = quality.resize_mask(tissue, rgb.shape[:2])
    um_per_px = ds * (mpp0 if mpp0 is not None else 1.0)
    return quality.qc_labels(rgb, inside, um_per_px, qc.kinds, qc.edge_um), ds


def tile_slide(
    slide_row: dict,
    tiling: TilingConfig,
    domain: str,
    tiles_dir: str | Path,
    masks_dir: str | Path,
    storage: StorageOptions | None = None,
    qc: QcConfig | None = None,
) -> TilingResult:
    """Mask one slide, lay the grid, write `<tiles_dir>/<slide_id>.parquet` and the mask PNG.

    With `qc` (pathology), artefact QC runs on the tissue: its label image goes to
    `<masks_dir>/qc/<slide_id>.png`, its areas onto the overlay, and each tile's `artefact` is
    True where most of its tissue is under the QC mask.

    `tiles_dir` and `masks_dir` may be local folders or `s3://` prefixes. The done marker is
    written last (see the module docstring).
    """
    slide_id = check_slide_id(slide_row["slide_id"])  # it names files and keys below
    mpp0 = slide_row["mpp"]
    marker = _status_uri(tiles_dir, slide_id)
    # A marker from other settings goes first: a run killed below must not leave it beside a
    # manifest it does not describe.
    storage_for(marker, storage).delete(marker)
    with Slide(slide_row["uri"], storage) as slide:
        geometry = working_geometry(slide, mpp0, tiling)
        mask, ds = slide_mask(slide, mpp0, tiling, domain)
        width, height = slide.width, slide.height
        colourless = not mask.any() and _colourless(slide, ds, preset_for(tiling, domain))
        overlay_ds = overlay.overlay_downsample(width, height, geometry.extent)
        thumb = slide.thumbnail(overlay_ds)  # (H, W, 3) uint8
        labels, qc_ds = slide_qc(slide, mpp0, mask, qc) if runs_qc(qc, domain) else (None, 0.0)
    mask_png = join(masks_dir, f"{slide_id}.png")
    storage_for(mask_png, storage).write_bytes(mask_png, overlay.png_bytes(mask.astype(bool)))

    xs, ys = tile_origins(width, height, geometry.extent, geometry.step)
    tissue = coverage(mask, xs, ys, geometry.extent, ds)
    # Every grid tile, kept or not, so missed tissue shows up red.
    drawn = overlay.draw_tissue_overlay(
        thumb, xs, ys, geometry.extent, geometry.step, tissue, overlay_ds
    )
    qc_png, share, artefact = "", None, None
    if labels is not None:
        qc_png = join(masks_dir, quality.QC_DIR, f"{slide_id}.png")
        storage_for(qc_png, storage).write_bytes(qc_png, overlay.png_bytes(labels))
        flagged = labels > 0
        on_tissue = flagged & quality.resize_mask(mask, labels.shape)
        inside = quality.resize_mask(mask, labels.shape)
        share = float(on_tissue.sum() / inside.sum()) if inside.any() else 0.0
        drawn = overlay.draw_qc(drawn, quality.resize_mask(on_tissue, drawn.shape[:2]))
        # A tile is an artefact when most of its tissue is under QC.
        under = coverage(on_tissue, xs, ys, geometry.extent, qc_ds)
        artefact = (under > 0) & (under >= 0.5 * tissue)
    overlay_png = join(masks_dir, overlay.OVERLAY_DIR, f"{slide_id}.png")
    storage_for(overlay_png, storage).write_bytes(overlay_png, overlay.png_bytes(drawn))
    best_tile = float(tissue.max()) if tissue.size else 0.0
    keep = tissue >= tiling.min_tissue_fraction
    xs, ys, tissue = xs[keep], ys[keep], tissue[keep]
    if artefact is not None:
        artefact = artefact[keep]
    annotation = slide_row.get("annotation_uri")
    if annotation is not None and is_remote(annotation):
        annotation = str(local_path(annotation, storage))
    if annotation is None or len(xs) == 0:
        lesion = np.zeros(len(xs), dtype=np.float64)
    else:
        truth = ground_truth_mask(annotation, width, height, ds)
        lesion = coverage(truth, xs, ys, geometry.extent, ds)

    frame = tile_frame(slide_row, geometry, xs, ys, tissue, lesion, artefact)
    manifest = write_parquet(frame, join(tiles_dir, f"{slide_id}.parquet"), storage)
    result = TilingResult(
        slide_id=slide_id,
        tiles=frame.height,
        status="ok" if frame.height else "no_tissue",
        manifest=manifest,
        mask_png=mask_png,
        tissue_fraction=float(mask.mean()) if mask.size else 0.0,
        reason=None if frame.height else _no_tissue_reason(colourless, mask, best_tile, tiling),
        overlay_png=overlay_png,
        qc_png=qc_png,
        artefact_share=share,
    )
    # Written last: its presence (with a matching fingerprint) means this slide is done.
    fingerprint = tiling_fingerprint(slide_row["sha256"], tiling, domain, qc)
    body = json.dumps({"fingerprint": fingerprint, **asdict(result)}).encode()
    storage_for(marker, storage).write_bytes(marker, body)
    return result


def _colourless(slide: Slide, ds: float, preset: masking.MaskPreset) -> bool:
    """Whether a saturation mask could never find tissue here: R = G = B everywhere (greyscale)."""
    if preset.feature != "saturation":
        return False
    thumb = slide.thumbnail(ds).astype(np.int16)  # (H, W, 3), small: the mask's level
    return int((thumb.max(axis=2) - thumb.min(axis=2)).max()) <= 2


def _no_tissue_reason(
    colourless: bool, mask: np.ndarray, best_tile: float, tiling: TilingConfig
) -> str:
    """Why a slide has no tile, with what the mask found and the setting that would change it."""
    if colourless:
        return (
            "no tile reaches min_tissue_fraction: the slide is greyscale and the mask preset "
            "thresholds colour saturation; set tiling.mask_preset to 'object-dark' for a site "
            "of greyscale slides"
        )
    if not mask.any():
        return (
            "no tile reaches min_tissue_fraction: the mask found no tissue (all glass, or only "
            "pieces smaller than the preset's minimum object size); for small or faint tissue "
            "lower tiling.min_object_um2 or set tiling.mask_preset to 'he-faint'"
        )
    return (
        f"no tile reaches min_tissue_fraction: the mask finds tissue on {mask.mean():.1%} of "
        f"the slide, but the best tile is {best_tile:.0%} tissue, under "
        f"min_tissue_fraction={tiling.min_tissue_fraction:g}; lower it, or cut smaller tiles"
    )


def tile_frame(
    slide_row: dict,
    geometry: Geometry,
    xs: np.ndarray,
    ys: np.ndarray,
    tissue: np.ndarray,
    lesion: np.ndarray,
    artefact: np.ndarray | None = None,
) -> pl.DataFrame:
    """The manifest rows of one slide, in grid (row-major) order, with deterministic tile ids.

    `artefact` (bool per tile) is None when QC did not run: the column is null then."""
    slide_id = slide_row["slide_id"]
    tile_ids = [f"{slide_id}:{x}:{y}" for x, y in zip(xs.tolist(), ys.tolist(), strict=True)]
    frame = pl.DataFrame(
        {
            "schema_version": SCHEMA_VERSION,
            "site": slide_row["site"],
            "slide_id": slide_id,
            "tile_id": tile_ids,
            "level": geometry.level,
            "x": xs,
            "y": ys,
            "size": geometry.size,
            "extent": geometry.extent,
            "mpp": geometry.mpp,
            "tissue_fraction": tissue,
            "label_fraction": lesion,
            "split": slide_row["split"],
            "artefact": None if artefact is None else np.asarray(artefact, dtype=bool),
        },
        schema_overrides={"mpp": pl.Float64, "tile_id": pl.String, "artefact": pl.Boolean},
    )
    return conform(frame, TILE_SCHEMA)


def finished_tiling(
    slide_row: dict,
    tiling: TilingConfig,
    tiles_dir: str | Path,
    storage: StorageOptions | None = None,
    domain: str | None = None,
    qc: QcConfig | None = None,
) -> TilingResult | None:
    """The earlier result for this slide when its tiles are complete and still current."""
    marker = _status_uri(tiles_dir, slide_row["slide_id"])
    store = storage_for(marker, storage)
    try:
        status = json.loads(store.read_bytes(marker))
    except (FileNotFoundError, ValueError):
        return None
    fingerprint = status.pop("fingerprint", None)
    domains = [domain] if domain else ["pathology", "industrial"]
    known = {tiling_fingerprint(slide_row["sha256"], tiling, d, qc) for d in domains}
    if fingerprint not in known:
        return None
    manifest = status.get("manifest", "")
    if not manifest or not storage_for(manifest, storage).exists(manifest):
        return None
    return TilingResult(**status)


def _status_uri(tiles_dir: str | Path, slide_id: str) -> str:
    return join(tiles_dir, f"{slide_id}.done.json")


def tiling_fingerprint(
    slide_sha: str, tiling: TilingConfig, domain: str = "pathology", qc: QcConfig | None = None
) -> str:
    """Changes when the slide, the tiling or QC settings, the mask preset or this code change."""
    preset = asdict(preset_for(tiling, domain))
    checks = qc.model_dump(mode="json") if runs_qc(qc, domain) and qc is not None else None
    key = json.dumps(
        [TILING_VERSION, slide_sha, domain, tiling.model_dump(mode="json"), preset, checks],
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def tile_slide_safely(
    slide_row: dict,
    tiling: TilingConfig,
    domain: str,
    tiles_dir: str | Path,
    masks_dir: str | Path,
    storage: StorageOptions | None = None,
    qc: QcConfig | None = None,
) -> TilingResult:
    """`tile_slide`, but a slide that fails becomes a `failed` result with its reason."""
    try:
        return tile_slide(slide_row, tiling, domain, tiles_dir, masks_dir, storage, qc)
    except Exception as exc:  # one bad slide must not stop the batch
        return _failed(slide_row["slide_id"], exc)


def _failed(slide_id: str, exc: BaseException) -> TilingResult:
    last = traceback.format_exception_only(exc)[-1].strip()
    return TilingResult(
        slide_id=slide_id,
        tiles=0,
        status="failed",
        manifest="",
        mask_png="",
        tissue_fraction=0.0,
        reason=f"{slide_id}: tiling failed ({last})",
    )


def tile_slides(
    rows: Iterable[dict],
    tiling: TilingConfig,
    domain: str,
    tiles_dir: str | Path,
    masks_dir: str | Path,
    *,
    executor: Executor | None = None,
    storage: StorageOptions | None = None,
    on_result: Callable[[TilingResult], None] | None = None,
    qc: QcConfig | None = None,
) -> list[TilingResult]:
    """Tile every slide row, skipping finished ones; results in `rows` order.

    `executor` is any `concurrent.futures.Executor`: a `ProcessPoolExecutor` (use a "spawn" or
    "forkserver" context: libvips and OpenSlide threads do not survive fork) on one machine, or
    `distributed.Client(...).get_executor()` on a Dask cluster. None tiles here, one slide at a
    time. A slide that fails comes back with status `failed` and its reason; the rest go on.
    `on_result` is called in this process as each slide finishes (progress, logging).
    """
    rows = list(rows)
    results: list[TilingResult | None] = [None] * len(rows)
    pending: dict[Future, int] = {}
    for index, row in enumerate(rows):
        done = finished_tiling(row, tiling, tiles_dir, storage, domain, qc)
        if done is not None:
            results[index] = done
            if on_result is not None:
                on_result(done)
        elif executor is None:
            results[index] = tile_slide_safely(
                row, tiling, domain, tiles_dir, masks_dir, storage, qc
            )
            if on_result is not None:
                on_result(results[index])
        else:
            future = executor.submit(
                tile_slide_safely,
                row,
                tiling,
                domain,
                str(tiles_dir),
                str(masks_dir),
                storage,
                qc,
            )
            pending[future] = index
    for future in as_completed(pending):
        index = pending[future]
        try:
            results[index] = future.result()
        except Exception as exc:  # the worker itself died (killed, out of memory, crashed)
            results[index] = _failed(rows[index]["slide_id"], exc)
        if on_result is not None:
            on_result(results[index])
    return [r for r in results if r is not None]
