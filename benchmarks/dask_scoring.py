"""Scoring many slides on a Dask `LocalCluster` of 1 and of 2 workers: seconds, speed-up, and
whether the outputs (tile scores, heatmaps) are identical.

    .venv/bin/python benchmarks/dask_scoring.py                  # 4 slides of 3072 px, padim
    .venv/bin/python benchmarks/dask_scoring.py --slides 8 --family ae_l2

Slides are made with `benchmarks/whole_slide.py: make_slide` (real pyramidal JPEG TIFFs) and
tiled by the pipeline's tiler; one model (fitted on a sample of the first slide's tiles, one
epoch where the family trains) scores all of them with `score_slides` (what `score_site_task`
runs when a site's `parallel.backend` is `dask`) in this process, then on a 1-worker and a
2-worker cluster. Cluster start-up is timed apart from scoring. Each worker runs one slide at a
time with torch threads = cores / workers, so the 1-worker cluster uses every core too: the
speed-up is what running slides side by side adds (decode and Python overlap), not extra cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring_throughput import fitted  # noqa: E402
from whole_slide import make_slide  # noqa: E402

from vadflow.tasks.scoring.heatmap import read_heatmap_tiff  # noqa: E402
from vadflow.tasks.scoring.run import score_slides  # noqa: E402
from vadflow.tasks.site import TilingConfig  # noqa: E402
from vadflow.tasks.slides.discover import SlideSource  # noqa: E402
from vadflow.tasks.slides.register import register_slide  # noqa: E402
from vadflow.tasks.slides.tiles import load_tiles, sample_tiles  # noqa: E402
from vadflow.tasks.tiling.grid import tile_slide  # noqa: E402

HEATMAP_DOWNSAMPLE = 32


def outputs(scores) -> tuple[pl.DataFrame, list[np.ndarray]]:
    frame = pl.concat([pl.read_parquet(s.tile_scores) for s in scores])
    return frame, [read_heatmap_tiff(s.heatmap)[0] for s in scores]


def identical(a, b) -> bool:
    (frame_a, maps_a), (frame_b, maps_b) = outputs(a), outputs(b)
    return frame_a.equals(frame_b) and all(
        np.array_equal(x, y, equal_nan=True) for x, y in zip(maps_a, maps_b, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--side", type=int, default=3072, help="slide side, level-0 px")
    parser.add_argument("--family", default="padim")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        tiling = TilingConfig(tile_size=64)
        rows, manifests = [], []
        for i in range(args.slides):
            path = folder / f"slide_{i}.tif"
            make_slide(path, args.side, args.side, seed=i)
            source = SlideSource(path.stem, str(path), "normal", "normal", "test", None)
            row = register_slide(source, "bench", "pathology")
            tiled = tile_slide(row, tiling, "pathology", folder / "tiles", folder / "masks")
            rows.append(row)
            manifests.append(tiled.manifest)
        tiles = sum(pl.read_parquet(m).height for m in manifests)
        first = sample_tiles(pl.read_parquet(manifests[0]), 128, seed=0)
        train = load_tiles(first, {rows[0]["slide_id"]: rows[0]["uri"]})
        model_dir = str(
            fitted(args.family, tiling.tile_size, "cpu", 64, train).save(folder / "model")
        )
        print(
            f"{args.slides} slides of {args.side} px, {tiles} tiles, {args.family}, "
            f"{len(os.sched_getaffinity(0))} CPUs"
        )

        table = []
        start = time.perf_counter()
        serial = score_slides(
            model_dir, rows, manifests, str(folder / "serial"), HEATMAP_DOWNSAMPLE
        )
        table.append(("this process (no Dask)", 0.0, time.perf_counter() - start, True))
        for workers in (1, 2):
            start = time.perf_counter()
            with (
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                ) as cluster,
                Client(cluster) as client,
            ):
                client.wait_for_workers(workers)
                started = time.perf_counter() - start
                start = time.perf_counter()
                scores = score_slides(
                    model_dir,
                    rows,
                    manifests,
                    str(folder / f"dask-{workers}"),
                    HEATMAP_DOWNSAMPLE,
                    executor=client.get_executor(),
                    workers=workers,
                )
                seconds = time.perf_counter() - start
            table.append(
                (f"LocalCluster, {workers} worker(s)", started, seconds, identical(scores, serial))
            )

    one = table[1][2]
    print()
    print(
        "| where | cluster start s | scoring s | tiles/s | speed-up vs 1 worker "
        "| outputs = serial |"
    )
    print("| --- | ---:| ---:| ---:| ---:| --- |")
    for name, started, seconds, same in table:
        print(
            f"| {name} | {started:.1f} | {seconds:.1f} | {tiles / seconds:,.0f} "
            f"| {one / seconds:.2f}x | {'identical' if same else 'DIFFERENT'} |"
        )


if __name__ == "__main__":
    main()
