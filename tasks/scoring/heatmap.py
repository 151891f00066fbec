"""Score a slide's tiles in batches and stitch their anomaly maps into a slide heatmap.

Memory is bounded by one batch of tiles, a band of heatmap rows and the heatmap's reduced
pyramid levels (a quarter of it and less), never the slide or its whole heatmap: tiles are
scored in row order, `HeatmapStrips` averages overlapping tiles in float32 over a band of rows
and hands out rows once no later tile can reach them, and `write_heatmap_tiff` compresses
them into the TIFF as they come.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from vadflow.tasks.manifests import write_parquet_atomic
from vadflow.tasks.records import SlideScore
from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.slides.tiles import PREFETCH_BATCHES, iter_tile_batches


def heatmap_shape(width: int, height: int, downsample: int) -> tuple[int, int]:
    return math.ceil(height / downsample), math.ceil(width / downsample)


def _footprint(
    x: int, y: int, extent: int, downsample: int, shape: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1): the heatmap cells a tile at level-0 (x, y) of side `extent`
    covers (at least one), or None when it lies past the heatmap's edge."""
    rows, cols = shape
    x0, y0 = int(x // downsample), int(y // downsample)
    if x0 >= cols or y0 >= rows:
        return None
    x1 = min(cols, max(x0 + 1, round((x + extent) / downsample)))
    y1 = min(rows, max(y0 + 1, round((y + extent) / downsample)))
    return y0, y1, x0, x1


def _resized(anomaly_map: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """A tile's (1, H, W) map resized by area to (rows, cols) float32 heatmap cells."""
    return F.adaptive_avg_pool2d(anomaly_map[None].float(), (rows, cols))[0, 0].numpy()


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """total / count as float32; NaN where nothing was added."""
    out = np.full(total.shape, np.nan, dtype=np.float32)
    np.divide(total, count, out=out, where=count > 0)
    return out


class HeatmapAccumulator:
    """Running sum and count of anomaly values per heatmap cell; the mean is the heatmap.

    The whole heatmap in float32 (8 bytes a cell), tiles in any order; scoring streams with
    `HeatmapStrips` instead, which holds a band of rows."""

    def __init__(self, width: int, height: int, downsample: int) -> None:
        self.downsample = downsample
        self.total = np.zeros(heatmap_shape(width, height, downsample), dtype=np.float32)
        self.count = np.zeros_like(self.total)

    def add(self, x: int, y: int, extent: int, anomaly_map: torch.Tensor) -> None:
        """Paste one tile's (1, H, W) map over its level-0 footprint, resized by area."""
        cells = _footprint(x, y, extent, self.downsample, self.total.shape)
        if cells is None:
            return
        y0, y1, x0, x1 = cells
        self.total[y0:y1, x0:x1] += _resized(anomaly_map, y1 - y0, x1 - x0)
        self.count[y0:y1, x0:x1] += 1

    def heatmap(self) -> np.ndarray:
        return _mean(self.total, self.count)


HEATMAP_BAND_ROWS = 256  # heatmap rows HeatmapStrips holds at first (grows to a tile's height)


class HeatmapStrips:
    """A heatmap built from tiles that arrive in order of y, handed out as finished rows.

    Holds float32 sum and count for a band of rows only (`HEATMAP_BAND_ROWS`, or a tile's
    footprint if taller): once a tile starts at heatmap row r, no later tile touches the rows
    above r, so they are final and leave as a strip (rows, cols) float32, NaN where no tile
    was scored. `add` and `close` return the strips that became final, top to bottom;
    together they tile the heatmap exactly. Memory: 8 bytes x band x heatmap width,
    whatever the slide's height.
    """

    def __init__(
        self, width: int, height: int, downsample: int, band_rows: int = HEATMAP_BAND_ROWS
    ) -> None:
        self.downsample = downsample
        self.shape = heatmap_shape(width, height, downsample)
        self.top = 0  # heatmap row of the band's first row; rows above it are handed out
        self.total = np.zeros((max(1, band_rows), self.shape[1]), dtype=np.float32)
        self.count = np.zeros_like(self.total)

    def add(self, x: int, y: int, extent: int, anomaly_map: torch.Tensor) -> list[np.ndarray]:
        """Add one tile's (1, H, W) map; return the strips its start row made final."""
        cells = _footprint(x, y, extent, self.downsample, self.shape)
        if cells is None:
            return []
        y0, y1, x0, x1 = cells
        if y0 < self.top:
            raise ValueError(
                f"tile at level-0 y={y} arrived after heatmap rows 0-{self.top - 1} were "
                "handed out: stream tiles in order of y (sort the tile manifest by y, x)"
            )
        done = []
        if y1 > self.top + len(self.total):
            done = self._release(y0)
            if y1 - self.top > len(self.total):  # a tile taller than the band: widen it
                grow = y1 - self.top - len(self.total)
                self.total = np.pad(self.total, ((0, grow), (0, 0)))
                self.count = np.pad(self.count, ((0, grow), (0, 0)))
        band = slice(y0 - self.top, y1 - self.top)
        self.total[band, x0:x1] += _resized(anomaly_map, y1 - y0, x1 - x0)
        self.count[band, x0:x1] += 1
        return done

    def close(self) -> list[np.ndarray]:
        """The rest of the heatmap, as strips; call once, after the last tile."""
        done = []
        while self.top < self.shape[0]:
            done += self._release(min(self.shape[0], self.top + len(self.total)))
        return done

    def _release(self, row: int) -> list[np.ndarray]:
        """Hand out rows [top, row) and move the band down to start at `row`."""
        n = row - self.top
        if n <= 0:
            return []
        band = len(self.total)
        kept = min(n, band)
        done = [_mean(self.total[:kept], self.count[:kept])]
        # Rows past the band no tile reached (glass): NaN strips, a band at a time.
        for start in range(self.top + kept, row, band):
            done.append(np.full((min(band, row - start), self.shape[1]), np.nan, np.float32))
        # Shift the band up (numpy buffers the overlapping copy) and clear what is new.
        for array in (self.total, self.count):
            array[: band - kept] = array[kept:]
            array[band - kept :] = 0
        self.top = row
        return done


def score_slide(
    detector,
    slide_row: dict,
    tiles: pl.DataFrame,
    out_dir: Path,
    heatmap_downsample: int,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    prefetch: int = PREFETCH_BATCHES,
) -> SlideScore:
    """Score every tile of one slide; write its tile scores and heatmap under `out_dir`.

    `transform` maps a (B, H, W, 3) uint8 batch before scoring (e.g. stain normalisation).
    `prefetch` batches are decoded ahead in a loader thread (0: decode in this thread, between
    forward passes; the results are the same).
    """
    slide_id = slide_row["slide_id"]
    slide = Slide(slide_row["uri"])
    # Row order (the tiler's grid order already) lets the heatmap leave in finished strips.
    tiles = tiles.sort(["y", "x"], maintain_order=True)
    stream = HeatmapStrips(slide.width, slide.height, heatmap_downsample)
    tile_ids: list[str] = []
    scores: list[float] = []
    finite_max = [-math.inf]  # largest finite heatmap value, updated as strips pass
    # Positions (and the QC flag where tiling wrote one) go beside the scores: the tail slide
    # score (tasks/scoring/tail.py) reads where unlikely tiles lie from this file alone.
    carried = [c for c in ("x", "y", "extent", "artefact") if c in tiles.columns]
    columns: dict[str, list] = {c: [] for c in carried}

    def heatmap_strips() -> Iterator[np.ndarray]:
        """Score the tiles batch by batch, yielding heatmap rows as they become final; the
        TIFF writer pulls these, so no whole-slide array is ever held."""
        # The loader decodes (and transforms) the next batches while this one is scored.
        batches = iter_tile_batches(slide, tiles, batch_size, prefetch, transform)
        for rows, pixels in batches:
            output = detector.score(pixels)  # anomaly_map (B, 1, H, W), tile_score (B,)
            for row, anomaly_map in zip(
                rows.iter_rows(named=True), output.anomaly_map, strict=True
            ):
                yield from stream.add(row["x"], row["y"], row["extent"], anomaly_map)
            tile_ids.extend(rows["tile_id"].to_list())
            for column in carried:
                columns[column].extend(rows[column].to_list())
            scores.extend(output.tile_score.tolist())
            if on_batch is not None:
                on_batch(rows.height)
        yield from stream.close()

    def watched(strips: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for strip in strips:
            finite = strip[np.isfinite(strip)]
            if finite.size:
                finite_max[0] = max(finite_max[0], float(finite.max()))
            yield strip

    out_dir.mkdir(parents=True, exist_ok=True)
    geometry = HeatmapGeometry(
        slide_id=slide_id,
        downsample=heatmap_downsample,
        level0_width=slide.width,
        level0_height=slide.height,
        mpp=slide_row.get("mpp"),
    )
    tiff_path = write_heatmap_tiff(
        out_dir / f"{slide_id}.heatmap.tif", watched(heatmap_strips()), geometry
    )
    frame = pl.DataFrame(
        {"slide_id": slide_id, "tile_id": tile_ids, "score": scores},
        schema={"slide_id": pl.String, "tile_id": pl.String, "score": pl.Float64},
    )
    if carried:
        extra = pl.DataFrame(columns, schema={c: tiles.schema[c] for c in carried})
        frame = pl.concat([frame, extra], how="horizontal")
    scores_path = write_parquet_atomic(frame, out_dir / f"{slide_id}.tiles.parquet")
    return SlideScore(
        slide_id=slide_id,
        tiles=len(scores),
        slide_score=finite_max[0] if math.isfinite(finite_max[0]) else float("nan"),
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
    path: Path,
    heatmap: np.ndarray | Iterable[np.ndarray],
    geometry: HeatmapGeometry,
    tile: int = TIFF_TILE_PX,
) -> Path:
    """Write a heatmap as a tiled, zlib-compressed, pyramidal float32 TIFF; return its path.

    `heatmap` is the whole (rows, cols) array, or an iterable of strips (k, cols) that stack,
    top to bottom, into it (as `HeatmapStrips` hands them out): then level 0 is compressed
    and written a band of `tile` rows at a time as the strips arrive, and only the reduced
    levels (a quarter of the heatmap and less) are held until the end.

    Values are the detector's raw anomaly scores (NaN where no tile was scored), not rescaled,
    so thresholds apply to the file as they do to the `.npy`. Level 0 is the heatmap itself;
    each SubIFD halves it (mean of scored cells) until the longer side fits one tile. The
    geometry goes in the ImageDescription as JSON (see `HeatmapGeometry`) and, when the MPP is
    known, in the resolution tags (pixels per centimetre, at this heatmap's own scale).
    """
    import tifffile

    if tile % 16:
        raise ValueError(f"TIFF tiles are a multiple of 16 pixels, got {tile}")
    rows, cols = geometry.shape
    if isinstance(heatmap, np.ndarray):
        if heatmap.shape != geometry.shape:
            raise ValueError(
                f"{geometry.slide_id}: heatmap is {heatmap.shape} but a "
                f"{geometry.level0_width}x{geometry.level0_height} slide at downsample "
                f"{geometry.downsample} needs {geometry.shape}"
            )
        heatmap = [heatmap]
    shapes = [(rows, cols)]
    while max(shapes[-1]) > tile:
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    description = json.dumps(
        {
            HEATMAP_TIFF_KEY: 1,
            **asdict(geometry),
            "heatmap_mpp": geometry.heatmap_mpp,
            "levels": len(shapes),
            "values": "float32 anomaly score of the detector; NaN: not scored (background)",
        }
    )
    if geometry.heatmap_mpp is not None:
        per_cm = 1e4 / geometry.heatmap_mpp
        resolution, unit = (per_cm, per_cm), "CENTIMETER"
    else:  # no physical size: heatmap pixels per level-0 pixel
        resolution, unit = (1 / geometry.downsample,) * 2, "NONE"
    halves: list[np.ndarray] = []  # level 1, a band at a time

    def level0_tiles() -> Iterator[np.ndarray]:
        """Level 0 as tifffile wants it: tiles in row-major order, a band of `tile` rows at a
        time. Each band's half goes to level 1 (bands start on even rows, so halving band by
        band equals halving the whole)."""
        done = 0
        for band in _bands(heatmap, tile, geometry):
            done += len(band)
            if len(shapes) > 1:
                halves.append(_halve(band))
            for col in range(0, cols, tile):
                yield band[:, col : col + tile]  # tifffile zero-pads edge tiles
        if done != rows:
            raise ValueError(
                f"{geometry.slide_id}: heatmap strips gave {done} rows, its geometry needs {rows}"
            )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    options = {"tile": (tile, tile), "compression": "zlib", "metadata": None}
    try:
        with tifffile.TiffWriter(partial) as tif:
            tif.write(
                level0_tiles(),
                shape=(rows, cols),
                dtype=np.float32,
                subifds=len(shapes) - 1,
                description=description,
                resolution=resolution,
                resolutionunit=unit,
                **options,
            )
            level = np.concatenate(halves) if halves else None
            halves.clear()
            for _ in shapes[1:]:
                tif.write(level, subfiletype=1, **options)  # reduced-resolution image
                level = _halve(level)
    except BaseException:
        partial.unlink(missing_ok=True)  # a failed scoring leaves no half-written heatmap
        raise
    partial.replace(path)  # a reader never sees a half-written file
    return path


def _bands(
    strips: Iterable[np.ndarray], height: int, geometry: HeatmapGeometry
) -> Iterator[np.ndarray]:
    """Regroup strips (k, cols) of any heights into float32 bands of `height` rows (the last
    one shorter), copying only strips that straddle a band edge."""
    cols = geometry.shape[1]
    pending: list[np.ndarray] = []
    have = 0
    for strip in strips:
        strip = np.asarray(strip, dtype=np.float32)
        if strip.ndim != 2 or strip.shape[1] != cols:
            raise ValueError(
                f"{geometry.slide_id}: heatmap strip of shape {strip.shape}, expected "
                f"(rows, {cols})"
            )
        while len(strip):
            take = min(height - have, len(strip))
            pending.append(strip[:take])
            have += take
            strip = strip[take:]
            if have == height:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, have = [], 0
    if pending:
        yield np.concatenate(pending)


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
