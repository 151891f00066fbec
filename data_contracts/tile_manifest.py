"""The tile manifest contract: what every tile row must satisfy before anything reads pixels.

The suite validates the tile manifest *joined* to its slide manifest (``validation_frame``),
because the most damaging error, a tile lying past the slide's edge, is only visible with the
slide's width and height beside the tile. The rules live in small tables used twice: to build
the great-expectations suite, and (in plain polars) to name the slides that own failing rows, so
the two cannot drift apart.
"""

from __future__ import annotations

import great_expectations as gx
import great_expectations.expectations as gxe
import polars as pl
from great_expectations.expectations.row_conditions import Column

from tasks.manifests import SCHEMA_VERSION, SPLITS, TILE_SCHEMA

SUITE_NAME = "tile_manifest"

# Columns taken from the slide manifest, and the ones derived for the bounds check.
SLIDE_COLUMNS = {"width": "width", "height": "height", "label": "slide_label"}
JOIN_KEYS = ("site", "slide_id")

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


def tile_manifest_suite() -> gx.ExpectationSuite:
    """Expectations for ``validation_frame(tiles, slides)``, built in code (no YAML/JSON)."""
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for column in TILE_SCHEMA:
        suite.add_expectation(
            gxe.ExpectColumnToExist(column=column, description="manifest schema column")
        )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeUnique(
            column="tile_id", description="a tile is listed once (resume wrote it twice?)"
        )
    )
    for column in NOT_NULL:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    for column, (lo, hi, strict) in BETWEEN.items():
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=lo, max_value=hi, strict_min=strict
            )
        )
    for column, values in IN_SET.items():
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=column, value_set=values))
    suite.add_expectation(
        gxe.ExpectColumnValuesToNotBeNull(
            column="width", description="the tile's (site, slide_id) is in the slide manifest"
        )
    )
    for bound, end in BOUNDS:
        suite.add_expectation(
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A=bound,
                column_B=end,
                or_equal=True,
                ignore_row_if="either_value_is_missing",
                description=f"tile ends inside the slide ({end} <= {bound})",
            )
        )
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column="label_fraction",
            max_value=0.0,
            row_condition=Column("slide_label") == "normal",
            description="a slide labelled normal has no annotated (label_fraction > 0) tiles",
        )
    )
    return suite


def validation_frame(tiles: pl.DataFrame, slides: pl.DataFrame) -> pl.DataFrame:
    """Tiles left-joined to their slide's width, height and label, plus x_end / y_end.

    Duplicated slides are dropped before the join (the slide contract reports them), so they
    cannot multiply tile rows into false duplicate-tile failures.
    """
    needed = [*JOIN_KEYS, *SLIDE_COLUMNS]
    missing = [c for c in needed if c not in slides.columns]
    if missing:
        raise ValueError(
            f"slide manifest lacks columns {missing} needed to validate tiles; "
            "validate the slide manifest first"
        )
    right = slides.select(
        *[pl.col(k).cast(pl.String) for k in JOIN_KEYS],
        pl.col("width").cast(pl.Int64),
        pl.col("height").cast(pl.Int64),
        pl.col("label").cast(pl.String).alias("slide_label"),
    ).unique(subset=list(JOIN_KEYS), keep="first", maintain_order=True)
    frame = tiles.drop([c for c in SLIDE_COLUMNS.values() if c in tiles.columns])
    if all(k in frame.columns for k in JOIN_KEYS):
        frame = frame.with_columns(*[pl.col(k).cast(pl.String) for k in JOIN_KEYS]).join(
            right, on=list(JOIN_KEYS), how="left", maintain_order="left"
        )
    else:  # the suite's column checks report the missing key; keep the bounds columns empty
        frame = frame.with_columns(
            pl.lit(None, pl.Int64).alias("width"),
            pl.lit(None, pl.Int64).alias("height"),
            pl.lit(None, pl.String).alias("slide_label"),
        )
    for axis, end in (("x", "x_end"), ("y", "y_end")):
        if axis in frame.columns and "extent" in frame.columns:
            frame = frame.with_columns((pl.col(axis) + pl.col("extent")).alias(end))
    return frame


def _violations(frame: pl.DataFrame) -> pl.Expr:
    """True for rows breaking any row-level rule above (polars twin of the suite)."""
    cols = set(frame.columns)
    conds: list[pl.Expr] = [pl.lit(False)]
    if "tile_id" in cols:
        conds.append(pl.col("tile_id").is_duplicated())
    conds += [pl.col(c).is_null() for c in NOT_NULL if c in cols]
    for column, (lo, hi, strict) in BETWEEN.items():
        if column not in cols:
            continue
        if lo is not None:
            conds.append(pl.col(column) <= lo if strict else pl.col(column) < lo)
        if hi is not None:
            conds.append(pl.col(column) > hi)
    conds += [~pl.col(c).is_in(list(v)) for c, v in IN_SET.items() if c in cols]
    conds.append(pl.col("width").is_null())
    conds += [pl.col(end) > pl.col(bound) for bound, end in BOUNDS if end in cols]
    if "label_fraction" in cols:
        conds.append((pl.col("slide_label") == "normal") & (pl.col("label_fraction") > 0))
    return pl.any_horizontal([c.fill_null(False) for c in conds])


def failing_slide_ids(frame: pl.DataFrame) -> list[str]:
    """Slide ids owning at least one row that breaks a row-level rule, sorted."""
    if "slide_id" not in frame.columns:
        return []
    bad = frame.filter(_violations(frame)).get_column("slide_id").drop_nulls().unique()
    return sorted(bad.cast(pl.String).to_list())
