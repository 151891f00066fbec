"""The slide manifest contract: one sane row per registered slide.

Quarantined slides may lack geometry (the file could not be opened), so width, height and levels
are required only for slides that are not quarantined; where present they must be positive.
As in ``tile_manifest``, the rules are tables shared by the suite and the polars twin that
names failing slides.
"""

from __future__ import annotations

import great_expectations as gx
import great_expectations.expectations as gxe
import polars as pl
from great_expectations.expectations.row_conditions import Column

from tasks.manifests import (
    LABELS,
    MPP_SOURCES,
    SCHEMA_VERSION,
    SLIDE_SCHEMA,
    SLIDE_STATUSES,
    SPLITS,
)

SUITE_NAME = "slide_manifest"

# slide_id is unique within a site (tasks/manifests.py), so uniqueness is on the pair.
UNIQUE_KEY = ("site", "slide_id")
NOT_NULL = (
    "schema_version",
    "site",
    "slide_id",
    "uri",
    "sha256",
    "mpp_source",
    "label",
    "status",
)
GEOMETRY = ("width", "height", "levels")  # required unless quarantined
MPP_RANGE = (0.05, 20.0)  # um/px: 0.05 is beyond any microscope, 20 is a thumbnail
BETWEEN: dict[str, tuple[float | None, float | None, bool]] = {
    "width": (0, None, True),
    "height": (0, None, True),
    "levels": (0, None, True),
    "size_bytes": (0, None, False),
    "mpp": (*MPP_RANGE, False),
}
IN_SET: dict[str, tuple[object, ...]] = {
    "schema_version": (SCHEMA_VERSION,),
    "mpp_source": MPP_SOURCES,
    "label": LABELS,
    "status": SLIDE_STATUSES,
    "split": SPLITS,  # "val": held-out normal slides for calibration
}


def slide_manifest_suite() -> gx.ExpectationSuite:
    """Expectations for a slide manifest frame (tasks.manifests.SLIDE_SCHEMA), built in code."""
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for column in SLIDE_SCHEMA:
        suite.add_expectation(
            gxe.ExpectColumnToExist(column=column, description="manifest schema column")
        )
    suite.add_expectation(
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=list(UNIQUE_KEY), description="a slide is registered once per site"
        )
    )
    for column in NOT_NULL:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    not_quarantined = Column("status") != "quarantined"
    for column in GEOMETRY:
        suite.add_expectation(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column,
                row_condition=not_quarantined,
                description="readable slides have geometry",
            )
        )
    for column, (lo, hi, strict) in BETWEEN.items():
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=lo, max_value=hi, strict_min=strict
            )
        )
    for column, values in IN_SET.items():
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=column, value_set=values))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeNull(
            column="mpp",
            row_condition=Column("mpp_source") == "none",
            description="mpp_source 'none' means no mpp",
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnValuesToNotBeNull(
            column="mpp",
            row_condition=Column("mpp_source").is_in(["metadata", "site"]),
            description="an mpp_source other than 'none' comes with an mpp",
        )
    )
    return suite


def _violations(frame: pl.DataFrame) -> pl.Expr:
    """True for rows breaking any row-level rule above (polars twin of the suite)."""
    cols = set(frame.columns)
    conds: list[pl.Expr] = [pl.lit(False)]
    if set(UNIQUE_KEY) <= cols:
        conds.append(pl.struct(list(UNIQUE_KEY)).is_duplicated())
    conds += [pl.col(c).is_null() for c in NOT_NULL if c in cols]
    if "status" in cols:
        readable = (pl.col("status") != "quarantined").fill_null(True)
        conds += [readable & pl.col(c).is_null() for c in GEOMETRY if c in cols]
    for column, (lo, hi, strict) in BETWEEN.items():
        if column not in cols:
            continue
        if lo is not None:
            conds.append(pl.col(column) <= lo if strict else pl.col(column) < lo)
        if hi is not None:
            conds.append(pl.col(column) > hi)
    conds += [~pl.col(c).is_in(list(v)) for c, v in IN_SET.items() if c in cols]
    if {"mpp", "mpp_source"} <= cols:
        conds.append((pl.col("mpp_source") == "none") & pl.col("mpp").is_not_null())
        conds.append(pl.col("mpp_source").is_in(["metadata", "site"]) & pl.col("mpp").is_null())
    return pl.any_horizontal([c.fill_null(False) for c in conds])


def failing_slide_ids(frame: pl.DataFrame) -> list[str]:
    """Slide ids of rows that break a row-level rule, sorted."""
    if "slide_id" not in frame.columns:
        return []
    bad = frame.filter(_violations(frame)).get_column("slide_id").drop_nulls().unique()
    return sorted(bad.cast(pl.String).to_list())
