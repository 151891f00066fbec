"""Scoring tiles/s per detector family: the old decode-then-score loop against the prefetching
loader, beside the model's own forward-pass throughput on pre-decoded tiles, in one run.

    .venv/bin/python benchmarks/scoring_throughput.py                    # CPU, 3 families
    .venv/bin/python benchmarks/scoring_throughput.py --device cuda      # where a GPU is lent
    .venv/bin/python benchmarks/scoring_throughput.py --families padim --side 6144

One synthetic slide (`benchmarks/whole_slide.py: make_slide`, a real tiled pyramidal JPEG TIFF,
`--side` px square at 0.25 um/px) is written to a temporary folder; its tissue tiles (`--extent`
level-0 px, read at `--size` px) are scored by each family, fitted on a few of them (one
epoch where the family trains). For each family, in this order and on the same tiles:

- decode: `read_tiles` of every batch alone (what the loader does, no model);
- forward: `detector.score` on batches already decoded and held in memory (the model's own
  throughput, the ceiling of what a loader can reach);
- old loop: `score_slide(..., prefetch=0)`, decoding each batch between forward passes;
- new loop: `score_slide(...)`, a loader thread decoding up to two batches ahead.

The shares of the old loop's time are decode / old, forward / old, and the rest (heatmap
stitching, TIFF writing, Python) as overhead; "new / forward" is the new loop's tiles/s over
the forward pass's (target: >= 0.5, i.e. within 2x). Both loops' tile scores are checked equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from whole_slide import make_slide, tissue_tiles  # noqa: E402

from vadflow.tasks.detectors.registry import create_detector, detector_class  # noqa: E402
from vadflow.tasks.scoring.heatmap import score_slide  # noqa: E402
from vadflow.tasks.slides.reader import Slide  # noqa: E402
from vadflow.tasks.slides.tiles import read_tiles  # noqa: E402

FAMILIES = ("patch_knn", "padim", "ae_l2")
HEATMAP_DOWNSAMPLE = 32


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fitted(family: str, size: int, device: str, batch: int, train: np.ndarray):
    """A detector of `family` fitted on `train` (one epoch where the family trains)."""
    wanted = {"tile_size": size, "device": device, "batch_size": batch, "epochs": 1}
    fields = {f.name for f in dataclasses.fields(detector_class(family).config_cls)}
    detector = create_detector(family, **{k: v for k, v in wanted.items() if k in fields})
    half = len(train) // 2
    detector.fit(train[:half], train[half:])
    return detector


def measure(family: str, detector, slide_row: dict, tiles: pl.DataFrame, args, out: Path):
    """Seconds of decode alone, forward alone, the old loop and the new loop, on `tiles`."""
    slide = Slide(slide_row["uri"])
    batches = [tiles.slice(s, args.batch) for s in range(0, tiles.height, args.batch)]
    start = time.perf_counter()
    decoded = [read_tiles(slide, rows) for rows in batches]
    decode_s = time.perf_counter() - start
    detector.score(decoded[0])  # warm-up: first-call allocations, lazy init
    _sync(args.device)
    start = time.perf_counter()
    for pixels in decoded:
        detector.score(pixels)
    _sync(args.device)
    forward_s = time.perf_counter() - start
    del decoded
    loops = {}
    for name, prefetch in (("old", 0), ("new", 2)):
        start = time.perf_counter()
        result = score_slide(
            detector,
            slide_row,
            tiles,
            out / f"{family}-{name}",
            HEATMAP_DOWNSAMPLE,
            batch_size=args.batch,
            prefetch=prefetch,
        )
        _sync(args.device)
        loops[name] = (time.perf_counter() - start, result)
    old_scores = pl.read_parquet(loops["old"][1].tile_scores)["score"].to_numpy()
    new_scores = pl.read_parquet(loops["new"][1].tile_scores)["score"].to_numpy()
    if not np.array_equal(old_scores, new_scores):
        raise SystemExit(f"{family}: the prefetching loop's tile scores differ from the old loop")
    return decode_s, forward_s, loops["old"][0], loops["new"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent")
    parser.add_argument("--side", type=int, default=8192, help="slide side, level-0 px")
    parser.add_argument("--extent", type=int, default=128, help="tile side, level-0 px")
    parser.add_argument("--size", type=int, default=64, help="tile side as scored, px")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tiles", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        path = folder / "slide.tif"
        mask = make_slide(path, args.side, args.side, seed=1)
        tiles = tissue_tiles("bench", mask, args.extent, args.size, level=0)
        tiles = tiles.head(args.max_tiles).with_columns(site=pl.lit("bench"))
        slide_row = {"slide_id": "bench", "uri": str(path), "mpp": 0.25}
        train = read_tiles(Slide(str(path)), tiles.gather_every(max(1, tiles.height // 128)))
        print(
            f"{tiles.height} tiles of {args.extent} level-0 px at {args.size} px, batch "
            f"{args.batch}, device {args.device}, torch threads {torch.get_num_threads()}, "
            f"{len(os.sched_getaffinity(0))} CPUs"
        )
        table = []
        for family in args.families:
            detector = fitted(family, args.size, args.device, args.batch, train)
            decode_s, forward_s, old_s, new_s = measure(
                family, detector, slide_row, tiles, args, folder
            )
            table.append((family, decode_s, forward_s, old_s, new_s))

    n = tiles.height
    print()
    print(
        "| family | forward tiles/s | old loop tiles/s | new loop tiles/s | new / forward "
        "| speed-up | old: decode | old: model | old: overhead |"
    )
    print("| --- | ---:| ---:| ---:| ---:| ---:| ---:| ---:| ---:|")
    for family, decode_s, forward_s, old_s, new_s in table:
        overhead = max(0.0, old_s - decode_s - forward_s)
        print(
            f"| {family} | {n / forward_s:,.0f} | {n / old_s:,.0f} | {n / new_s:,.0f} "
            f"| {forward_s / new_s:.2f} | {old_s / new_s:.2f}x | {decode_s / old_s:.0%} "
            f"| {forward_s / old_s:.0%} | {overhead / old_s:.0%} |"
        )


if __name__ == "__main__":
    main()
