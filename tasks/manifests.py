"""Schemas of the Parquet manifests every stage reads and writes.

Manifests hold coordinates and metadata, never pixels: tiles are read from the slide on demand.
Each schema carries a `schema_version` column so later readers can refuse or migrate old files.
"""

from __future__ import annotations

from pathlib import Path

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


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Select and cast to the schema's columns, in order; a missing column is an error."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}")
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> Path:
    """Write to a temporary name then rename, so a killed run never leaves half a file.

    A write that fails (disk full, a file-size limit, a read-only folder) removes its temporary
    and raises OSError naming the manifest; whatever complete file was there before stays.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(tmp)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError | pl.exceptions.PolarsError):
            raise OSError(
                f"{path}: the manifest could not be written ({exc}); free space in "
                f"{path.parent} or point the output root at a folder with room, then rerun"
            ) from exc
        raise
    return path
