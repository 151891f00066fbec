"""`vadflow benchmark-detectors`: every detector family on the same hard synthetic site.

The honest results table: each registered family trains with the same budget (epochs, tile
size, seed, device) on the normal training tiles of a small hard-mode site
(tasks/synth/pathology.py: lesions at the host's stain, folds, fat, cracks, stroma bands) and
scores its validation and test slides. Tiling, scoring, heatmaps and metrics are the nightly
flow's own functions (`tile_slide`, `score_slide`, `evaluate_site`), without Prefect or MLflow:

- tile AUROC: tiles at least half lesion against lesion-free tiles (tiles in between are left
  out of this number, not of the others);
- slide AUC: slide score = maximum of its heatmap; tumour against normal test slides;
- FROC: Camelyon16's, from heatmap local maxima, lesions from 10 um up (FROC_ITC_UM);
- pixel AUROC: heatmaps against the ground-truth masks of the test slides;
- seconds: fit plus scoring, on this machine;
- direction: "inverted" when tile AUROC < 0.5, i.e. the family ranks lesions *below* normal
  tissue, the failure a residual score shows on lesions that are easier to reconstruct than
  stroma. It is flagged, not hidden.

A family that fails (raises) gets a row with its error, and the others still run. The site has
annotated tumour training slides too, so the labelled baselines (supervised_cnn from tile
labels, mil from slide labels) train on it the way the nightly flow trains them
(`labelled_training_tiles`, `training_bags`) and sit in the same table as what labels buy;
the unsupervised families never see those slides.
"""

from __future__ import annotations

import math
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

# Tile cutting below reads pixels; the families run in this process. Small sites only.

TILE_POSITIVE = 0.5  # a tile counts as lesion for tile AUROC at this label fraction or more
# Synthetic lesions are at most ~1 mm across on these small slides; Camelyon16's 275 um ITC rule
# would ignore most of them, so FROC here counts lesions from 10 um up (as the demo site does).
FROC_ITC_UM = 10.0
SCORES = ("residual", "latent", "combined")  # tasks/detectors/latent_density.py


@dataclass(frozen=True)
class SiteSize:
    """A hard site's geometry: slide size (level 0, 0.25 um/px) and how many of each slide."""

    width: int
    height: int
    n_train_normal: int  # a quarter of them (at least one) is held out as validation
    n_test_normal: int
    n_test_tumor: int
    n_train_tumor: int = 0  # annotated: only the labelled baselines train on them


SIZES: dict[str, SiteSize] = {
    "tiny": SiteSize(2048, 1536, 3, 1, 2, 1),
    "small": SiteSize(3072, 2048, 4, 3, 3, 2),
    "medium": SiteSize(3072, 2304, 6, 5, 5, 3),
}


@dataclass
class TileSet:
    """The test slides' tiles, in manifest order, with what tile AUROC needs about each. No
    pixels: scoring reads them from the slides, as the nightly flow does."""

    label_fraction: np.ndarray  # (N,) float, share of the tile inside a lesion
    slide: np.ndarray  # (N,) int, index into `slide_names`
    slide_names: list[str]


@dataclass(frozen=True)
class BenchmarkData:
    """A tiled site: normal train/val tiles, the test tiles, and what scoring slides needs."""

    train: np.ndarray  # (N, T, T, 3) uint8 normal tiles
    val: np.ndarray  # (M, T, T, 3) uint8 normal tiles
    test: TileSet
    site: Any = None  # SiteConfig
    slides: Any = None  # pl.DataFrame: the slide manifest (val and test slides)
    manifests: dict[str, Any] = field(default_factory=dict)  # slide_id -> tile manifest
    slides_path: str = ""  # every slide's manifest row, as the nightly flow writes it
    tile_paths: list[str] = field(default_factory=list)  # train and val slides' tile manifests


@dataclass(frozen=True)
class BenchmarkRow:
    """One family's line of the results table; metrics are NaN when undefined or failed."""

    family: str
    tile_auroc: float
    slide_auc: float
    froc: float
    pixel_auroc: float
    seconds: float
    direction: str  # "ok", "inverted", "failed" (error says why) or "skipped" (needs labels)
    error: str = ""


def build_hard_site(
    out_dir: Path, size: str | SiteSize = "small", seed: int = 0, name: str = "hard-site"
) -> Path:
    """Write a hard-mode Camelyon16-shaped site and return its folder."""
    from vadflow.tasks.synth.pathology import make_pathology_site

    geometry = _size(size)
    return make_pathology_site(
        Path(out_dir),
        name,
        n_train_normal=geometry.n_train_normal,
        n_test_normal=geometry.n_test_normal,
        n_test_tumor=geometry.n_test_tumor,
        n_train_tumor=geometry.n_train_tumor,
        width=geometry.width,
        height=geometry.height,
        seed=seed,
        mode="hard",
    )


def load_benchmark_tiles(
    site_dir: Path, tile_size: int = 64, work_dir: Path | None = None
) -> BenchmarkData:
    """Tile the site as the pipeline does and read train, val and test tiles.

    Tiling is `tasks.tiling.grid.tile_slide` with the site's own settings (but `tile_size`),
    so the benchmark sees exactly the tiles a nightly run trains and scores on.
    """
    import polars as pl

    from vadflow.tasks.site import load_site
    from vadflow.tasks.slides.discover import discover
    from vadflow.tasks.slides.register import register_slide, slide_frame
    from vadflow.tasks.slides.tiles import load_tiles
    from vadflow.tasks.tiling.grid import tile_slide

    site = load_site(site_dir)
    site = site.model_copy(
        update={"tiling": site.tiling.model_copy(update={"tile_size": tile_size})}
    )
    work = Path(work_dir) if work_dir is not None else Path(site_dir) / "_benchmark"
    rows, manifests, tile_paths = [], {}, []
    for source in discover(site.source, site.domain, site.val_fraction):
        row = register_slide(source, site.name, site.domain, site.mpp_override)
        if row["status"] != "ok":
            raise ValueError(f"benchmark site slide {row['slide_id']}: {row['reason']}")
        result = tile_slide(row, site.tiling, site.domain, work / "tiles", work / "masks")
        if result.status != "ok":
            raise ValueError(f"benchmark site slide {row['slide_id']}: {result.reason}")
        rows.append(row)
        manifests[row["slide_id"]] = pl.read_parquet(result.manifest)
        if row["split"] in ("train", "val"):
            tile_paths.append(result.manifest)
    slides = slide_frame(rows)
    slides_path = work / "slides.parquet"
    slides.write_parquet(slides_path)
    uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))

    def tiles_of(split: str, label: str | None = None) -> pl.DataFrame:
        chosen = slides.filter(pl.col("split") == split)
        if label is not None:
            chosen = chosen.filter(pl.col("label") == label)
        ids = sorted(chosen["slide_id"])
        if not ids:
            raise ValueError(f"benchmark site {site_dir} has no {split} slides")
        return pl.concat([manifests[i] for i in ids])

    test_rows = tiles_of("test")
    names = sorted(set(test_rows["slide_id"]))
    test = TileSet(
        label_fraction=test_rows["label_fraction"].to_numpy(),
        slide=np.array([names.index(s) for s in test_rows["slide_id"]]),
        slide_names=names,
    )
    return BenchmarkData(
        train=load_tiles(tiles_of("train", "normal"), uris),
        val=load_tiles(tiles_of("val"), uris),
        test=test,
        site=site,
        slides=slides.filter(pl.col("split").is_in(["val", "test"])),
        manifests=manifests,
        slides_path=str(slides_path),
        tile_paths=tile_paths,
    )


def tile_auroc(test: TileSet, tile_scores: np.ndarray) -> float:
    """Tiles at least TILE_POSITIVE lesion against lesion-free tiles; NaN if undefined."""
    from vadflow.tasks.evaluation.metrics import image_auroc

    scores = np.asarray(tile_scores, dtype=np.float64)
    keep = (test.label_fraction >= TILE_POSITIVE) | (test.label_fraction == 0)
    labels = test.label_fraction[keep] >= TILE_POSITIVE
    if labels.all() or not labels.any():
        return float("nan")
    return float(image_auroc(labels, scores[keep]))


def score_and_evaluate(detector: Any, data: BenchmarkData, out_dir: Path) -> dict[str, float]:
    """Score every val and test slide into heatmaps and evaluate them as a nightly run does.

    Returns the pipeline's metrics (slide_auroc, froc, pixel_auroc, ...) plus tile_auroc from
    the same tile scores.
    """
    import polars as pl

    from vadflow.tasks.evaluation.evaluate import evaluate_site
    from vadflow.tasks.scoring.heatmap import score_slide

    site = data.site
    scores, tile_scores = {}, []
    for row in data.slides.sort("slide_id").to_dicts():
        scored = score_slide(
            detector,
            row,
            data.manifests[row["slide_id"]],
            out_dir,
            site.tiling.heatmap_downsample,
        )
        scores[row["slide_id"]] = (scored.slide_score, scored.heatmap)
        if row["split"] == "test":
            tile_scores.append(pl.read_parquet(scored.tile_scores))
    evaluation = evaluate_site(
        data.slides,
        scores,
        site.tiling.heatmap_downsample,
        site.target_fpr,
        site.domain,
        itc_um=FROC_ITC_UM,
    )
    by_tile = dict(pl.concat(tile_scores).select("tile_id", "score").iter_rows())
    test_ids = pl.concat([data.manifests[s] for s in data.test.slide_names])["tile_id"]
    ordered = np.array([by_tile[t] for t in test_ids], dtype=np.float64)
    if not np.isfinite(ordered).all():
        raise FloatingPointError(f"{int((~np.isfinite(ordered)).sum())} NaN tile scores")
    return {**evaluation.metrics, "tile_auroc": tile_auroc(data.test, ordered)}


def benchmark_families() -> list[str]:
    """Every registered family: the unsupervised ones first, then the labelled baselines."""
    from vadflow.tasks.detectors.registry import available_families, detector_class

    def labelled(family: str) -> bool:
        return getattr(detector_class(family), "supervision", "none") != "none"

    return sorted(available_families(), key=labelled)


def budget_overrides(
    family: str,
    *,
    epochs: int | None,
    tile_size: int,
    seed: int,
    device: str,
    score: str = "residual",
) -> dict[str, object]:
    """The same budget for every family: the config fields it has among these.

    `epochs` None keeps each family's own default epochs. `score` reaches the families with a
    latent space (their `score` field: residual, latent or combined); the others have no such
    field and ignore it.
    """
    from vadflow.tasks.detectors.registry import detector_class

    names = {f.name for f in fields(detector_class(family).config_cls)}
    wanted = {
        "epochs": epochs,
        "tile_size": tile_size,
        "seed": seed,
        "device": device,
        "score": score,
    }
    return {k: v for k, v in wanted.items() if k in names and v is not None}


def fit_family(detector: Any, supervision: str, data: BenchmarkData) -> None:
    """Fit on what the family learns from: normal tiles, labelled tiles, or slide bags.

    Labels are read by the nightly flow's own functions; LookupError when the site has none.
    """
    from vadflow.tasks.training.sampling import labelled_training_tiles, training_bags

    if supervision == "none":
        detector.fit(data.train, data.val)
    elif supervision == "tile":
        labelled = labelled_training_tiles(data.site, data.slides_path, data.tile_paths)
        if labelled is None:
            raise LookupError("needs labels: no annotated tumour training slides")
        detector.fit_labelled(*labelled)
    else:
        bagged = training_bags(data.site, data.slides_path, data.tile_paths)
        if bagged is None:
            raise LookupError("needs labels: tumour and normal training slides")
        detector.fit_bags(*bagged)


def run_family(
    family: str,
    data: BenchmarkData,
    *,
    epochs: int | None,
    tile_size: int,
    seed: int,
    device: str,
    score: str = "residual",
) -> BenchmarkRow:
    """Fit one family, score and evaluate the slides; failures and missing labels become a row."""
    from vadflow.tasks.detectors.registry import create_detector, detector_class

    started = time.perf_counter()
    nan = float("nan")
    supervision = getattr(detector_class(family), "supervision", "none")
    budget = budget_overrides(
        family, epochs=epochs, tile_size=tile_size, seed=seed, device=device, score=score
    )
    if budget.get("score", "residual") != "residual":
        family_label = f"{family} ({score})"
    else:
        family_label = family
    try:
        detector = create_detector(family, **budget)
        fit_family(detector, supervision, data)
        with (
            tempfile.TemporaryDirectory(prefix=f"vadflow-{family}-") as scratch,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            metrics = score_and_evaluate(detector, data, Path(scratch))
    except LookupError as exc:
        return BenchmarkRow(family_label, nan, nan, nan, nan, 0.0, "skipped", str(exc))
    except Exception as exc:  # one broken family must not hide the others' results
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        return BenchmarkRow(
            family=family_label,
            tile_auroc=nan,
            slide_auc=nan,
            froc=nan,
            pixel_auroc=nan,
            seconds=time.perf_counter() - started,
            direction="failed",
            error=f"{type(exc).__name__}: {exc} ({where})",
        )
    tile = metrics["tile_auroc"]
    return BenchmarkRow(
        family_label,
        tile,
        metrics.get("slide_auroc", nan),
        metrics.get("froc", nan),
        metrics.get("pixel_auroc", nan),
        time.perf_counter() - started,
        "inverted" if tile < 0.5 else "ok",
    )


def benchmark_detectors(
    families: Sequence[str] | None = None,
    size: str | SiteSize = "small",
    epochs_budget: int | None = 3,
    seed: int = 0,
    *,
    tile_size: int = 64,
    device: str = "auto",
    score: str = "residual",
    out_dir: Path | None = None,
    show: bool = True,
) -> list[BenchmarkRow]:
    """Train every family (or `families`) on one hard synthetic site with the same budget.

    `epochs_budget` None trains each family at its own default epochs (its configured budget)
    instead of one shared number. `score` picks how the families with a latent space score
    (residual, latent, combined).

    Returns one row per family and, with `show`, prints the table. A labelled family on a site
    without the labels it needs gets a "skipped" row. The site is written under `out_dir` (a
    temporary folder, removed afterwards, when None).
    """
    from vadflow.tasks.detectors.registry import available_families

    chosen = list(families) if families else benchmark_families()
    unknown = sorted(set(chosen) - set(available_families()))
    if unknown:
        raise KeyError(
            f"unknown detector family {', '.join(unknown)}; available: "
            f"{', '.join(available_families())}"
        )
    if epochs_budget is not None and epochs_budget < 1:
        raise ValueError(f"epochs_budget must be >= 1, got {epochs_budget}")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vadflow-benchmark-") as scratch:
        root = Path(out_dir) if out_dir is not None else Path(scratch)
        site = build_hard_site(root, size, seed)
        data = load_benchmark_tiles(site, tile_size, root / "work")
        for family in chosen:
            if show:
                print(f"benchmark: {family} ({len(rows) + 1}/{len(chosen)})", flush=True)
            row = run_family(
                family,
                data,
                epochs=epochs_budget,
                tile_size=tile_size,
                seed=seed,
                device=device,
                score=score,
            )
            rows.append(row)
            if show:  # each result as it lands: the slow families take tens of minutes on CPU
                print(format_table([row]).splitlines()[-1], flush=True)
    if show:
        print_table(rows, data, size=size, epochs=epochs_budget)
    return rows


def format_table(rows: Sequence[BenchmarkRow]) -> str:
    """The results as a Markdown table (for the README and issue notes)."""

    def num(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.3f}"

    lines = [
        "| family | tile AUROC | slide AUC | FROC | pixel AUROC | seconds | direction |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        direction = f"{row.direction}: {row.error}" if row.error else row.direction
        lines.append(
            f"| {row.family} | {num(row.tile_auroc)} | {num(row.slide_auc)} | {num(row.froc)} | "
            f"{num(row.pixel_auroc)} | {row.seconds:.1f} | {direction} |"
        )
    return "\n".join(lines)


def print_table(
    rows: Sequence[BenchmarkRow],
    data: BenchmarkData,
    *,
    size: str | SiteSize,
    epochs: int | None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    test = data.test
    positives = int((test.label_fraction >= TILE_POSITIVE).sum())
    negatives = int((test.label_fraction == 0).sum())
    title = (
        f"hard synthetic site ({size if isinstance(size, str) else 'custom'}): "
        f"{len(data.train)} train / {len(data.val)} val normal tiles, test {positives} lesion "
        f"+ {negatives} normal tiles on {len(test.slide_names)} slides; "
        + (f"{epochs} epochs each" if epochs is not None else "each family's own epochs")
    )
    table = Table(title=title)
    columns = ("family", "tile AUROC", "slide AUC", "FROC", "pixel AUROC", "seconds", "direction")
    for column in columns:
        # Family names never wrap or cut ("supervised_cnn (combined)"); the rest may wrap.
        table.add_column(
            column,
            justify="left" if column in ("family", "direction") else "right",
            no_wrap=column == "family",
        )
    for row in rows:
        cells = [
            "n/a" if math.isnan(v) else f"{v:.3f}"
            for v in (row.tile_auroc, row.slide_auc, row.froc, row.pixel_auroc)
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
