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
    "artefact_share": pl.Float64,  # share of tissue under the QC mask; null until tiled
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
    "artefact": pl.Boolean,  # most of the tile's tissue is under the QC mask; null: no QC ran
}

#: Columns added after a schema's first files were written: a frame without one reads it as
#: null (no QC ran), so older manifests and hand-built frames still conform.
LATER_COLUMNS = frozenset({"artefact_share", "artefact"})

# The columns of a ``<slide_id>.tiles.parquet`` file that scoring writes and the tile-scores
# contract reads (the file may carry more).
TILE_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "slide_id": pl.String,
    "tile_id": pl.String,
    "score": pl.Float64,
}


def _kind(dtype: pl.DataType) -> str:
    if dtype.is_integer():
        return "integer"
    if dtype.is_float():
        return "float"
    return "string" if dtype == pl.String else str(dtype)


def _compatible(actual: pl.DataType, expected: pl.DataType) -> bool:
    """Same kind of value (an Int32 for an Int64 is fine; an integer where a float is due too);
    a column of nulls only has no type to be wrong."""
    if actual == pl.Null:
        return True
    found, wanted = _kind(actual), _kind(expected)
    return found == wanted or (found, wanted) == ("integer", "float")


def wrong_types(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """Schema columns of `frame` holding another kind of value: column -> the type found."""
    return {
        column: frame.schema[column]
        for column, expected in schema.items()
        if column in frame.columns and not _compatible(frame.schema[column], expected)
    }


TYPE_ERRORS = "_type_errors"  # per row: "x: String; y: String", the columns read wrongly typed


def conform_types(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """`frame` with each wrongly typed schema column cast to its type (a value that does not
    cast becomes null) and a `TYPE_ERRORS` column naming, on every row, what was wrong, so a
    contract reports a wrong type as a failure of those rows instead of crashing on arithmetic
    over them. Conform each file before concatenating files, so only its rows are blamed."""
    wrong = wrong_types(frame, schema)
    note = "; ".join(f"{column}: {found}" for column, found in wrong.items()) or None
    cast = frame.with_columns(pl.col(c).cast(schema[c], strict=False) for c in wrong)
    if TYPE_ERRORS in frame.columns:  # conformed before: keep what it found
        if note is None:
            return cast
        merged = pl.concat_str(
            [pl.col(TYPE_ERRORS), pl.lit(note)], separator="; ", ignore_nulls=True
        )
        return cast.with_columns(merged.alias(TYPE_ERRORS))
    return cast.with_columns(pl.lit(note, pl.String).alias(TYPE_ERRORS))
