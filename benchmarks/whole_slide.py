"""Peak memory and seconds of one whole slide, scoring to export, on a Camelyon-size slide.

    .venv/bin/python benchmarks/whole_slide.py            # 100,000 x 200,000 px slide
    .venv/bin/python benchmarks/whole_slide.py --quick    # 25,000 x 50,000 px, for CI-like runs

The slide is made lazily by libvips as a real tiled, pyramidal JPEG TIFF (a textured tissue
patch repeated inside a few blobs of tissue, white glass elsewhere), written to a temporary
folder (`--workdir`) and deleted at the end; its size is printed. Then, for that one slide:
scoring (`score_slide` with a cheap darkness scorer through the detectors' `score` interface,
tiles of `--extent` level-0 px read at 128 px, every tissue tile), aggregation (heatmap read
back, `slide_features`), `lesion_candidates`, and export as `vadflow export` does it (the
strongest regions, as many as the candidates cap, to GeoJSON and ASAP XML with the strongest
candidates, and the overlay drawn from the heatmap's pyramid level on a slide thumbnail).
Each stage's peak RSS comes from a thread sampling /proc every 20 ms.

Beside today's approach, in the same run: the float64 heatmap accumulator's memory (computed:
sum, count, the division and the float32 copy, 28 bytes a cell, as the old `heatmap()` made
them) against the streamed one's measured; the old `lesion_candidates` (an argsort of the whole
label image) against the new one on the same crop of the heatmap; the old `slide_features`
(whole-slide float64 copies) and the old region export (every region outlined and written)
against the new ones on that crop, values checked equal; and the tile cache's bytes
for 2,000 level-0 tiles against those tiles' JPEG bytes in the slide and the decoded pixels
the cache stored before.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy import ndimage

PAGE = resource.getpagesize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRss:
    """The largest RSS seen while the block runs (sampled every 20 ms, and at both ends)."""

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_slide(path: Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Write a `width` x `height` JPEG pyramidal TIFF lazily; return its tissue mask at 1/1024.

    Nothing the size of the slide is held: libvips pulls the replicated texture through the
    tissue mask (upsampled from 1/1024, nearest) strip by strip while it encodes."""
    import pyvips

    from vadflow.tasks.synth.pathology import save_slide_tiff

    rng = np.random.default_rng(seed)
    # A 1024 px tissue texture: pink stroma with dark nuclei-like specks.
    noise = ndimage.gaussian_filter(rng.random((1024, 1024)), 2.0)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    texture = np.stack([225 - 60 * noise, 160 - 90 * noise, 200 - 50 * noise], axis=-1)
    texture = pyvips.Image.new_from_array(texture.astype(np.uint8))
    # Tissue: a few blobs on a 1/1024 grid.
    grid = (-(-height // 1024), -(-width // 1024))
    yy, xx = np.mgrid[: grid[0], : grid[1]]
    mask = np.zeros(grid, dtype=bool)
    for _ in range(6):
        cy, cx = rng.uniform(0, grid[0]), rng.uniform(0, grid[1])
        ry, rx = rng.uniform(0.1, 0.25) * grid[0], rng.uniform(0.1, 0.25) * grid[1]
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    small = pyvips.Image.new_from_array((mask * 255).astype(np.uint8))
    big_mask = small.resize(1024, kernel="nearest").crop(0, 0, width, height)
    tissue = texture.replicate(-(-width // 1024), -(-height // 1024)).crop(0, 0, width, height)
    slide = big_mask.ifthenelse(tissue, [243, 243, 243])
    save_slide_tiff(slide, path, mpp=0.25, quality=80, bigtiff=True)
    return mask


class DarknessScorer:
    """A cheap detector through the `score` interface: darker pixels score higher."""

    def score(self, images):
        from vadflow.tasks.detectors.base import ScoreOutput

        pixels = torch.as_tensor(np.asarray(images)).float()  # (B, H, W, 3)
        darkness = 1 - pixels.mean(dim=-1, keepdim=True).permute(0, 3, 1, 2) / 255  # (B,1,H,W)
        return ScoreOutput(anomaly_map=darkness, tile_score=darkness.amax(dim=(1, 2, 3)))


def tissue_tiles(slide_id: str, mask: np.ndarray, extent: int, size: int, level: int):
    """Manifest rows of the tiles of side `extent` whose centre lies in tissue, grid order."""
    rows = []
    for y in range(0, mask.shape[0] * 1024, extent):
        for x in range(0, mask.shape[1] * 1024, extent):
            cy, cx = (y + extent // 2) // 1024, (x + extent // 2) // 1024
            if cy < mask.shape[0] and cx < mask.shape[1] and mask[cy, cx]:
                rows.append((f"{slide_id}:{x}:{y}", x, y))
    frame = pl.DataFrame(rows, schema=["tile_id", "x", "y"], orient="row")
    return frame.with_columns(
        slide_id=pl.lit(slide_id), extent=extent, level=level, size=size
    ).select("slide_id", "tile_id", "x", "y", "extent", "level", "size")


def old_lesion_candidates(heatmap: np.ndarray, downsample: float, threshold: float):
    """`lesion_candidates` before streaming (min_distance 2): argsorts inside
    `ndimage.maximum` / `maximum_position` over the whole label image."""
    from vadflow.tasks.scoring.aggregate import _EIGHT, _suppress_near

    above = np.isfinite(heatmap) & (heatmap > np.float64(threshold))
    if not above.any():
        return []
    masked = np.where(above, heatmap, -np.inf)
    peaks = above & (masked == ndimage.maximum_filter(masked, size=5, cval=-np.inf))
    points = []
    plateau, n = ndimage.label(peaks, structure=_EIGHT)
    if n:
        idx = np.arange(1, n + 1)
        centres = ndimage.center_of_mass(peaks, plateau, idx)
        values = ndimage.maximum(masked, plateau, idx)
        points += [(r, c, float(v)) for (r, c), v in zip(centres, values, strict=True)]
    regions, n_regions = ndimage.label(above, structure=_EIGHT)
    has_peak = np.zeros(n_regions + 1, dtype=bool)
    has_peak[np.unique(regions[peaks])] = True
    peakless = np.flatnonzero(~has_peak[1:]) + 1
    if peakless.size:
        for r, c in ndimage.maximum_position(masked, regions, peakless):
            points.append((float(r), float(c), float(heatmap[r, c])))
    points.sort(key=lambda t: -t[2])
    kept = _suppress_near(points, 2)
    return [((c + 0.5) * downsample, (r + 0.5) * downsample, p) for r, c, p in kept]


def old_slide_features(heatmap: np.ndarray, thresholds) -> dict[str, float]:
    """`slide_features` before it went strip-wise: whole-slide float64 copies of the heatmap,
    a copy of the tissue values for q99, regionprops on the largest region's box."""
    from skimage.measure import regionprops

    from vadflow.tasks.scoring.aggregate import _EIGHT

    values = np.asarray(heatmap, dtype=np.float64)
    tissue = np.isfinite(values)
    inside = values[tissue]
    out = {"max": float(inside.max()), "mean": float(inside.mean())}
    out["q99"] = float(np.quantile(inside, 0.99))
    filled = np.where(tissue, values, -np.inf)
    for t in thresholds:
        above = filled > t
        labelled, n = ndimage.label(above, structure=_EIGHT)
        sfx = f"t{float(t):g}".replace("-", "m")
        out[f"area_{sfx}"] = float(above.sum())
        out[f"tissue_fraction_{sfx}"] = float(above.sum()) / inside.size
        out[f"n_regions_{sfx}"] = float(n)
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)
        sizes[0] = 0
        big = int(np.argmax(sizes))
        box = ndimage.find_objects(labelled, max_label=big)[big - 1]
        (p,) = regionprops((labelled[box] == big).astype(np.int32), intensity_image=values[box])
        out[f"largest_area_{sfx}"] = float(p.area)
        out[f"largest_major_axis_{sfx}"] = float(p.axis_major_length)
        out[f"largest_eccentricity_{sfx}"] = float(p.eccentricity)
        out[f"largest_extent_{sfx}"] = float(p.extent)
        out[f"largest_mean_{sfx}"] = float(p.intensity_mean)
        out[f"largest_max_{sfx}"] = float(p.intensity_max)
    return out


def cache_bytes(path: Path, slide_id: str, mask: np.ndarray, workdir: Path, n: int = 2000):
    """(cache bytes, source JPEG bytes, decoded bytes) for `n` level-0 tissue tiles."""
    import tifffile

    from vadflow.tasks.slides.tiles import TileDataset

    tiles = tissue_tiles(slide_id, mask, 256, 256, 0)
    tiles = tiles.slice(tiles.height // 2 - n // 2, n)  # the middle of the tissue, in a run
    with tempfile.TemporaryDirectory(dir=workdir) as cache:
        dataset = TileDataset(tiles, {slide_id: str(path)}, cache_dir=cache)
        for first in range(0, len(dataset), 64):
            dataset.read_batch(range(first, min(first + 64, len(dataset))))
        stored = dataset.cache.nbytes()
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        across = -(-page.imagewidth // 256)
        counts = page.databytecounts
        jpeg = sum(counts[(y // 256) * across + x // 256] for x, y in tiles.select("x", "y").rows())
    return stored, int(jpeg), tiles.height * 256 * 256 * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 25,000 x 50,000 px slide")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--extent", type=int, default=1024, help="level-0 px per scored tile")
    parser.add_argument("--downsample", type=int, default=16, help="heatmap downsample")
    parser.add_argument("--crop-rows", type=int, default=1500, help="old vs new candidates")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    width = args.width or (25_000 if args.quick else 100_000)
    height = args.height or (50_000 if args.quick else 200_000)

    from vadflow.tasks.evaluation.evaluate import CandidateRule
    from vadflow.tasks.exports.asap import write_candidates_asap
    from vadflow.tasks.exports.geojson import export_slide_geojson
    from vadflow.tasks.exports.overlay import heatmap_overlay
    from vadflow.tasks.exports.render import overlay_heatmap
    from vadflow.tasks.scoring.aggregate import (
        heatmap_regions,
        lesion_candidates,
        slide_features,
        strongest_regions,
    )
    from vadflow.tasks.scoring.heatmap import heatmap_shape, load_heatmap, score_slide
    from vadflow.tasks.slides.reader import Slide

    work = Path(tempfile.mkdtemp(prefix="vadflow-whole-slide-", dir=args.workdir))
    table: list[tuple[str, str, float, float]] = []  # (stage, approach, seconds, peak MiB)

    def stage(name: str, approach: str, run: Callable[[], object]) -> object:
        with PeakRss() as peak:
            result = run()
        table.append((name, approach, peak.seconds, peak.peak / 2**20))
        return result

    try:
        path = work / "slide.tif"
        mask = stage("make slide (libvips, lazy)", "-", lambda: make_slide(path, width, height))
        print(f"slide {width:,} x {height:,} px: {path.stat().st_size / 2**20:,.0f} MiB on disk")
        slide = Slide(str(path))
        size = 128
        level = slide.best_level_for_downsample(args.extent / size)
        tiles = tissue_tiles("s1", mask, args.extent, size, level)
        row = {"slide_id": "s1", "uri": str(path), "mpp": 0.25}
        first = len(table)  # scoring to export: the stages the 2 GB target is for
        scored = stage(
            f"score {tiles.height:,} tiles + write heatmap",
            "new: streamed float32",
            lambda: score_slide(DarknessScorer(), row, tiles, work / "scores", args.downsample),
        )
        cells = np.prod(heatmap_shape(width, height, args.downsample))
        table.append(("heatmap accumulator", "old: float64 (computed)", float("nan"), 0.0))
        table[-1] = (*table[-1][:3], cells * 28 / 2**20)
        heatmap = stage("read heatmap", "new", lambda: load_heatmap(scored.heatmap))
        threshold = float(np.nanquantile(heatmap[::8, ::8], 0.9))
        stage(
            "slide_features", "new: float32, strips", lambda: slide_features(heatmap, (threshold,))
        )
        candidates = stage(
            "lesion_candidates, whole heatmap",
            "new",
            lambda: lesion_candidates(heatmap, args.downsample, threshold),
        )
        cap = CandidateRule.max_per_slide  # the site's candidates cap, regions' cap too
        vmax = float(np.nanmax(heatmap[::8, ::8]))

        def export(image: np.ndarray, points: list, name: str) -> int:
            found = strongest_regions(image, args.downsample, threshold, cap)
            shown = points[:cap]  # strongest first: lesion_candidates(max_candidates=cap)
            out = work / "exports" / name
            export_slide_geojson(
                out, "s1", shown, regions=found.regions, regions_omitted=found.omitted, mpp=0.25
            )
            write_candidates_asap(out / "s1.xml", shown, found.regions)
            return found.total

        def old_export(image: np.ndarray, points: list) -> int:
            regions = heatmap_regions(image, args.downsample, threshold)  # every region
            out = work / "exports" / "old"
            export_slide_geojson(out, "s1", points, regions=regions, mpp=0.25)
            write_candidates_asap(out / "s1.xml", points, regions)
            return len(regions)

        def overlay() -> None:
            small, small_ds = overlay_heatmap(scored.heatmap, args.downsample)
            heatmap_overlay(str(path), small, small_ds, work / "s1.png", threshold, vmax)

        n_regions = stage(
            "export regions + candidates, whole",
            f"new: strongest {cap}",
            lambda: export(heatmap, candidates, "whole"),
        )
        stage("overlay PNG (heatmap pyramid level)", "new", overlay)
        measured = [row for row in table[first:] if not row[1].startswith("old")]
        pipeline_peak = max(peak for _, _, _, peak in measured)
        # Today's approach beside the old one, on a crop the old one can afford.
        crop = np.ascontiguousarray(heatmap[: args.crop_rows])
        new = stage(
            f"lesion_candidates, {crop.shape[0]} x {crop.shape[1]} crop",
            "new",
            lambda: lesion_candidates(crop, args.downsample, threshold),
        )
        old = stage(
            f"lesion_candidates, {crop.shape[0]} x {crop.shape[1]} crop",
            "old: argsort",
            lambda: old_lesion_candidates(crop, args.downsample, threshold),
        )
        if new != old:
            raise SystemExit("new lesion_candidates disagrees with the old one on the crop")
        crop_name = f"{crop.shape[0]} x {crop.shape[1]} crop"
        new_f = stage(
            f"slide_features, {crop_name}",
            "new: float32, strips",
            lambda: slide_features(crop, (threshold,)),
        )
        old_f = stage(
            f"slide_features, {crop_name}",
            "old: float64 copies",
            lambda: old_slide_features(crop, (threshold,)),
        )
        worst = max(abs(new_f[k] - v) / max(1.0, abs(v)) for k, v in old_f.items())
        if new_f.keys() != old_f.keys() or worst > 1e-6:
            raise SystemExit(f"new slide_features disagrees with the old one (by {worst:.2g})")
        stage(
            f"export regions + candidates, {crop_name}",
            f"new: strongest {cap}",
            lambda: export(crop, new, "crop"),
        )
        stage(
            f"export regions + candidates, {crop_name}",
            "old: every one",
            lambda: old_export(crop, new),
        )
        stored, jpeg, decoded = stage(
            "tile cache, 2,000 level-0 tiles",
            "new: JPEG",
            lambda: cache_bytes(path, "s1", mask, work),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"heatmap {heatmap_shape(width, height, args.downsample)} at downsample "
        f"{args.downsample}; {len(candidates):,} candidates; {n_regions:,} regions above "
        f"{threshold:.3f}; slide score {scored.slide_score:.3f}"
    )
    print(f"{'stage':<50}{'approach':<26}{'seconds':>9}{'peak RSS MiB':>14}")
    for name, approach, seconds, peak in table:
        print(f"{name:<50}{approach:<26}{seconds:>9.1f}{peak:>14.0f}")
    print(
        f"tile cache per {2000:,} tiles: {stored / 1e6:.1f} MB encoded "
        f"({stored / jpeg:.2f}x the slide's {jpeg / 1e6:.1f} MB of JPEG; "
        f"decoded pixels, as cached before: {decoded / 1e6:.0f} MB)"
    )
    print(f"peak RSS, scoring + aggregation + candidates + export: {pipeline_peak:,.0f} MiB")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
