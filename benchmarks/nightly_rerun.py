"""Seconds and memory of a nightly's prepare stage rerun with no new slides (issue #22).

    .venv/bin/python benchmarks/nightly_rerun.py                  # 400 slides
    .venv/bin/python benchmarks/nightly_rerun.py --slides 100 --keep DIR

Writes a site of small pyramidal JPEG TIFF slides (each its own random tissue, so no two are
byte copies), runs the prepare stage once (discover, register, tile, manifest contracts) so
everything is registered and tiled, then reruns it with nothing changed two ways, each in a
fresh process so its peak RSS is its own:

- old: every slide hashed in full, opened and its TIFF structure checked again, the manifest
  contracts run again (what every night did before the fingerprint index);
- new: the fingerprint index (`tasks/slides/register.py`) and the remembered passing contract
  result (`tasks/validation/passed.py`): nothing hashed, opened or checked again.

Tiling's own check (finished slides are skipped) is the same in both. Seconds exclude starting
Python and importing vadflow, and include importing great-expectations where a phase needs it.
Target for the new rerun: <= 2 s for 400 slides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
SITE = "rerun-bench"


def make_site(root: Path, n_slides: int, size: int) -> Path:
    """`n_slides` small H&E-coloured pyramidal TIFFs: three quarters normal training slides,
    the rest normal test slides (with their reference.csv)."""
    import numpy as np
    import pyvips

    from vadflow.tasks.synth.pathology import save_slide_tiff

    site = root / SITE
    if (site / "site.yaml").exists():
        return site
    (site / "training" / "normal").mkdir(parents=True, exist_ok=True)
    (site / "testing" / "images").mkdir(parents=True, exist_ok=True)
    (site / "site.yaml").write_text(f"name: {SITE}\ndomain: pathology\n")
    n_train = n_slides * 3 // 4
    rng = np.random.default_rng(0)
    tests = []
    for i in range(n_slides):
        # Pink tissue (H&E-like saturation) in the middle, white glass around it.
        pixels = np.full((size, size, 3), 240, np.uint8)
        noise = rng.integers(0, 40, (size // 2, size // 2, 3), dtype=np.uint8)
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (
            np.array([200, 120, 170], np.uint8) - noise
        )
        if i < n_train:
            path = site / "training" / "normal" / f"normal_{i:03d}.tif"
        else:
            path = site / "testing" / "images" / f"test_{i - n_train:03d}.tif"
            tests.append(path.stem)
        image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb")
        save_slide_tiff(image, path, mpp=0.25)
    (site / "testing" / "reference.csv").write_text("".join(f"{t},Normal\n" for t in tests))
    return site


def prepare(site_dir: Path, outputs: Path, incremental: bool) -> dict:
    """The prepare stage as the nightly runs it (the plain functions under its tasks)."""
    from vadflow.tasks.manifests import write_parquet_atomic
    from vadflow.tasks.site import SiteLayout, load_site
    from vadflow.tasks.slides import register
    from vadflow.tasks.slides.discover import discover
    from vadflow.tasks.tiling.runners import tile_site
    from vadflow.tasks.validation import check_manifests, report_folder

    hashed: list[str] = []
    full = register.sha256_file
    register.sha256_file = lambda p, chunk=1 << 20: hashed.append(p) or full(p, chunk)
    site = load_site(site_dir)
    layout = SiteLayout(outputs, site.name)
    started = time.perf_counter()
    sources = discover(site.source, site.domain, site.val_fraction)
    registered = register.register_slides(
        sources,
        site.name,
        site.domain,
        site.mpp_override,
        site.mpp_bounds,
        tiling=site.tiling,
        limits=site.limits,
        index_uri=str(layout.root / register.INDEX_FILE) if incremental else None,
    )
    write_parquet_atomic(register.slide_frame(registered.rows), layout.slides_manifest)
    usable = [r for r in registered.rows if r["status"] == "ok"]
    tiled = tile_site(usable, site, layout.tiles_uri, layout.masks_uri)
    run = f"{'new' if incremental else 'old'}-{time.time_ns()}"
    check = check_manifests(
        layout.slides_manifest,
        [t.manifest for t in tiled if t.status == "ok"],
        tiling=site.tiling,
        report_dir=report_folder(layout.reports, run),
        reuse=incremental,
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "slides": len(registered.rows),
        "usable": len(usable),
        "hashed": len(hashed),
        "reused": len(registered.reused),
        "tiled": sum(t.status == "ok" for t in tiled),
        "contracts": "; ".join(check.stages),
    }


def phase(args: argparse.Namespace, name: str) -> dict:
    """Run one phase in a fresh Python process; its JSON result."""
    command = [sys.executable, __file__, "--phase", name, "--root", str(args.root)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=400)
    parser.add_argument("--size", type=int, default=2048, help="slide width and height, px")
    parser.add_argument("--keep", type=Path, help="folder to keep the site and outputs in")
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("setup", "old", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a child process: one phase, one JSON line
        site = args.root / "data" / SITE
        print(json.dumps(prepare(site, args.root / "outputs", args.phase != "old")))
        return

    with tempfile.TemporaryDirectory(prefix="nightly-rerun-") as scratch:
        args.root = args.keep or Path(scratch)
        started = time.perf_counter()
        make_site(args.root / "data", args.slides, args.size)
        print(f"made {args.slides} slides in {time.perf_counter() - started:.1f} s")
        first = phase(args, "setup")
        print(
            f"first run (registers, tiles, checks everything): {first['seconds']:.1f} s, "
            f"{first['slides']} slides, {first['tiled']} tiled, {first['hashed']} hashed"
        )
        rows = [("old: full rehash, reopen, recheck", phase(args, "old"))]
        rows.append(("new: fingerprints, remembered result", phase(args, "new")))
        print()
        print(f"| {'rerun, nothing changed':<38} | seconds | peak RSS MiB | hashed | reused |")
        print(f"| {'-' * 38} | ------: | -----------: | -----: | -----: |")
        for label, r in rows:
            print(
                f"| {label:<38} | {r['seconds']:>7.2f} | {r['peak_rss_mib']:>12,.0f} "
                f"| {r['hashed']:>6} | {r['reused']:>6} |"
            )
        print()
        print(f"new rerun's contracts: {rows[1][1]['contracts']}")
        print(f"{os.cpu_count()} CPUs; target for the new rerun: <= 2 s")


if __name__ == "__main__":
    main()
