"""Which tiles each kind of detector family trains on, read from a site's manifests.

- `training_tiles`: normal train tiles and held-out normal val tiles (unsupervised families);
- `labelled_training_tiles`: tumour and normal tiles with their labels (tile-supervised);
- `training_bags`: one bag of tiles per training slide, with the slide's label (slide-supervised).

Each samples a bounded number of tiles (`max_train_tiles`) with fixed seeds, so a rerun trains
on the same tiles; pixels are read from the slides only here.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from vadflow.tasks.manifests import TILE_SCHEMA, empty_frame
from vadflow.tasks.site import SiteConfig
from vadflow.tasks.slides.tiles import load_tiles, sample_tiles


def read_tile_manifests(paths: list[str]) -> pl.DataFrame:
    """The tile manifests of many slides as one frame (an empty one for none)."""
    frames = [pl.read_parquet(p) for p in paths]
    return pl.concat(frames) if frames else empty_frame(TILE_SCHEMA)


def training_tiles(
    site: SiteConfig, slides_path: str, tile_paths: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of a bounded sample of normal train tiles, of held-out normal val tiles, and the
    slide id of each train tile (the robust modes hold each slide out in turn)."""
    slides = pl.read_parquet(slides_path)
    uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))
    tiles = read_tile_manifests(tile_paths)
    normal = tiles.join(slides.select("slide_id", "label"), on="slide_id").filter(
        pl.col("label") == "normal"
    )
    train_rows = sample_tiles(normal.filter(pl.col("split") == "train"), site.max_train_tiles, 0)
    val_rows = sample_tiles(
        normal.filter(pl.col("split") == "val"), max(64, site.max_train_tiles // 4), 1
    )
    if train_rows.height == 0:
        raise ValueError(
            f"site {site.name}: no normal training tiles; put normal slides under "
            "training/normal (pathology) or <category>/train/good (industrial)"
        )
    options = site.storage.options()
    train = load_tiles(train_rows, uris, options)
    val = load_tiles(val_rows, uris, options)
    if len(val) == 0:  # no held-out slide: validate on a slice of the training tiles
        val = train[: max(1, len(train) // 10)]
    return train, val, train_rows["slide_id"].to_numpy()


LESION_TILE_FRACTION = 0.5  # a tile is "tumour" for supervised_cnn when half of it is lesion


def _trainable_slides(slides_path: str) -> pl.DataFrame:
    """Slides that may train or validate: readable, and never from the test split."""
    return pl.read_parquet(slides_path).filter(
        (pl.col("status") == "ok") & pl.col("split").is_in(["train", "val"])
    )


def labelled_training_tiles(
    site: SiteConfig, slides_path: str, tile_paths: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(tiles, labels, val tiles, val labels) for tile-supervised families; None without labels.

    Tumour: tiles of annotated tumour training slides with label_fraction >= 0.5. Normal: every
    tile of normal slides and the lesion-free tiles (label_fraction == 0) of annotated tumour
    slides; tiles on a lesion's edge and all tiles of unannotated tumour slides are left out.
    Validation: the held-out normal ("val") slides' tiles plus a fifth of the tumour tiles
    (val slides are all normal, so tumour tiles are held out by tile, not by slide).
    """
    slides = _trainable_slides(slides_path)
    uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))
    tiles = read_tile_manifests(tile_paths).join(
        slides.select("slide_id", "label", "annotation_uri"), on="slide_id"
    )
    annotated = (pl.col("label") == "anomalous") & pl.col("annotation_uri").is_not_null()
    tumour = tiles.filter(
        annotated
        & (pl.col("split") == "train")
        & (pl.col("label_fraction") >= LESION_TILE_FRACTION)
    )
    normal = tiles.filter(
        (pl.col("label") == "normal") | (annotated & (pl.col("label_fraction") == 0))
    )
    normal_train = normal.filter(pl.col("split") == "train")
    if tumour.height == 0 or normal_train.height == 0:
        return None
    limit = site.max_train_tiles
    tumour = sample_tiles(tumour, limit // 2, 2)  # shuffled
    n_val = tumour.height // 5
    val_tumour, train_tumour = tumour.head(n_val), tumour.slice(n_val)
    train_normal = sample_tiles(normal_train, max(1, limit - train_tumour.height), 0)
    val_normal = sample_tiles(normal.filter(pl.col("split") == "val"), max(64, limit // 4), 1)
    if val_normal.height == 0:  # no held-out slide: hold out a tenth of the normal tiles
        n = max(1, train_normal.height // 10)
        val_normal, train_normal = train_normal.head(n), train_normal.slice(n)
    options = site.storage.options()

    def pixels(tumour_rows: pl.DataFrame, normal_rows: pl.DataFrame):
        labels = np.r_[np.ones(tumour_rows.height, bool), np.zeros(normal_rows.height, bool)]
        return load_tiles(pl.concat([tumour_rows, normal_rows]), uris, options), labels

    train, labels = pixels(train_tumour, train_normal)
    val, val_labels = pixels(val_tumour, val_normal)
    return train, labels, val, val_labels


def training_bags(
    site: SiteConfig, slides_path: str, tile_paths: list[str]
) -> tuple[list[np.ndarray], list[bool]] | None:
    """One bag of tiles per train-split slide and its label, for slide-supervised families.

    None unless there are both tumour and normal training slides with tiles. Slide labels only:
    no annotation is needed. Each slide's tiles are capped so all bags together stay near
    `max_train_tiles` (at least 64 per slide), since mil scores every tile each epoch.
    """
    slides = _trainable_slides(slides_path).filter(
        (pl.col("split") == "train") & pl.col("label").is_in(["normal", "anomalous"])
    )
    tiles = read_tile_manifests(tile_paths)
    with_tiles = set(tiles["slide_id"].unique().to_list())
    present = [s for s in slides["slide_id"].to_list() if s in with_tiles]
    tumour = dict(zip(slides["slide_id"], slides["label"] == "anomalous", strict=True))
    if not any(tumour[s] for s in present) or all(tumour[s] for s in present):
        return None
    uris = dict(zip(slides["slide_id"], slides["uri"], strict=True))
    cap = max(64, site.max_train_tiles // len(present))
    options = site.storage.options()
    bags = [
        load_tiles(sample_tiles(tiles.filter(pl.col("slide_id") == s), cap, i), uris, options)
        for i, s in enumerate(present)
    ]
    return bags, [bool(tumour[s]) for s in present]
