"""Score a slide's tiles in batches and stitch their anomaly maps into a slide heatmap.

Memory is bounded by one batch of tiles plus the heatmap itself (a slide at
1/`heatmap_downsample` scale), never the slide. Overlapping tiles are averaged.

Each heatmap is saved once, as `<slide>.heatmap.tif`: a tiled, zlib-compressed, pyramidal
float32 TIFF that carries its geometry (downsample, level-0 size, MPP), so it can be opened and
placed over its slide elsewhere (QuPath, libvips) and read back here (`load_heatmap`). Glass is
NaN and compresses to almost nothing; a raw `.npy` of a whole slide's heatmap at downsample 16
is ~300 MB. Runs from before this (`.heatmap.npy`) still load.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from vadflow.tasks.manifests import write_parquet_atomic
from vadflow.tasks.records import SlideScore
from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.slides.tiles import iter_tile_batches


def heatmap_shape(width: int, height: int, downsample: int) -> tuple[int, int]:
    return math.ceil(height / downsample), math.ceil(width / downsample)


class HeatmapAccumulator:
    """Running sum and count of anomaly values per heatmap cell; the mean is the heatmap."""

    def __init__(self, width: int, height: int, downsample: int) -> None:
        self.downsample = downsample
        self.total = np.zeros(heatmap_shape(width, height, downsample), dtype=np.float64)
        self.count = np.zeros_like(self.total)

    def add(self, x: int, y: int, extent: int, anomaly_map: torch.Tensor) -> None:
        """Paste one tile's (1, H, W) map over its level-0 footprint, resized by area."""
        ds = self.downsample
        rows, cols = self.total.shape
        x0, y0 = int(x // ds), int(y // ds)
        x1 = min(cols, max(x0 + 1, round((x + extent) / ds)))
        y1 = min(rows, max(y0 + 1, round((y + extent) / ds)))
        if x0 >= cols or y0 >= rows:
            return
        cell = F.adaptive_avg_pool2d(anomaly_map[None].float(), (y1 - y0, x1 - x0))[0, 0]
        self.total[y0:y1, x0:x1] += cell.numpy()
        self.count[y0:y1, x0:x1] += 1

    def heatmap(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.total / self.count
        out[self.count == 0] = np.nan
        return out.astype(np.float32)


def score_slide(
    detector,
    slide_row: dict,
    tiles: pl.DataFrame,
    out_dir: Path,
    heatmap_downsample: int,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SlideScore:
    """Score every tile of one slide; write its tile scores and heatmap under `out_dir`.

    `transform` maps a (B, H, W, 3) uint8 batch before scoring (e.g. stain normalisation).
    """
    slide_id = slide_row["slide_id"]
    slide = Slide(slide_row["uri"])
    accumulator = HeatmapAccumulator(slide.width, slide.height, heatmap_downsample)
    tile_ids: list[str] = []
    scores: list[float] = []
    # Positions (and the QC flag where tiling wrote one) go beside the scores: the tail slide
    # score (tasks/scoring/tail.py) reads where unlikely tiles lie from this file alone.
    carried = [c for c in ("x", "y", "extent", "artefact") if c in tiles.columns]
    columns: dict[str, list] = {c: [] for c in carried}
    for rows, pixels in iter_tile_batches(slide, tiles, batch_size):
        if transform is not None:
            pixels = transform(pixels)
        output = detector.score(pixels)  # anomaly_map (B, 1, H, W), tile_score (B,)
        for row, anomaly_map in zip(rows.iter_rows(named=True), output.anomaly_map, strict=True):
            accumulator.add(row["x"], row["y"], row["extent"], anomaly_map)
        tile_ids.extend(rows["tile_id"].to_list())
        for column in carried:
            columns[column].extend(rows[column].to_list())
        scores.extend(output.tile_score.tolist())
        if on_batch is not None:
            on_batch(rows.height)
    heatmap = accumulator.heatmap()
    out_dir.mkdir(parents=True, exist_ok=True)
    geometry = HeatmapGeometry(
        slide_id=slide_id,
        downsample=heatmap_downsample,
        level0_width=slide.width,
        level0_height=slide.height,
        mpp=slide_row.get("mpp"),
    )
    tiff_path = write_heatmap_tiff(out_dir / f"{slide_id}.heatmap.tif", heatmap, geometry)
    frame = pl.DataFrame(
        {"slide_id": slide_id, "tile_id": tile_ids, "score": scores},
        schema={"slide_id": pl.String, "tile_id": pl.String, "score": pl.Float64},
    )
    if carried:
        extra = pl.DataFrame(columns, schema={c: tiles.schema[c] for c in carried})
        frame = pl.concat([frame, extra], how="horizontal")
    scores_path = write_parquet_atomic(frame, out_dir / f"{slide_id}.tiles.parquet")
    finite = heatmap[np.isfinite(heatmap)]
    return SlideScore(
        slide_id=slide_id,
        tiles=len(scores),
        slide_score=float(finite.max()) if finite.size else float("nan"),
        heatmap=str(tiff_path),
        tile_scores=str(scores_path),
        heatmap_downsample=heatmap_downsample,
    )


HEATMAP_TIFF_KEY = "vadflow_heatmap"  # marks the ImageDescription JSON of a heatmap TIFF
TIFF_TILE_PX = 256


@dataclass(frozen=True)
class HeatmapGeometry:
    """Where a heatmap lies on its slide: heatmap pixel (row, col) covers level-0 pixels
    [col * downsample, (col + 1) * downsample) x [row * downsample, (row + 1) * downsample)."""

    slide_id: str
    downsample: int  # level-0 pixels per heatmap pixel, along each axis
    level0_width: int
    level0_height: int
    mpp: float | None  # level-0 um/px; None when the image has none (industrial)

    @property
    def heatmap_mpp(self) -> float | None:
        return None if self.mpp is None else self.mpp * self.downsample

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the heatmap at this downsample."""
        return heatmap_shape(self.level0_width, self.level0_height, self.downsample)


def _halve(heatmap: np.ndarray) -> np.ndarray:
    """Next pyramid level: the mean of each 2x2 block's scored cells; NaN where none is."""
    rows, cols = heatmap.shape
    padded = np.full((rows + rows % 2, cols + cols % 2), np.nan, dtype=np.float64)
    padded[:rows, :cols] = heatmap
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)  # (r, 2, c, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(blocks, axis=(1, 3)).astype(np.float32)


def write_heatmap_tiff(
    path: Path, heatmap: np.ndarray, geometry: HeatmapGeometry, tile: int = TIFF_TILE_PX
) -> Path:
    """Write `heatmap` as a tiled, zlib-compressed, pyramidal float32 TIFF; return its path.

    Values are the detector's raw anomaly scores (NaN where no tile was scored), not rescaled,
    so thresholds apply to the file as they do to the `.npy`. Level 0 is the heatmap itself;
    each SubIFD halves it (mean of scored cells) until the longer side fits one tile. The
    geometry goes in the ImageDescription as JSON (see `HeatmapGeometry`) and, when the MPP is
    known, in the resolution tags (pixels per centimetre, at this heatmap's own scale).
    """
    import tifffile

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != geometry.shape:
        raise ValueError(
            f"{geometry.slide_id}: heatmap is {heatmap.shape} but a {geometry.level0_width}x"
            f"{geometry.level0_height} slide at downsample {geometry.downsample} needs "
            f"{geometry.shape}"
        )
    levels = [heatmap]
    while max(levels[-1].shape) > tile:
        levels.append(_halve(levels[-1]))
    description = json.dumps(
        {
            HEATMAP_TIFF_KEY: 1,
            **asdict(geometry),
            "heatmap_mpp": geometry.heatmap_mpp,
            "levels": len(levels),
            "values": "float32 anomaly score of the detector; NaN: not scored (background)",
        }
    )
    if geometry.heatmap_mpp is not None:
        per_cm = 1e4 / geometry.heatmap_mpp
        resolution, unit = (per_cm, per_cm), "CENTIMETER"
    else:  # no physical size: heatmap pixels per level-0 pixel
        resolution, unit = (1 / geometry.downsample,) * 2, "NONE"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    options = {"tile": (tile, tile), "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(partial) as tif:
        tif.write(
            levels[0],
            subifds=len(levels) - 1,
            description=description,
            resolution=resolution,
            resolutionunit=unit,
            **options,
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)  # reduced-resolution image
    partial.replace(path)  # a reader never sees a half-written file
    return path


def read_heatmap_tiff(path: str | Path, level: int = 0) -> tuple[np.ndarray, HeatmapGeometry]:
    """A heatmap written by `write_heatmap_tiff` and its geometry, at pyramid `level`.

    At level k > 0 the returned geometry's downsample is the level-0 one times 2**k.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:  # not a TIFF: TiffFileError, a ValueError
        page = tif.pages.first
        try:
            meta = json.loads(page.description)
        except (TypeError, ValueError):
            meta = {}
        if not isinstance(meta, dict) or meta.get(HEATMAP_TIFF_KEY) != 1:
            raise ValueError(
                f"{path}: not a vadflow heatmap TIFF (no geometry in its ImageDescription); "
                "heatmap TIFFs are written by scoring as <slide>.heatmap.tif"
            )
        levels = tif.series[0].levels  # level 0, then the SubIFDs
        if not 0 <= level < len(levels):
            raise ValueError(
                f"{path}: level {level} asked, the file has levels 0-{len(levels) - 1}"
            )
        values = levels[level].asarray()
    geometry = HeatmapGeometry(
        slide_id=meta["slide_id"],
        downsample=int(meta["downsample"]) * 2**level,
        level0_width=int(meta["level0_width"]),
        level0_height=int(meta["level0_height"]),
        mpp=meta["mpp"],
    )
    return values, geometry


def load_heatmap(path: str | Path) -> np.ndarray:
    """A saved heatmap, (rows, cols) float32: a heatmap TIFF, or an older run's `.npy`."""
    if str(path).endswith(".npy"):
        return np.load(path)
    return read_heatmap_tiff(path)[0]


def heatmap_file_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of a saved heatmap without reading its values; OSError or ValueError when the
    file is missing or not one."""
    if str(path).endswith(".npy"):
        return tuple(np.load(path, mmap_mode="r").shape)
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tuple(tif.series[0].levels[0].shape)
