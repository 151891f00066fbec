"""The benchmark site's tiles, cut as the nightly flow cuts them, and tile AUROC over them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TILE_POSITIVE = 0.5  # a tile counts as lesion for tile AUROC at this label fraction or more


@dataclass
class TileSet:
    """The test slides' tiles, in manifest order, with what tile AUROC needs about each. No
    pixels: scoring reads them from the slides, as the nightly flow does."""

    label_fraction: np.ndarray  # (N,) float, share of the tile inside a lesion
    slide: np.ndarray  # (N,) int, index into `slide_names`
    slide_names: list[str]
    artefact: np.ndarray | None = None  # (N,) bool, under the artefact QC mask (None: no QC)


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
    contaminated: tuple[str, ...] = ()  # tumour slides trained on as if normal (`contamination`)
    train_slides: tuple[str, ...] = ()  # the slides whose tiles are `train`
    train_tile_slides: np.ndarray | None = None  # (N,) the slide of each `train` tile
    masks_dir: str = ""  # tissue masks and, under qc/, the artefact QC masks


def contaminated_training(
    normal: Sequence[str], tumour: Sequence[str], contamination: float
) -> tuple[list[str], list[str]]:
    """The training slides when a share `contamination` of the normal ones is replaced by
    unlabelled tumour slides: (training slides, the tumour slides among them).

    At least one slide is replaced whenever `contamination` > 0 (a site has few slides: 10 % of
    5 rounds to one, i.e. 20 %); the last normal slides (sorted) make way for the first tumour
    slides, so a run is repeatable. ValueError when the site has too few tumour slides.
    """
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1), got {contamination}")
    normal, tumour = sorted(normal), sorted(tumour)
    k = max(1, round(contamination * len(normal))) if contamination > 0 else 0
    if k >= len(normal):
        raise ValueError(
            f"contamination {contamination:g} would replace {k} of the {len(normal)} normal "
            "training slides; lower it or use a larger --size"
        )
    if k > len(tumour):
        raise ValueError(
            f"contamination {contamination:g} needs {k} tumour training slides, the site has "
            f"{len(tumour)}; lower it or use a larger --size"
        )
    return normal[: len(normal) - k] + tumour[:k], tumour[:k]


def load_benchmark_tiles(
    site_dir: Path,
    tile_size: int = 64,
    work_dir: Path | None = None,
    contamination: float = 0.0,
    category: str | None = None,
) -> BenchmarkData:
    """Tile the site as the pipeline does and read train, val and test tiles.

    Tiling is `tasks.tiling.grid.tile_slide` with the site's own settings (but `tile_size`),
    so the benchmark sees exactly the tiles a nightly run trains and scores on.
    `contamination` > 0 trains the unsupervised families on a set where that share of the normal
    training slides is replaced by the site's (annotated) tumour training slides, unlabelled
    (`contaminated_training`); validation slides stay normal. `category` keeps only that
    category's images of an industrial site (`<category>/<split>/...`), as the nightly flow
    trains one model per category.
    """
    import polars as pl

    from vadflow.tasks.site import load_site
    from vadflow.tasks.slides.discover import discover, industrial_category
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
        if category is not None and industrial_category(source.uri) != category:
            continue
        row = register_slide(source, site.name, site.domain, site.mpp_override)
        if row["status"] != "ok":
            raise ValueError(f"benchmark site slide {row['slide_id']}: {row['reason']}")
        result = tile_slide(
            row, site.tiling, site.domain, work / "tiles", work / "masks", qc=site.qc
        )
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

    def ids_of(split: str, label: str | None = None) -> list[str]:
        chosen = slides.filter(pl.col("split") == split)
        if label is not None:
            chosen = chosen.filter(pl.col("label") == label)
        return sorted(chosen["slide_id"])

    def tiles_of(split: str, label: str | None = None) -> pl.DataFrame:
        ids = ids_of(split, label)
        if not ids:
            raise ValueError(f"benchmark site {site_dir} has no {split} slides")
        return pl.concat([manifests[i] for i in ids])

    train_ids, contaminated = contaminated_training(
        ids_of("train", "normal"), ids_of("train", "anomalous"), contamination
    )
    if not train_ids:
        raise ValueError(f"benchmark site {site_dir} has no normal train slides")

    test_rows = tiles_of("test")
    names = sorted(set(test_rows["slide_id"]))
    # Industrial images and sites without QC have no artefact flags (the column null).
    flags = test_rows["artefact"] if "artefact" in test_rows.columns else None
    if flags is not None and flags.null_count() == len(flags):
        flags = None
    test = TileSet(
        label_fraction=test_rows["label_fraction"].to_numpy(),
        slide=np.array([names.index(s) for s in test_rows["slide_id"]]),
        slide_names=names,
        artefact=None if flags is None else flags.fill_null(False).to_numpy().astype(bool),
    )
    return BenchmarkData(
        train=load_tiles(pl.concat([manifests[i] for i in train_ids]), uris),
        val=load_tiles(tiles_of("val"), uris),
        test=test,
        site=site,
        slides=slides.filter(pl.col("split").is_in(["val", "test"])),
        manifests=manifests,
        slides_path=str(slides_path),
        tile_paths=tile_paths,
        contaminated=tuple(contaminated),
        train_slides=tuple(train_ids),
        train_tile_slides=np.repeat(np.array(train_ids), [manifests[i].height for i in train_ids]),
        masks_dir=str(work / "masks"),
    )


def tile_auroc(test: TileSet, tile_scores: np.ndarray, *, qc_passed: bool = False) -> float:
    """Tiles at least TILE_POSITIVE lesion against lesion-free tiles; NaN if undefined.

    `qc_passed` leaves out the tiles under the artefact QC mask: the tiles the pipeline calls
    (their candidates and slide scores leave the QC'd ones out); NaN when the site has no QC.
    """
    from vadflow.tasks.evaluation.metrics import image_auroc

    scores = np.asarray(tile_scores, dtype=np.float64)
    keep = (test.label_fraction >= TILE_POSITIVE) | (test.label_fraction == 0)
    if qc_passed:
        if test.artefact is None:
            return float("nan")
        keep &= ~test.artefact
    labels = test.label_fraction[keep] >= TILE_POSITIVE
    if labels.all() or not labels.any():
        return float("nan")
    return float(image_auroc(labels, scores[keep]))
