"""The tile manifest contract: what every tile row must satisfy before anything reads pixels.

The suite validates the tile manifest *joined* to its slide manifest (``validation_frame``),
because the most damaging errors, a tile past the slide's edge or a test tile in training, are
only visible with the slide's row beside the tile. The grid check needs the slide's tiling grid
(level-0 step and origin), which the manifest does not record: the caller passes it (see
``tasks.validation.frames.tile_grids``); without it the grid rules are left out and the result
says so.
"""

from __future__ import annotations

import polars as pl

from vadflow.data_contracts.grid import Grid, Grids
from vadflow.data_contracts.rules import (
    Rule,
    Where,
    at_least,
    between,
    equal,
    in_set,
    not_null,
    schema,
    unique,
)
from vadflow.data_contracts.schemas import SCHEMA_VERSION, SPLITS, TILE_SCHEMA

SUITE_NAME = "tile_manifest"
JOIN_KEYS = ("site", "slide_id")
# slide-manifest column -> name in the validation frame
SLIDE_COLUMNS = {
    "width": "width",
    "height": "height",
    "label": "slide_label",
    "split": "slide_split",
}

NOT_NULL = (
    "schema_version",
    "site",
    "slide_id",
    "tile_id",
    "level",
    "x",
    "y",
    "size",
    "extent",
    "tissue_fraction",
    "label_fraction",
    "split",
)
# column -> (min, max, strict_min); None = unbounded.
BETWEEN: dict[str, tuple[float | None, float | None, bool]] = {
    "x": (0, None, False),
    "y": (0, None, False),
    "level": (0, None, False),
    "size": (0, None, True),
    "extent": (0, None, True),
    "tissue_fraction": (0.0, 1.0, False),
    "label_fraction": (0.0, 1.0, False),
}
IN_SET: dict[str, tuple[object, ...]] = {
    "split": SPLITS,
    "schema_version": (SCHEMA_VERSION,),
}
# (slide-manifest bound, tile end): the tile must end on or inside the slide.
BOUNDS = (("width", "x_end"), ("height", "y_end"))
# (coordinate, its offset from the slide's grid, the slide's extent on that axis): the offset must
# be 0, except for the last column or row, which ends flush with the slide's edge.
GRID = (("x", "x_grid_offset", "width"), ("y", "y_grid_offset", "height"))


def tile_manifest_rules(with_grid: bool = True) -> list[Rule]:
    """The rules for ``validation_frame(tiles, slides, grids)``."""
    rules = schema(TILE_SCHEMA, "manifest schema column")
    rules.append(unique("tile_id", "a tile is listed once (resume wrote it twice?)"))
    rules += [not_null(c) for c in NOT_NULL]
    rules += [between(c, lo, hi, strict_min=strict) for c, (lo, hi, strict) in BETWEEN.items()]
    rules += [in_set(c, values) for c, values in IN_SET.items()]
    rules.append(
        not_null("width", description="the tile's (site, slide_id) is in the slide manifest")
    )
    rules += [
        at_least(bound, end, description=f"tile ends inside the slide ({end} <= {bound})")
        for bound, end in BOUNDS
    ]
    rules.append(
        between(
            "label_fraction",
            None,
            0.0,
            where=Where("slide_label", "==", "normal"),
            description="a slide labelled normal has no annotated (label_fraction > 0) tiles",
        )
    )
    rules.append(equal("split", "slide_split", description="a tile's split is its slide's split"))
    if with_grid:
        rules.append(
            not_null(
                "grid_step",
                Where("width", "not_null"),
                description="the tiling grid of every slide in the manifest is known",
            )
        )
        rules += [
            in_set(
                offset,
                [0],
                description=f"tile on its slide's grid: ({axis} - origin) % grid_step == 0, "
                "or flush with the slide's far edge",
            )
            for axis, offset, _ in GRID
        ]
    return rules


def validation_frame(
    tiles: pl.DataFrame, slides: pl.DataFrame, grids: Grids | None = None
) -> pl.DataFrame:
    """Tiles left-joined to their slide's width, height, label and split, plus derived columns:
    x_end / y_end (tile end, level 0) and, given grids, grid_step and x/y_grid_offset.

    Duplicated slides are dropped before the join (the slide contract reports them), so they
    cannot multiply tile rows into false duplicate-tile failures.
    """
    missing = [c for c in (*JOIN_KEYS, *SLIDE_COLUMNS) if c not in slides.columns]
    if missing:
        raise ValueError(
            f"slide manifest lacks columns {missing} needed to validate tiles; "
            "validate the slide manifest first"
        )
    right = slides.select(
        *[pl.col(k).cast(pl.String) for k in JOIN_KEYS],
        pl.col("width").cast(pl.Int64),
        pl.col("height").cast(pl.Int64),
        *[
            pl.col(c).cast(pl.String).alias(name)
            for c, name in SLIDE_COLUMNS.items()
            if c not in ("width", "height")
        ],
    ).unique(subset=list(JOIN_KEYS), keep="first", maintain_order=True)
    frame = tiles.drop([c for c in SLIDE_COLUMNS.values() if c in tiles.columns])
    if all(k in frame.columns for k in JOIN_KEYS):
        frame = frame.with_columns(*[pl.col(k).cast(pl.String) for k in JOIN_KEYS]).join(
            right, on=list(JOIN_KEYS), how="left", maintain_order="left"
        )
    else:  # the suite's column checks report the missing key; keep the slide columns empty
        frame = frame.with_columns(
            pl.lit(None, pl.Int64).alias("width"),
            pl.lit(None, pl.Int64).alias("height"),
            *[pl.lit(None, pl.String).alias(n) for n in ("slide_label", "slide_split")],
        )
    for axis, end in (("x", "x_end"), ("y", "y_end")):
        if axis in frame.columns and "extent" in frame.columns:
            frame = frame.with_columns((pl.col(axis) + pl.col("extent")).alias(end))
    if grids is not None:
        frame = _with_grid(frame, grids)
    return frame


def _with_grid(frame: pl.DataFrame, grids: Grids) -> pl.DataFrame:
    if isinstance(grids, Grid):
        frame = frame.with_columns(
            grid_step=pl.lit(grids.step, pl.Int64),
            grid_origin_x=pl.lit(grids.origin_x, pl.Int64),
            grid_origin_y=pl.lit(grids.origin_y, pl.Int64),
        )
    elif "slide_id" in frame.columns:
        table = pl.DataFrame(
            {
                "slide_id": list(grids),
                "grid_step": [g.step for g in grids.values()],
                "grid_origin_x": [g.origin_x for g in grids.values()],
                "grid_origin_y": [g.origin_y for g in grids.values()],
            },
            schema={
                "slide_id": pl.String,
                "grid_step": pl.Int64,
                "grid_origin_x": pl.Int64,
                "grid_origin_y": pl.Int64,
            },
        )
        frame = frame.join(table, on="slide_id", how="left", maintain_order="left")
    else:
        frame = frame.with_columns(
            *[
                pl.lit(None, pl.Int64).alias(c)
                for c in ("grid_step", "grid_origin_x", "grid_origin_y")
            ]
        )
    for axis, offset, bound in GRID:
        if axis in frame.columns:
            origin = pl.col(f"grid_origin_{axis}")
            on_grid = (pl.col(axis) - origin) % pl.col("grid_step")
            flush = (pl.col(axis) + pl.col("extent")) == pl.col(bound)
            frame = frame.with_columns(
                pl.when(flush).then(pl.lit(0, pl.Int64)).otherwise(on_grid).alias(offset)
            )
        else:
            frame = frame.with_columns(pl.lit(None, pl.Int64).alias(offset))
    return frame
