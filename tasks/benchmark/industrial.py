"""The honest results table on a hard industrial line: one model per family and category.

The line is `tasks/synth/industrial.py` in hard mode (colour-keeping smudges and scratches that
follow the grain) with both categories (fabric, wood) in one MVTec AD-shaped site. As the
nightly flow does on an industrial site, each family trains one model per category on that
category's `train/good` images only, is calibrated on its own held-out good images, and scores
every test image whole (`tile_slide` lays tiles flush with the image's edges, so every pixel
gets a score); the metrics are `evaluate_site`'s MVTec AD set:

- image AUROC: image score = maximum of its anomaly map (MVTec AD's definition), defective
  against good test images; beside it the AUROC of the site's own image score (`auto`: the
  tail score of `tasks/scoring/tail.py`, as a nightly run reports it);
- pixel AUROC: every pixel of every test image against the ground-truth masks;
- AU-PRO: area under the per-region overlap curve up to FPR 0.3, normalised (`pro_score`).

A row per (family, category); a family that fails gets a row with its error (`run_family`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from vadflow.tasks.benchmark.families import BenchmarkRow, checked_families, run_family
from vadflow.tasks.benchmark.tiles import load_benchmark_tiles


@dataclass(frozen=True)
class LineSize:
    """A hard line's geometry, per category: images and their edge in px."""

    n_train: int  # good training images; a quarter of them is held out as validation
    n_test_good: int
    n_test_per_defect: int  # per defect kind (smudge, scratch)
    image_size: int


LINE_SIZES: dict[str, LineSize] = {
    "tiny": LineSize(8, 4, 2, 64),
    # 20 good and 20 defective test images per category: one misranked image moves the image
    # AUROC by at most 0.0025 x its rank distance, so 0.98 means a handful of errors at most.
    "small": LineSize(40, 20, 10, 128),
    "medium": LineSize(80, 40, 20, 128),
}

# The benchmark line's tiling: tiles of half an image's edge (64 px on 128 px images), every
# other tile overlapping by half, the heatmap at full resolution. `tile_size` overrides the edge.
LINE_TILING = {
    "target_mpp": None,
    "tile_size": 64,
    "stride": 32,
    "heatmap_downsample": 1,
    "foreground_mask": False,
    "mask_mpp": 8.0,
}

# The line's `detectors:` block: per-family settings the benchmark trains with, as a site file
# would give them. Empty: every family at the industrial domain's defaults
# (`tasks/detectors/settings.py: DOMAIN_DEFAULTS`), as on an industrial site.
LINE_DETECTORS: dict[str, dict[str, Any]] = {}


def line_size(size: str | LineSize) -> LineSize:
    """`size` by name (tiny, small, medium) or as given; ValueError naming the sizes."""
    if isinstance(size, LineSize):
        return size
    try:
        return LINE_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(LINE_SIZES)}") from None


def build_hard_line(
    out_dir: Path,
    size: str | LineSize = "small",
    seed: int = 0,
    *,
    name: str = "hard-line",
    tile_size: int | None = None,
    detectors: Mapping[str, Mapping[str, Any]] | None = None,
    defects: Sequence[str] | None = None,
) -> Path:
    """Write a hard-mode MVTec AD-shaped line with every category and return its folder.

    Its `site.yaml` gets the benchmark's tiling (`LINE_TILING`, `tile_size` overriding the tile
    edge and the stride at half of it) and `detectors` (default `LINE_DETECTORS`) as its
    `detectors:` block, so the families train as a site file configures them. `defects` (None:
    every hard defect, smudge and scratch) picks the defect kinds drawn.
    """
    from vadflow.tasks.synth.industrial import CATEGORIES, make_industrial_site

    geometry = line_size(size)
    site = Path(out_dir) / name
    for category in CATEGORIES:
        # Each call writes its own category folder beside the others (and site.yaml again).
        site = make_industrial_site(
            Path(out_dir),
            name,
            category=category,
            n_train=geometry.n_train,
            n_test_good=geometry.n_test_good,
            n_test_per_defect=geometry.n_test_per_defect,
            image_size=geometry.image_size,
            seed=seed,
            mode="hard",
            defects=defects,
        )
    tiling = dict(LINE_TILING)
    if tile_size is not None:
        tiling |= {"tile_size": tile_size, "stride": max(1, tile_size // 2)}
    config = yaml.safe_load((site / "site.yaml").read_text())
    config["tiling"] = tiling
    chosen = LINE_DETECTORS if detectors is None else detectors
    if chosen:
        config["detectors"] = {family: dict(values) for family, values in chosen.items()}
    (site / "site.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return site


def line_categories(site_dir: Path) -> list[str]:
    """The categories of an MVTec AD-shaped site: its folders with a `train/good` folder."""
    return sorted(p.name for p in Path(site_dir).iterdir() if (p / "train" / "good").is_dir())


def benchmark_industrial(
    families: Sequence[str] | None = None,
    size: str | LineSize = "small",
    epochs_budget: int | None = 3,
    seed: int = 0,
    *,
    device: str = "auto",
    score: str = "residual",
    features: str | None = None,
    tile_size: int | None = None,
    detectors: Mapping[str, Mapping[str, Any]] | None = None,
    defects: Sequence[str] | None = None,
    out_dir: Path | None = None,
    show: bool = True,
) -> list[BenchmarkRow]:
    """Train every family (or `families`) on each category of a hard industrial line.

    Same budget conventions as `benchmark_detectors` (`epochs_budget` None: each family's own
    epochs; `score`, `features` as there). `tile_size` None keeps `LINE_TILING`'s; `detectors`
    None the line's `LINE_DETECTORS` block; `defects` None every hard defect. Returns a row per
    family and category (category by category), printing each as it lands and the table at the
    end when `show`. The line is written under `out_dir` (a temporary folder, removed
    afterwards, when None).
    """
    from vadflow.tasks.benchmark.table import format_industrial_table, print_industrial_table
    from vadflow.tasks.site import load_site

    chosen = checked_families(families, epochs_budget, score)
    rows: list[BenchmarkRow] = []
    with tempfile.TemporaryDirectory(prefix="vadflow-benchmark-line-") as scratch:
        root = Path(out_dir) if out_dir is not None else Path(scratch)
        site_dir = build_hard_line(
            root, size, seed, tile_size=tile_size, detectors=detectors, defects=defects
        )
        edge = load_site(site_dir).tiling.tile_size
        categories = line_categories(site_dir)
        for category in categories:
            data = load_benchmark_tiles(site_dir, edge, root / "work" / category, category=category)
            for family in chosen:
                if show:
                    step = len(rows) + 1
                    total = len(chosen) * len(categories)
                    print(f"benchmark: {family} on {category} ({step}/{total})", flush=True)
                row = run_family(
                    family,
                    data,
                    epochs=epochs_budget,
                    tile_size=edge,
                    seed=seed,
                    device=device,
                    score=score,
                    features=features,
                )
                rows.append(industrial_row(row, category))
                if show:
                    print(format_industrial_table([rows[-1]]).splitlines()[-1], flush=True)
    if show:
        print_industrial_table(rows, size=size, epochs=epochs_budget)
    return rows


def industrial_row(row: BenchmarkRow, category: str) -> BenchmarkRow:
    """`row` of one category's model: named by its category, and flagged `inverted` by its
    image AUROC (an industrial test set has too few tiles that are half defect for the tile
    AUROC `run_family` judges the direction by)."""
    direction = row.direction
    if direction in ("ok", "inverted"):
        direction = "inverted" if row.slide_auc_max < 0.5 else "ok"
    return replace(row, category=category, direction=direction)
