"""The slide manifest contract: one sane row per registered slide.

Quarantined slides may lack geometry (the file could not be opened), so width, height and levels
are required only for slides that are not quarantined; where present they must be positive.
"""

from __future__ import annotations

import polars as pl

from vadflow.data_contracts.rules import (
    Rule,
    Where,
    between,
    compound_unique,
    in_set,
    not_null,
    null,
    schema,
)
from vadflow.data_contracts.schemas import (
    LABELS,
    MPP_SOURCES,
    SCHEMA_VERSION,
    SLIDE_SCHEMA,
    SLIDE_STATUSES,
    SPLITS,
)

SUITE_NAME = "slide_manifest"

# slide_id is unique within a site (data_contracts/schemas.py), so uniqueness is on the pair.
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
    "artefact_share": (0.0, 1.0, False),  # null until the slide is tiled
}
IN_SET: dict[str, tuple[object, ...]] = {
    "schema_version": (SCHEMA_VERSION,),
    "mpp_source": MPP_SOURCES,
    "label": LABELS,
    "status": SLIDE_STATUSES,
    "split": SPLITS,  # "val": held-out normal slides for calibration
}


def slide_manifest_rules() -> list[Rule]:
    """The rules for a slide manifest frame (data_contracts.schemas.SLIDE_SCHEMA)."""
    rules = schema(SLIDE_SCHEMA, "manifest schema column")
    rules.append(compound_unique(UNIQUE_KEY, "a slide is registered once per site"))
    rules += [not_null(c) for c in NOT_NULL]
    readable = Where("status", "!=", "quarantined")
    rules += [not_null(c, readable, "readable slides have geometry") for c in GEOMETRY]
    rules += [between(c, lo, hi, strict_min=strict) for c, (lo, hi, strict) in BETWEEN.items()]
    rules += [in_set(c, values) for c, values in IN_SET.items()]
    rules.append(null("mpp", Where("mpp_source", "==", "none"), "mpp_source 'none' means no mpp"))
    rules.append(
        not_null(
            "mpp",
            Where("mpp_source", "in", ("metadata", "site")),
            "an mpp_source other than 'none' comes with an mpp",
        )
    )
    return rules


def validation_frame(slides: pl.DataFrame) -> pl.DataFrame:
    """The slide manifest as it is: every rule is on its own columns."""
    return slides
