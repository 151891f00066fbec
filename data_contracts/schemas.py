"""Schemas of the frames the contracts check: the Parquet manifests and the tile scores.

They live on the contracts' floor because the suites are written against them; the stages that
write manifests (``tasks.manifests``, tiling, registration) import them from here. Manifests
hold coordinates and metadata, never pixels: tiles are read from the slide on demand. Each
manifest carries a `schema_version` column so later readers can refuse or migrate old files.
"""

from __future__ import annotations

import polars as pl

SCHEMA_VERSION = 1

LABELS = ("normal", "anomalous", "unknown")
SPLITS = ("train", "val", "test")
SLIDE_STATUSES = ("ok", "no_tissue", "quarantined")
MPP_SOURCES = ("metadata", "site", "none")

SLIDE_SCHEMA: dict[str, pl.DataType] = {
    "schema_version": pl.Int32,
    "site": pl.String,
    "slide_id": pl.String,  # file stem, unique within a site
    "uri": pl.String,
    "sha256": pl.String,
    "size_bytes": pl.Int64,
    "format": pl.String,  # loader that opened it: tiff, png, jpeg, openslide...
    "levels": pl.Int32,
    "width": pl.Int64,  # level 0
    "height": pl.Int64,
    "mpp": pl.Float64,  # level-0 um/px; null when unknown (industrial images)
    "mpp_source": pl.String,  # one of MPP_SOURCES
    "label": pl.String,  # one of LABELS
    "category": pl.String,  # "tumor", "good", or an industrial defect type
    "split": pl.String,  # one of SPLITS; "val" slides are held-out normals for calibration
    "annotation_uri": pl.String,  # ASAP XML (pathology) or mask PNG (industrial); null if none
    "status": pl.String,  # one of SLIDE_STATUSES
    "reason": pl.String,  # why a slide was quarantined or has no tissue; null when ok
}

TILE_SCHEMA: dict[str, pl.DataType] = {
    "schema_version": pl.Int32,
    "site": pl.String,
    "slide_id": pl.String,
    "tile_id": pl.String,  # "<slide_id>:<x>:<y>"
    "level": pl.Int32,  # pyramid level the pixels are read from
    "x": pl.Int64,  # top-left, level-0 px
    "y": pl.Int64,
    "size": pl.Int32,  # tile edge in px at the working resolution
    "extent": pl.Int64,  # tile edge in level-0 px
    "mpp": pl.Float64,  # working resolution; null for images without MPP
    "tissue_fraction": pl.Float64,
    "label_fraction": pl.Float64,
    "split": pl.String,  # one of SPLITS
}

# The columns of a ``<slide_id>.tiles.parquet`` file that scoring writes and the tile-scores
# contract reads (the file may carry more).
TILE_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "slide_id": pl.String,
    "tile_id": pl.String,
    "score": pl.Float64,
}
