"""The Parquet manifests every stage reads and writes: conforming a frame to its schema, and
writing it atomically.

The schemas themselves live with the contracts that check them, in ``data_contracts.schemas``
(with the allowed labels, splits and statuses); ``SLIDE_SCHEMA``, ``TILE_SCHEMA`` and
``SCHEMA_VERSION`` are re-exported here for the stages that write manifests.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from vadflow.data_contracts.schemas import (
    LATER_COLUMNS,
    SCHEMA_VERSION,
    SLIDE_SCHEMA,
    TILE_SCHEMA,
)

__all__ = [
    "SCHEMA_VERSION",
    "SLIDE_SCHEMA",
    "TILE_SCHEMA",
    "conform",
    "empty_frame",
    "write_parquet_atomic",
]


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Select and cast to the schema's columns, in order; a missing column is an error, except
    a column added later (`LATER_COLUMNS`), which reads as null."""
    later = [c for c in schema if c not in df.columns and c in LATER_COLUMNS]
    if later:
        df = df.with_columns(pl.lit(None, schema[c]).alias(c) for c in later)
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
