"""Peak memory of building patch_knn's memory bank: every training patch in memory (the old
path) against the streamed, bounded sample (today's `fit_patch_features(max_patches=...)`),
at 1x and 10x a training set about the size of the medium site's.

    .venv/bin/python benchmarks/memory_bank.py                 # 1,000 and 10,000 tiles
    .venv/bin/python benchmarks/memory_bank.py --tiles 500 --features imagenet

Each run is its own child process (peak RSS only grows within a process). It makes `--tiles`
64 px texture tiles (`vadflow.tasks.synth.texture`; 1,000 made, the rest flipped, turned and
re-noised copies, so every tile's features differ), then fits the bank: features, their
standardisation, a uniform sample of `max_bank_patches` patches, the k-center coreset. It
prints the resident set before the fit (tiles, torch), the peak during it and the rise, and the
fit's seconds. The medium hard site (`vadflow benchmark-detectors --size medium`) trains on
five normal slides; at about 170 tissue tiles of 64 px per slide that is ~850 tiles, hence the
1,000 default. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vadflow.tasks.detectors.components.backbones import (
    extract_features,
    fit_patch_features,
    new_features,
)
from vadflow.tasks.detectors.components.memory_bank import k_center_greedy
from vadflow.tasks.detectors.patch_knn import PatchKNNConfig
from vadflow.tasks.synth.texture import texture_batch

ROOT = Path(__file__).resolve().parents[1]
BASE_TILES = 1000


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def make_tiles(n: int, seed: int = 0) -> np.ndarray:
    """n uint8 (n, 64, 64, 3) texture tiles: BASE_TILES generated, the rest varied copies."""
    base = texture_batch(seed, min(n, BASE_TILES), 64)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, 64, 64, 3), dtype=np.uint8)
    out[: len(base)] = base
    for start in range(len(base), n, len(base)):
        part = base[: min(len(base), n - start)]
        turned = np.rot90(part, k=int(rng.integers(1, 4)), axes=(1, 2))[:, :, ::-1]
        noise = rng.normal(0, 3, turned.shape)
        out[start : start + len(part)] = np.clip(turned + noise, 0, 255).astype(np.uint8)
    return out


def fit_bank(mode: str, tiles: np.ndarray, config: PatchKNNConfig) -> int:
    """The bank's sample and coreset; returns the coreset size. "all": every patch's
    features in memory, then a random subset (the path before the streamed sample)."""
    features = new_features(config)
    device = torch.device("cpu")
    if config.features == "imagenet":
        from vadflow.tasks.detectors.components.backbones import load_pretrained_weights

        load_pretrained_weights(features.pretrained, config, device)
    if mode == "all":
        raw = extract_features(features, tiles, device, batch_size=config.batch_size)
        features.calibrate(raw)
        normalised = features.normalise(raw)  # (N, C, h, w)
        patches = normalised.permute(0, 2, 3, 1).reshape(-1, normalised.shape[1])
        generator = torch.Generator().manual_seed(config.seed)
        if len(patches) > config.max_bank_patches:
            keep = torch.randperm(len(patches), generator=generator)[: config.max_bank_patches]
            patches = patches[keep]
    else:
        _, patches, _ = fit_patch_features(
            features, config, tiles, tiles[:1], device, "patch_knn",
            max_patches=config.max_bank_patches,
        )  # fmt: skip
    picked = k_center_greedy(patches, config.coreset_size, projection_dim=64, seed=config.seed)
    return len(picked)


def child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    tiles = make_tiles(spec["tiles"])
    config = PatchKNNConfig(features=spec["features"], device="cpu", batch_size=64)
    before = _status_mib("VmRSS")
    started = time.perf_counter()
    size = fit_bank(spec["mode"], tiles, config)
    seconds = time.perf_counter() - started
    peak = _status_mib("VmHWM")
    print(json.dumps({**spec, "before": before, "peak": peak, "seconds": seconds, "bank": size}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=BASE_TILES, help="1x training tiles")
    parser.add_argument("--features", default="filters", choices=("filters", "imagenet"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    rows = []
    for scale in (1, 10):
        for mode in ("all", "streamed"):
            spec = {
                "mode": mode,
                "tiles": args.tiles * scale,
                "features": args.features,
                "threads": args.threads,
            }
            done = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\npatch_knn memory bank, features={args.features}, 64 px tiles, CPU")
    print("| tiles | bank path | RSS before fit MiB | peak MiB | rise MiB | fit s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['tiles']} | {r['mode']} | {r['before']:.0f} | {r['peak']:.0f} | "
            f"{r['peak'] - r['before']:.0f} | {r['seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
