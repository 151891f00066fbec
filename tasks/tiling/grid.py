"""The tile grid and the tile manifest of one slide.

Tiles are square, cut at a working resolution, and recorded by their level-0 top-left corner
and level-0 extent; pixels are read later. A tile is kept when enough of it is tissue.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from tasks.manifests import SCHEMA_VERSION, TILE_SCHEMA, conform, write_parquet_atomic
from tasks.site import TilingConfig
from tasks.slides.ground_truth import ground_truth_mask
from tasks.slides.reader import Slide
from tasks.tiling.mask import MaskPreset, tissue_mask


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


def tile_origins(width: int, height: int, extent: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of every whole tile on the grid, row-major.

    Only tiles that fit inside the slide are cut, so no tile is padded with invented pixels.
    """
    xs = np.arange(0, max(width - extent, -1) + 1, step, dtype=np.int64)
    ys = np.arange(0, max(height - extent, -1) + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
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
    """Level-0 px per mask cell: about `mask_mpp`, never coarser than a fraction of a tile."""
    if mpp0 is None:
        return 1.0 if max(slide.width, slide.height) <= 4096 else 8.0
    return max(1.0, tiling.mask_mpp / mpp0)


@dataclass(frozen=True)
class TilingResult:
    slide_id: str
    tiles: int
    status: str  # ok | no_tissue
    manifest: str
    mask_png: str
    tissue_fraction: float


def tile_slide(
    slide_row: dict,
    tiling: TilingConfig,
    domain: str,
    tiles_dir: Path,
    masks_dir: Path,
) -> TilingResult:
    """Mask one slide, lay the grid, write `<tiles_dir>/<slide_id>.parquet` and the mask PNG."""
    slide = Slide(slide_row["uri"])
    mpp0 = slide_row["mpp"]
    slide_id = slide_row["slide_id"]
    geometry = working_geometry(slide, mpp0, tiling)
    ds = mask_downsample(slide, mpp0, tiling)
    thumb = slide.thumbnail(ds)
    if domain == "industrial" and not tiling.foreground_mask:
        mask = np.ones(thumb.shape[:2], dtype=bool)
    else:
        min_px = 0 if mpp0 is None else int(tiling.min_object_um2 / (mpp0 * ds) ** 2)
        mask = tissue_mask(thumb, MaskPreset(min_object_px=min_px))
    masks_dir.mkdir(parents=True, exist_ok=True)
    mask_png = masks_dir / f"{slide_id}.png"
    Image.fromarray((mask * 255).astype(np.uint8)).save(mask_png)

    xs, ys = tile_origins(slide.width, slide.height, geometry.extent, geometry.step)
    tissue = coverage(mask, xs, ys, geometry.extent, ds)
    keep = tissue >= tiling.min_tissue_fraction
    xs, ys, tissue = xs[keep], ys[keep], tissue[keep]
    truth = ground_truth_mask(slide_row["annotation_uri"], slide.width, slide.height, ds)
    lesion = coverage(truth, xs, ys, geometry.extent, ds)

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
        },
        schema_overrides={"mpp": pl.Float64, "tile_id": pl.String},
    )
    frame = conform(frame, TILE_SCHEMA)
    manifest = tiles_dir / f"{slide_id}.parquet"
    write_parquet_atomic(frame, manifest)
    result = TilingResult(
        slide_id=slide_id,
        tiles=frame.height,
        status="ok" if frame.height else "no_tissue",
        manifest=str(manifest),
        mask_png=str(mask_png),
        tissue_fraction=float(mask.mean()),
    )
    # Written last: its presence (with a matching fingerprint) means this slide is done.
    _status_path(tiles_dir, slide_id).write_text(
        json.dumps(
            {"fingerprint": tiling_fingerprint(slide_row["sha256"], tiling), **asdict(result)}
        )
    )
    return result


def finished_tiling(slide_row: dict, tiling: TilingConfig, tiles_dir: Path) -> TilingResult | None:
    """The earlier result for this slide when its tiles are complete and still current."""
    path = _status_path(tiles_dir, slide_row["slide_id"])
    if not path.exists():
        return None
    status = json.loads(path.read_text())
    fingerprint = status.pop("fingerprint", None)
    if fingerprint != tiling_fingerprint(slide_row["sha256"], tiling):
        return None
    if not Path(status["manifest"]).exists():
        return None
    return TilingResult(**status)


def _status_path(tiles_dir: Path, slide_id: str) -> Path:
    return tiles_dir / f"{slide_id}.done.json"


def tiling_fingerprint(slide_sha: str, tiling: TilingConfig) -> str:
    """Changes when the slide or the tiling settings change; an unchanged one is skipped."""
    return hashlib.sha256((slide_sha + tiling.model_dump_json()).encode()).hexdigest()[:16]
