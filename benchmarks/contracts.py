"""Seconds and memory to validate a 1,000,000-row tile manifest against its contract.

    .venv/bin/python benchmarks/contracts.py                 # 1,000,000 tiles on 200 slides
    .venv/bin/python benchmarks/contracts.py --rows 200000   # smaller

Builds a slide manifest (200 slides) and a tile manifest on each slide's grid, then times
``validate_tile_manifest`` (with the grid rules on) three ways: the first call in the process
(importing great-expectations and creating its context), a warm call on a clean manifest, and a
warm call on a manifest with 0.1% of its rows broken (which also runs the polars twins that
name example rows and failing slides). Peak RSS is the process's high-water mark after each.
Target: <= 20 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import polars as pl

from vadflow.data_contracts import Grid, validate_tile_manifest
from vadflow.tasks.manifests import SCHEMA_VERSION, SLIDE_SCHEMA, TILE_SCHEMA, conform

EXTENT = 128  # level-0 px: 64 px tiles at 0.5 um/px on a 0.25 um/px slide
COLUMNS = 100  # tiles per row of the grid


def build(rows: int, n_slides: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A slide manifest and a tile manifest of ``rows`` tiles spread over ``n_slides``."""
    per_slide = -(-rows // n_slides)
    grid_rows = -(-per_slide // COLUMNS)
    slide_ids = [f"slide_{i:04d}" for i in range(n_slides)]
    slides = pl.DataFrame(
        {
            "schema_version": SCHEMA_VERSION,
            "site": "bench",
            "slide_id": slide_ids,
            "uri": [f"s3://bench/{s}.tif" for s in slide_ids],
            "sha256": [f"{i:064x}" for i in range(n_slides)],
            "size_bytes": 2_000_000_000,
            "format": "tiff",
            "levels": 8,
            "width": COLUMNS * EXTENT,
            "height": grid_rows * EXTENT,
            "mpp": 0.25,
            "mpp_source": "metadata",
            "label": ["anomalous" if i % 4 == 0 else "normal" for i in range(n_slides)],
            "category": "tumor",
            "split": ["test" if i % 4 == 0 else "train" for i in range(n_slides)],
            "annotation_uri": None,
            "status": "ok",
            "reason": None,
        }
    )
    slides = conform(slides, SLIDE_SCHEMA)
    k = pl.int_range(0, rows, eager=True)
    slide_index = k // per_slide
    within = k % per_slide
    tiles = pl.DataFrame(
        {
            "slide_id": pl.Series(slide_ids).gather(slide_index),
            "x": (within % COLUMNS) * EXTENT,
            "y": (within // COLUMNS) * EXTENT,
            "split": slides["split"].gather(slide_index),
        }
    ).with_columns(
        schema_version=pl.lit(SCHEMA_VERSION),
        site=pl.lit("bench"),
        tile_id=pl.format("{}:{}:{}", "slide_id", "x", "y"),
        level=pl.lit(1),
        size=pl.lit(64),
        extent=pl.lit(EXTENT),
        mpp=pl.lit(0.5),
        tissue_fraction=(pl.col("x") % 7 + 3) / 10.0,
        label_fraction=pl.lit(0.0),
    )
    return slides, conform(tiles, TILE_SCHEMA)


def corrupt(tiles: pl.DataFrame, fraction: float = 0.001) -> pl.DataFrame:
    """Break every 1/fraction-th row: off the grid, or past the slide's edge."""
    every = int(1 / fraction)
    k = pl.int_range(0, tiles.height)
    return tiles.with_columns(
        x=pl.when(k % every == 0).then(pl.col("x") + 3).otherwise(pl.col("x")),
        y=pl.when(k % every == 1).then(pl.col("y") + 10 * EXTENT**2).otherwise(pl.col("y")),
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--slides", type=int, default=200)
    args = parser.parse_args()

    started = time.perf_counter()
    slides, tiles = build(args.rows, args.slides)
    broken = corrupt(tiles)
    grids = dict.fromkeys(slides["slide_id"].to_list(), Grid(EXTENT))
    print(
        f"built {tiles.height:,} tiles on {slides.height} slides in "
        f"{time.perf_counter() - started:.1f} s; peak RSS {peak_rss_mib():,.0f} MiB; "
        f"{os.cpu_count()} CPUs"
    )

    table = []
    for case, frame, expect in (
        ("first call (GX import + context)", tiles, True),
        ("warm, clean manifest", tiles, True),
        ("warm, 0.1% rows broken", broken, False),
    ):
        start = time.perf_counter()
        result = validate_tile_manifest(frame, slides, grids=grids)
        seconds = time.perf_counter() - start
        if result.success != expect:
            raise SystemExit(f"{case}: unexpected outcome\n{result.message()}")
        table.append((case, frame.height, seconds, peak_rss_mib(), result))

    print()
    print(f"| {'case':<34} | {'rows':>9} | {'seconds':>7} | {'peak RSS MiB':>12} | outcome |")
    print(f"| {'-' * 34} | {'-' * 9}:| {'-' * 7}:| {'-' * 12}:| ------- |")
    for case, rows, seconds, rss, result in table:
        outcome = (
            "passed"
            if result.success
            else f"{len(result.failures)} failed, {len(result.failing_slides)} slides"
        )
        print(f"| {case:<34} | {rows:>9,} | {seconds:>7.1f} | {rss:>12,.0f} | {outcome} |")
    print()
    print(table[-1][-1].message())


if __name__ == "__main__":
    main()
