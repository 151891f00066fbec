"""Throughput and memory of every registered detector family, and AnoGAN vs f-AnoGAN.

    .venv/bin/python benchmarks/detectors.py --quick     # a small run, a few minutes on CPU
    .venv/bin/python benchmarks/detectors.py             # the full run (issue 5's tables)

Per family, device (CPU, and CUDA when torch sees one) and tile size (64 and 128 px) it prints
training tiles/s, scoring tiles/s and peak memory. Each measurement runs in its own child
process because peak RSS only ever grows within a process: measured in one process, every
family would inherit the peak of the largest one before it. The figures:

- training tiles/s: tiles x epochs / `fit` wall time, with a validation set of one batch, so
  the rate is the loop's own (data movement, forward, backward, step) and not validation's.
  It is taken after one untimed warm-up epoch (CUDA kernels, allocator, thread pools).
- scoring tiles/s: `score` on fresh tiles after a warm-up call, model in eval mode; as many
  tiles as fit in a time budget, sized by a 4-tile probe (AnoGAN is ~1000x slower than the rest).
- peak RSS: the child's maximum resident set, MiB (VmHWM on Linux, else getrusage), with what
  it rose by after the imports and tile loading (~0.2 GiB, mostly torch). On CUDA, peak GPU
  memory allocated by torch is shown as well.

Then, when both families are registered, AnoGAN and f-AnoGAN are trained on the same generated
normal texture and score the same normal and defective tiles: tile AUROC and scoring time of
each, and how many times faster f-AnoGAN scores (AnoGAN searches the latent space per tile,
f-AnoGAN encodes in one pass; issue 5's target is >= 100x at >= equal AUROC).

Tiles come from the generated H&E-like texture of `vadflow.tasks.synth.texture`, the one the
detector tests use, so AUROCs here and in the tests are on the same kind of data. Families
that need labels (`supervision` other than "none": supervised_cnn, mil) cannot train on normal
tiles alone and are listed as skipped.
Each family runs with its own default config except tile size, epochs and batch size, so
figures compare the shipped defaults. Not part of the test run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vadflow.tasks.benchmark import configured_detector
from vadflow.tasks.detectors.registry import available_families, detector_class
from vadflow.tasks.synth.texture import texture_batch

ROOT = Path(__file__).resolve().parents[1]

DEFECTS = ("dense", "scratch", "patch")
COMPARED = ("anogan", "fanogan")
PROBE_TILES = 4


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does; `--quick` shrinks all of it."""

    sizes: tuple[int, ...] = (64, 128)
    train_tiles: int = 512
    epochs: int = 2  # timed epochs, after the warm-up epoch
    batch_size: int = 64
    score_tiles: int = 512  # at most; fewer when a family would overrun score_budget_s
    score_budget_s: float = 30.0
    compare_size: int = 64
    compare_train_tiles: int = 1024
    compare_epochs: int = 20
    compare_test_tiles: int = 60  # normal test tiles; as many defective ones, 3 kinds
    timeout_s: int = 3600


QUICK = Plan(
    train_tiles=64,
    epochs=1,
    batch_size=32,
    score_tiles=128,
    score_budget_s=5.0,
    compare_size=32,
    compare_train_tiles=256,
    compare_epochs=3,
    compare_test_tiles=30,
    timeout_s=900,
)


def prepare_data(directory: Path, plan: Plan, sizes: tuple[int, ...]) -> None:
    """Write every tile set the children use as .npy files, once.

    The children load them rather than generate them, so their peak RSS is the detector's
    and not the texture generator's.
    """
    for size in sizes:
        np.save(directory / f"train-{size}.npy", texture_batch(0, plan.train_tiles, size))
        np.save(directory / f"val-{size}.npy", texture_batch(1, plan.batch_size, size))
        np.save(directory / f"fresh-{size}.npy", texture_batch(2, plan.score_tiles, size))
    size, n = plan.compare_size, plan.compare_test_tiles
    per_kind = max(1, n // len(DEFECTS))
    defective = [texture_batch(13 + i, per_kind, size, kind) for i, kind in enumerate(DEFECTS)]
    np.save(directory / "compare-train.npy", texture_batch(10, plan.compare_train_tiles, size))
    np.save(directory / "compare-val.npy", texture_batch(11, max(plan.batch_size, 32), size))
    np.save(
        directory / "compare-test.npy", np.concatenate([texture_batch(12, n, size), *defective])
    )
    np.save(directory / "compare-labels.npy", np.r_[np.zeros(n), np.ones(per_kind * len(DEFECTS))])


def peak_rss_mib() -> float:
    """This process's peak resident set, MiB.

    On Linux from VmHWM in /proc/self/status: `resource.getrusage(...).ru_maxrss` there also
    counts the parent's resident set at fork time (exec keeps the old image's high-water mark),
    which made every child report the parent's ~0.9 GiB. Elsewhere, getrusage's ru_maxrss.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- child processes: one measurement each, one JSON line on stdout ------------------------------


def measure_throughput(
    family: str, size: int, device: str, plan: Plan, data: Path
) -> dict[str, Any]:
    """Training and scoring tiles/s and peak memory of one family at one size on one device."""
    train = np.load(data / f"train-{size}.npy")
    val = np.load(data / f"val-{size}.npy")
    fresh = np.load(data / f"fresh-{size}.npy")
    baseline_rss = peak_rss_mib()  # torch, the other imports and the tiles
    common = {
        "tile_size": size,
        "batch_size": plan.batch_size,
        "device": device,
        "patience": 1000,  # never stop early: time the epochs asked for
        "augment": True,
    }
    # Warm-up: one epoch on a fresh detector, discarded.
    configured_detector(family, epochs=1, **common).fit(train[: plan.batch_size * 2], val)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    detector = configured_detector(family, epochs=plan.epochs, **common)
    _sync(device)
    started = time.perf_counter()
    report = detector.fit(train, val)
    _sync(device)
    train_s = time.perf_counter() - started

    scored, score_s = time_scoring(detector, fresh, plan, device)

    # A family may count epochs its own way (f-AnoGAN: GAN phase + encoder phase).
    epochs = getattr(report, "epochs", plan.epochs) or plan.epochs
    result = {
        "family": family,
        "size": size,
        "device": device,
        "train_tiles_per_s": len(train) * epochs / train_s,
        "score_tiles_per_s": scored / score_s,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline_rss,
        "epochs": epochs,
    }
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def time_scoring(detector: Any, tiles: np.ndarray, plan: Plan, device: str) -> tuple[int, float]:
    """(tiles scored, seconds): as many of `tiles` as fit in `plan.score_budget_s`.

    Families differ by orders of magnitude (AnoGAN runs hundreds of latent-search steps per
    batch), so a probe on a few tiles sizes the timed run instead of one count for all.
    """
    detector.score(tiles[:2])  # warm-up
    probe = tiles[:PROBE_TILES]
    _sync(device)
    started = time.perf_counter()
    detector.score(probe)
    _sync(device)
    probe_s = time.perf_counter() - started
    affordable = int(plan.score_budget_s / (probe_s / len(probe)))
    if affordable < 2 * len(probe):
        return len(probe), probe_s
    count = min(affordable, len(tiles))
    if count >= plan.batch_size:
        count -= count % plan.batch_size  # whole batches: a ragged last one skews small runs
    _sync(device)
    started = time.perf_counter()
    detector.score(tiles[:count], batch_size=plan.batch_size)
    _sync(device)
    return count, time.perf_counter() - started


def measure_comparison(family: str, device: str, plan: Plan, data: Path) -> dict[str, Any]:
    """Tile AUROC and scoring time of one family trained and tested on the shared texture."""
    from sklearn.metrics import roc_auc_score

    size = plan.compare_size
    train = np.load(data / "compare-train.npy")
    val = np.load(data / "compare-val.npy")
    tiles = np.load(data / "compare-test.npy")
    labels = np.load(data / "compare-labels.npy")

    detector = configured_detector(
        family,
        tile_size=size,
        epochs=plan.compare_epochs,
        batch_size=plan.batch_size,
        device=device,
    )
    started = time.perf_counter()
    detector.fit(train, val)
    fit_s = time.perf_counter() - started
    _sync(device)
    started = time.perf_counter()
    scores = detector.score(tiles).tile_score.numpy()
    _sync(device)
    score_s = time.perf_counter() - started
    return {
        "family": family,
        "device": device,
        "size": size,
        "tiles": len(tiles),
        "auroc": float(roc_auc_score(labels, scores)),
        "score_s": score_s,
        "fit_s": fit_s,
    }


def _child_main(spec: dict[str, Any]) -> None:
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    plan = Plan(**{k: tuple(v) if k == "sizes" else v for k, v in spec["plan"].items()})
    data = Path(spec["data"])
    if spec["kind"] == "throughput":
        result = measure_throughput(spec["family"], spec["size"], spec["device"], plan, data)
    else:
        result = measure_comparison(spec["family"], spec["device"], plan, data)
    print(json.dumps(result), flush=True)


# -- the parent: run children, print tables ------------------------------------------------------


def run_child(spec: dict[str, Any], timeout_s: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; a failure becomes an `error` entry."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False
        )
    except subprocess.TimeoutExpired:
        return {**_label(spec), "error": f"timed out after {timeout_s}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**_label(spec), "error": f"exit {done.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def _label(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("family", "size", "device") if k in spec}


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text when rich is missing
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, os.get_terminal_size(0).columns if sys.stdout.isatty() else 120)).print(
        table
    )


def throughput_table(results: list[dict[str, Any]], threads: int) -> None:
    columns = ["family", "device", "px", "train tiles/s", "score tiles/s", "peak RSS MiB"]
    columns.append("over baseline MiB")
    gpu = any("peak_gpu_mib" in r for r in results)
    if gpu:
        columns.append("peak GPU MiB")
    rows = []
    for r in results:
        row = [r["family"], r["device"], str(r.get("size", ""))]
        if "error" in r:
            row += ["error: " + r["error"], "", "", ""]
        else:
            row += [
                f"{r['train_tiles_per_s']:,.1f}",
                f"{r['score_tiles_per_s']:,.1f}",
                f"{r['peak_rss_mib']:,.0f}",
                f"{r['peak_rss_mib'] - r['baseline_rss_mib']:,.0f}",
            ]
        if gpu:
            row.append(f"{r['peak_gpu_mib']:,.0f}" if "peak_gpu_mib" in r else "")
        rows.append(row)
    _table(
        f"Detector throughput, default configs, {threads} CPU thread(s) (training: flips on, "
        "validation on one batch; baseline RSS = torch + tiles before the detector)",
        columns,
        rows,
    )


def comparison_table(results: list[dict[str, Any]], *, quick: bool) -> None:
    columns = ["family", "device", "px", "tiles", "AUROC", "score s", "ms/tile", "fit s"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["family"], r["device"], "", "", "error: " + r["error"], "", "", ""])
            continue
        rows.append(
            [
                r["family"],
                r["device"],
                str(r["size"]),
                str(r["tiles"]),
                f"{r['auroc']:.3f}",
                f"{r['score_s']:.3f}",
                f"{1000 * r['score_s'] / r['tiles']:.2f}",
                f"{r['fit_s']:.0f}",
            ]
        )
    title = "AnoGAN vs f-AnoGAN on the same tiles"
    if quick:
        title += " (--quick: a few epochs, so the AUROCs are not meaningful; the times are)"
    _table(title, columns, rows)
    by_device: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        if "error" not in r:
            by_device.setdefault(r["device"], {})[r["family"]] = r
    for device, pair in by_device.items():
        if set(COMPARED) <= set(pair):
            ano, fano = pair["anogan"], pair["fanogan"]
            ratio = ano["score_s"] / fano["score_s"]
            verdict = "meets" if ratio >= 100 and fano["auroc"] >= ano["auroc"] else "misses"
            print(
                f"{device}: f-AnoGAN scores {ratio:,.0f}x faster than AnoGAN, AUROC "
                f"{fano['auroc']:.3f} vs {ano['auroc']:.3f} ({verdict} the >= 100x at >= equal "
                "AUROC target)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small run (minutes on CPU)")
    parser.add_argument("--families", help="comma-separated subset (default: all registered)")
    parser.add_argument("--sizes", type=int, nargs="+", help="tile sizes (default 64 128)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--skip-comparison", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per measurement (default: torch's own choice); on a busy "
        "machine, 1 avoids OpenMP workers spinning against other processes",
    )
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_main(json.loads(args.child))
        return 0

    plan = QUICK if args.quick else Plan()
    if args.sizes:
        plan = dataclasses.replace(plan, sizes=tuple(args.sizes))
    registered = available_families()
    families = args.families.split(",") if args.families else registered
    unknown = sorted(set(families) - set(registered))
    if unknown:
        parser.error(f"unknown families {unknown}; registered: {', '.join(registered)}")
    labelled = [f for f in families if getattr(detector_class(f), "supervision", "none") != "none"]
    families = [f for f in families if f not in labelled]
    targets = devices() if args.device == "all" else [args.device]
    if "cuda" in targets and not torch.cuda.is_available():
        parser.error("--device cuda, but this torch build sees no CUDA device")
    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} CPU thread(s), "
        f"devices: {', '.join(targets)}; plan: {plan}",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="vadflow-bench-") as data:
        prepare_data(Path(data), plan, plan.sizes)
        shared = {"plan": dataclasses.asdict(plan), "data": data}
        if args.threads:
            shared["threads"] = args.threads

        results: list[dict[str, Any]] = []
        for device in targets:
            for size in plan.sizes:
                for family in families:
                    spec = {"kind": "throughput", "family": family, "size": size, "device": device}
                    result = run_child({**spec, **shared}, plan.timeout_s)
                    results.append(result)
                    status = result.get("error") or f"{result['train_tiles_per_s']:,.0f} tiles/s"
                    print(f"  {family} {size}px {device}: {status}", file=sys.stderr, flush=True)
        throughput_table(results, threads)
        if labelled:
            print(
                f"Skipped (they learn from labels, not normal tiles alone): {', '.join(labelled)}"
            )

        comparison: list[dict[str, Any]] = []
        missing = [f for f in COMPARED if f not in registered]
        if args.skip_comparison:
            pass
        elif missing:
            print(f"\nAnoGAN vs f-AnoGAN skipped: {', '.join(missing)} not registered.")
        else:
            for device in targets:
                for family in COMPARED:
                    spec = {"kind": "compare", "family": family, "device": device}
                    comparison.append(run_child({**spec, **shared}, plan.timeout_s))
            comparison_table(comparison, quick=args.quick)

    if args.json:
        args.json.write_text(
            json.dumps({"throughput": results, "comparison": comparison}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
