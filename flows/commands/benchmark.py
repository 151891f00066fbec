"""`vadflow benchmark-detectors`: every detector family on the same hard synthetic site.

The honest results table: each registered family trains with the same budget (epochs, tile
size, seed, device) on the normal tiles of a small hard-mode site (tasks/synth/pathology.py:
lesions at the host's stain, folds, fat, cracks, stroma bands) and is scored on its test slides:

- tile AUROC: tiles at least half lesion against lesion-free tiles (tiles in between are left
  out of this number, not of the others);
- slide AUC: a slide's score is the maximum of its tile scores; tumour against normal slides;
- pixel AUROC: anomaly maps against the ground-truth masks, over tissue tiles of the test slides;
- seconds: fit plus scoring, on this machine;
- direction: "inverted" when tile AUROC < 0.5, i.e. the family ranks lesions *below* normal
  tissue, the failure a residual score shows on lesions that are easier to reconstruct than
  stroma. It is flagged, not hidden.

A family that fails (raises) gets a row with its error, and the others still run. Families that
learn from labels (`supervision` "tile" or "slide") cannot train on normal tiles alone: they are
left out unless named, and then get a "skipped" row.
"""

from __future__ import annotations

import math
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

# Tile cutting below reads pixels; the families run in this process. Small sites only.

TILE_POSITIVE = 0.5  # a tile counts as lesion for tile AUROC at this label fraction or more
WORKING_MPP = 0.5  # um/px of the tiles, as the pipeline's default tiling
TISSUE_OD = 0.3  # summed RGB optical density above which a pixel counts as tissue
MIN_TISSUE = 0.5  # tiles with less tissue are not used


@dataclass(frozen=True)
class SiteSize:
    """A hard site's geometry: slide size (level 0, 0.25 um/px) and how many of each slide."""

    width: int
    height: int
    n_train_normal: int  # the last one is held out as validation when there are two or more
    n_test_normal: int
    n_test_tumor: int


SIZES: dict[str, SiteSize] = {
    "tiny": SiteSize(2048, 1536, 3, 1, 2),
    "small": SiteSize(3072, 2048, 4, 3, 3),
    "medium": SiteSize(3072, 2304, 6, 5, 5),
}


@dataclass
class TileSet:
    """Tiles cut from some slides, with what the evaluation needs about each."""

    tiles: np.ndarray  # (N, T, T, 3) uint8
    label_fraction: np.ndarray  # (N,) float, share of the tile inside a lesion
    masks: np.ndarray  # (N, T, T) bool, lesion pixels
    tissue: np.ndarray  # (N, T, T) bool, tissue pixels
    slide: np.ndarray  # (N,) int, index into `slide_names`
    slide_names: list[str]
    slide_tumour: list[bool]


@dataclass(frozen=True)
class BenchmarkData:
    train: np.ndarray  # (N, T, T, 3) uint8 normal tiles
    val: np.ndarray  # (M, T, T, 3) uint8 normal tiles
    test: TileSet


@dataclass(frozen=True)
class BenchmarkRow:
    """One family's line of the results table; metrics are NaN when undefined or failed."""

    family: str
    tile_auroc: float
    slide_auc: float
    pixel_auroc: float
    seconds: float
    direction: str  # "ok", "inverted", "failed" (error says why) or "skipped" (needs labels)
    error: str = ""


def build_hard_site(
    out_dir: Path, size: str | SiteSize = "small", seed: int = 0, name: str = "hard-site"
) -> Path:
    """Write a hard-mode Camelyon16-shaped site and return its folder."""
    from tasks.synth.pathology import make_pathology_site

    geometry = _size(size)
    return make_pathology_site(
        Path(out_dir),
        name,
        n_train_normal=geometry.n_train_normal,
        n_test_normal=geometry.n_test_normal,
        n_test_tumor=geometry.n_test_tumor,
        width=geometry.width,
        height=geometry.height,
        seed=seed,
        mode="hard",
    )


def cut_tiles(
    slide_path: Path,
    mask_path: Path | None = None,
    *,
    tile_size: int = 64,
    working_mpp: float = WORKING_MPP,
    min_tissue: float = MIN_TISSUE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping tissue tiles of one slide at `working_mpp`.

    Returns tiles (N, T, T, 3) uint8, lesion masks (N, T, T) bool (all False without
    `mask_path`) and tissue masks (N, T, T) bool. The whole slide is read at the working
    resolution at once, so this is for small (synthetic) slides only.
    """
    from tasks.slides.ground_truth import ground_truth_mask
    from tasks.slides.reader import Slide, resize_rgb

    with Slide(slide_path) as slide:
        downsample = working_mpp / (slide.mpp or working_mpp)
        level = slide.best_level_for_downsample(downsample)
        info = slide.levels[level]
        image = np.array(slide.read_region(level, 0, 0, info.width, info.height))
        width0, height0 = slide.width, slide.height
    shape = (math.ceil(height0 / downsample), math.ceil(width0 / downsample))
    if image.shape[:2] != shape:
        image = resize_rgb(image, shape[1], shape[0])
    if mask_path is not None:
        lesion = ground_truth_mask(str(mask_path), width0, height0, downsample) >= 0.5
    else:
        lesion = np.zeros(shape, dtype=bool)
    density = -np.log((image.astype(np.float32) + 1) / 256).sum(axis=-1)  # (H, W)
    tissue = density > TISSUE_OD
    tiles, masks, tissues = [], [], []
    for y in range(0, shape[0] - tile_size + 1, tile_size):
        for x in range(0, shape[1] - tile_size + 1, tile_size):
            window = np.s_[y : y + tile_size, x : x + tile_size]
            if tissue[window].mean() < min_tissue:
                continue
            tiles.append(image[window])
            masks.append(lesion[window])
            tissues.append(tissue[window])
    n = len(tiles)
    t = tile_size
    return (
        np.stack(tiles) if n else np.zeros((0, t, t, 3), np.uint8),
        np.stack(masks) if n else np.zeros((0, t, t), bool),
        np.stack(tissues) if n else np.zeros((0, t, t), bool),
    )


def load_benchmark_tiles(site: Path, tile_size: int = 64) -> BenchmarkData:
    """Train/val tiles from the site's normal training slides, test tiles from its test slides."""
    import csv

    normals = sorted((site / "training" / "normal").glob("*.tif"))
    if not normals:
        raise FileNotFoundError(f"{site}: no normal training slides under training/normal")
    held_out = normals[-1:] if len(normals) >= 2 else []
    train = [cut_tiles(p, tile_size=tile_size)[0] for p in normals if p not in held_out]
    train_tiles = np.concatenate(train)
    if held_out:
        val_tiles = cut_tiles(held_out[0], tile_size=tile_size)[0]
    else:  # one normal slide: validate on a tenth of its tiles
        val_tiles = train_tiles[: max(1, len(train_tiles) // 10)]

    with (site / "testing" / "reference.csv").open(newline="") as handle:
        labels = {row["image"]: row["label"] == "Tumor" for row in csv.DictReader(handle)}
    parts, names, tumour = [], [], []
    for index, (stem, is_tumour) in enumerate(sorted(labels.items())):
        mask = site / "ground_truth" / f"{stem}_mask.tif"
        tiles, masks, tissue = cut_tiles(
            site / "testing" / "images" / f"{stem}.tif",
            mask if is_tumour else None,
            tile_size=tile_size,
        )
        parts.append((tiles, masks, tissue, np.full(len(tiles), index)))
        names.append(stem)
        tumour.append(is_tumour)
    masks = np.concatenate([p[1] for p in parts])
    test = TileSet(
        tiles=np.concatenate([p[0] for p in parts]),
        label_fraction=masks.reshape(len(masks), -1).mean(axis=1),
        masks=masks,
        tissue=np.concatenate([p[2] for p in parts]),
        slide=np.concatenate([p[3] for p in parts]),
        slide_names=names,
        slide_tumour=tumour,
    )
    return BenchmarkData(train=train_tiles, val=val_tiles, test=test)


def evaluate_scores(
    test: TileSet, tile_scores: np.ndarray, maps: np.ndarray | None = None, *, seed: int = 0
) -> tuple[float, float, float]:
    """(tile AUROC, slide AUC, pixel AUROC) of one family's scores on `test`; NaN if undefined.

    Pixel AUROC pools tissue pixels of all test tiles, subsampled to 2M pixels.
    """
    from sklearn.metrics import roc_auc_score

    def auc(labels: np.ndarray, scores: np.ndarray) -> float:
        labels = np.asarray(labels, bool)
        if labels.all() or not labels.any():
            return float("nan")
        return float(roc_auc_score(labels, scores))

    scores = np.asarray(tile_scores, dtype=np.float64)
    keep = (test.label_fraction >= TILE_POSITIVE) | (test.label_fraction == 0)
    tile = auc(test.label_fraction[keep] >= TILE_POSITIVE, scores[keep])
    slide_scores = [
        scores[test.slide == i].max() if (test.slide == i).any() else -np.inf
        for i in range(len(test.slide_names))
    ]
    slide = auc(np.array(test.slide_tumour), np.array(slide_scores))
    pixel = float("nan")
    if maps is not None:
        labels = test.masks[test.tissue]
        values = np.asarray(maps)[test.tissue]
        if labels.size > 2_000_000:
            pick = np.random.default_rng(seed).choice(labels.size, 2_000_000, replace=False)
            labels, values = labels[pick], values[pick]
        pixel = auc(labels, values)
    return tile, slide, pixel


def unsupervised_families() -> list[str]:
    """Registered families that train on normal tiles alone (`supervision == "none"`)."""
    from tasks.detectors import available_families, detector_class

    return [
        f
        for f in available_families()
        if getattr(detector_class(f), "supervision", "none") == "none"
    ]


def budget_overrides(
    family: str, *, epochs: int, tile_size: int, seed: int, device: str
) -> dict[str, object]:
    """The same budget for every family: the config fields it has among these."""
    from tasks.detectors import detector_class

    names = {f.name for f in fields(detector_class(family).config_cls)}
    wanted = {"epochs": epochs, "tile_size": tile_size, "seed": seed, "device": device}
    return {k: v for k, v in wanted.items() if k in names}


def run_family(
    family: str, data: BenchmarkData, *, epochs: int, tile_size: int, seed: int, device: str
) -> BenchmarkRow:
    """Fit one family on the normal tiles and score the test tiles; failures become a row."""
    from tasks.detectors import create_detector, detector_class

    started = time.perf_counter()
    nan = float("nan")
    supervision = getattr(detector_class(family), "supervision", "none")
    if supervision != "none":
        return BenchmarkRow(
            family, nan, nan, nan, 0.0, "skipped", f"needs labels (supervision={supervision!r})"
        )
    try:
        detector = create_detector(
            family,
            **budget_overrides(
                family, epochs=epochs, tile_size=tile_size, seed=seed, device=device
            ),
        )
        detector.fit(data.train, data.val)
        out = detector.score(data.test.tiles)
        seconds = time.perf_counter() - started
        scores = out.tile_score.numpy()
        if not np.isfinite(scores).all():
            raise FloatingPointError(
                f"{family} gave {int((~np.isfinite(scores)).sum())} NaN scores"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tile, slide, pixel = evaluate_scores(
                data.test, scores, out.anomaly_map[:, 0].numpy(), seed=seed
            )
    except Exception as exc:  # one broken family must not hide the others' results
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        return BenchmarkRow(
            family=family,
            tile_auroc=nan,
            slide_auc=nan,
            pixel_auroc=nan,
            seconds=time.perf_counter() - started,
            direction="failed",
            error=f"{type(exc).__name__}: {exc} ({where})",
        )
    direction = "inverted" if tile < 0.5 else "ok"
    return BenchmarkRow(family, tile, slide, pixel, seconds, direction)


def benchmark_detectors(
    families: Sequence[str] | None = None,
    size: str | SiteSize = "small",
    epochs_budget: int = 3,
    seed: int = 0,
    *,
    tile_size: int = 64,
    device: str = "auto",
    out_dir: Path | None = None,
    show: bool = True,
) -> list[BenchmarkRow]:
    """Train every unsupervised family (or `families`) on one hard synthetic site with the same
    budget.

    Returns one row per family and, with `show`, prints the table. Families that need labels
    (`supervision` other than "none") are left out by default and get a "skipped" row when
    named. The site is written under `out_dir` (a temporary folder, removed afterwards, when
    None).
    """
    from tasks.detectors import available_families

    chosen = list(families) if families else unsupervised_families()
    unknown = sorted(set(chosen) - set(available_families()))
    if unknown:
        raise KeyError(
            f"unknown detector family {', '.join(unknown)}; available: "
            f"{', '.join(available_families())}"
        )
    if epochs_budget < 1:
        raise ValueError(f"epochs_budget must be >= 1, got {epochs_budget}")
    with tempfile.TemporaryDirectory(prefix="vadflow-benchmark-") as scratch:
        root = Path(out_dir) if out_dir is not None else Path(scratch)
        site = build_hard_site(root, size, seed)
        data = load_benchmark_tiles(site, tile_size)
    rows = []
    for family in chosen:
        if show:
            print(f"benchmark: {family} ({len(rows) + 1}/{len(chosen)})", flush=True)
        rows.append(
            run_family(
                family, data, epochs=epochs_budget, tile_size=tile_size, seed=seed, device=device
            )
        )
    if show:
        print_table(rows, data, size=size, epochs=epochs_budget)
    return rows


def format_table(rows: Sequence[BenchmarkRow]) -> str:
    """The results as a Markdown table (for the README and issue notes)."""

    def num(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.3f}"

    lines = [
        "| family | tile AUROC | slide AUC | pixel AUROC | seconds | direction |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        direction = f"{row.direction}: {row.error}" if row.error else row.direction
        lines.append(
            f"| {row.family} | {num(row.tile_auroc)} | {num(row.slide_auc)} | "
            f"{num(row.pixel_auroc)} | {row.seconds:.1f} | {direction} |"
        )
    return "\n".join(lines)


def print_table(
    rows: Sequence[BenchmarkRow], data: BenchmarkData, *, size: str | SiteSize, epochs: int
) -> None:
    from rich.console import Console
    from rich.table import Table

    test = data.test
    positives = int((test.label_fraction >= TILE_POSITIVE).sum())
    negatives = int((test.label_fraction == 0).sum())
    title = (
        f"hard synthetic site ({size if isinstance(size, str) else 'custom'}): "
        f"{len(data.train)} train / {len(data.val)} val normal tiles, test {positives} lesion "
        f"+ {negatives} normal tiles on {len(test.slide_names)} slides; {epochs} epochs each"
    )
    table = Table(title=title)
    for column in ("family", "tile AUROC", "slide AUC", "pixel AUROC", "seconds", "direction"):
        table.add_column(column, justify="left" if column in ("family", "direction") else "right")
    for row in rows:
        cells = [
            "n/a" if math.isnan(v) else f"{v:.3f}"
            for v in (row.tile_auroc, row.slide_auc, row.pixel_auroc)
        ]
        if row.direction == "inverted":
            direction = "[red]inverted[/]"
        elif row.direction == "failed":
            direction = f"[red]failed[/] {row.error}"
        elif row.direction == "skipped":
            direction = f"skipped: {row.error}"
        else:
            direction = "ok"
        table.add_row(row.family, *cells, f"{row.seconds:.1f}", direction)
    Console().print(table)


def _size(size: str | SiteSize) -> SiteSize:
    if isinstance(size, SiteSize):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}") from None
