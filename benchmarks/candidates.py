"""Seconds and memory to find lesion candidates on a whole slide's heatmap.

    .venv/bin/python benchmarks/candidates.py                  # 6,250 x 12,500 heatmap
    .venv/bin/python benchmarks/candidates.py --rows 2000      # smaller

A Camelyon16 slide (about 100,000 x 200,000 px at 0.25 um/px) has a 6,250 x 12,500 heatmap at
downsample 16. The heatmap here is smoothed noise, so tens of thousands of local maxima lie
above the threshold, as on a noisy detector's slide. `lesion_candidates` is timed whole; its
suppression step (`_suppress_near`, neighbours in buckets) is timed beside the baseline it
replaced, which compared each point with every kept one, on the same points. The baseline
runs on the first `--baseline-points` points only (it is quadratic), and both are timed on
that same prefix. Peak RSS is the process's high-water mark.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from scipy import ndimage

from vadflow.tasks.scoring.aggregate import _suppress_near, lesion_candidates


def noisy_heatmap(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Smoothed noise in [0, 1], float32: many separate peaks, as a weak detector gives."""
    rng = np.random.default_rng(seed)
    noise = rng.random((rows, cols), dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, 2.0)
    lo, hi = float(smooth.min()), float(smooth.max())
    return (smooth - lo) / (hi - lo)


def every_pair(points: list, min_distance: int) -> list:
    """The suppression `_suppress_near` replaced: each point against every kept point."""
    kept: list = []
    for r, c, p in points:
        if all(max(abs(r - kr), abs(c - kc)) >= min_distance for kr, kc, _ in kept):
            kept.append((r, c, p))
    return kept


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6250)
    parser.add_argument("--cols", type=int, default=None, help="default: 2 x rows")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--baseline-points", type=int, default=5000)
    args = parser.parse_args()
    cols = args.cols or 2 * args.rows

    heatmap = noisy_heatmap(args.rows, cols)
    started = time.perf_counter()
    candidates = lesion_candidates(heatmap, 16.0, args.threshold)
    whole = time.perf_counter() - started

    # Points like those lesion_candidates suppresses: local maxima above the threshold,
    # strongest first.
    peaks = heatmap == ndimage.maximum_filter(heatmap, size=5)
    peaks &= heatmap > args.threshold
    r, c = np.nonzero(peaks)
    points = sorted(
        zip(r.astype(float), c.astype(float), heatmap[r, c].astype(float), strict=True),
        key=lambda t: -t[2],
    )[: args.baseline_points]
    started = time.perf_counter()
    fast = _suppress_near(points, 2)
    t_fast = time.perf_counter() - started
    started = time.perf_counter()
    slow = every_pair(points, 2)
    t_slow = time.perf_counter() - started
    if fast != slow:
        raise SystemExit("bucketed suppression disagrees with the every-pair baseline")

    print(f"heatmap {args.rows} x {cols} ({heatmap.nbytes / 2**20:.0f} MiB float32)")
    print(f"{'step':<44}{'points':>10}{'seconds':>10}")
    print(f"{'lesion_candidates, whole heatmap':<44}{len(candidates):>10}{whole:>10.2f}")
    print(f"{'suppression, buckets (_suppress_near)':<44}{len(points):>10}{t_fast:>10.3f}")
    print(f"{'suppression, every pair (baseline)':<44}{len(points):>10}{t_slow:>10.3f}")
    print(f"speed-up on the same points: {t_slow / max(t_fast, 1e-9):.0f}x")
    print(f"peak RSS: {_peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
