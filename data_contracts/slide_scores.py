"""The slide scores contract: one finite score per scored slide, and a heatmap whose shape
matches the slide: (ceil(height / downsample), ceil(width / downsample)).

The frame is one row per scored slide with the heatmap's shape already read
(``tasks.validation.frames.slide_scores_frame``): the contract itself never opens files.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from vadflow.data_contracts.rules import (
    Rule,
    Where,
    between,
    equal,
    finite,
    in_set,
    not_null,
    schema,
    unique,
)

SUITE_NAME = "slide_scores"
COLUMNS = ("slide_id", "tiles", "slide_score", "heatmap_downsample", "heatmap_rows", "heatmap_cols")
SCORED = Where("scored", "==", True)


def slide_scores_rules() -> list[Rule]:
    """Rules for ``validation_frame(slide_scores, slides, expected_slides)``."""
    rules = schema(COLUMNS, "slide scores column")
    rules.append(unique("slide_id", "one score per scored slide"))
    rules.append(not_null("slide_id"))
    rules.append(in_set("scored", [True], description="every slide sent to scoring has a score"))
    rules.append(not_null("width", description="the scored slide is in the slide manifest"))
    rules.append(
        not_null("slide_score", SCORED, "a slide score is a number (NaN: no tile was scored)")
    )
    rules.append(finite("slide_score", description="slide scores are finite"))
    rules.append(
        between("tiles", 0, None, strict_min=True, where=SCORED, description="tiles were scored")
    )
    rules.append(between("heatmap_downsample", 1, None))
    rules.append(not_null("heatmap_rows", SCORED, "the heatmap file is readable"))
    rules += [
        equal(
            f"heatmap_{axis}",
            f"expected_{axis}",
            description=f"heatmap {axis} = ceil({side} / heatmap_downsample)",
        )
        for axis, side in (("rows", "height"), ("cols", "width"))
    ]
    return rules


def validation_frame(
    slide_scores: pl.DataFrame,
    slides: pl.DataFrame,
    expected_slides: Iterable[str] | None = None,
) -> pl.DataFrame:
    """Slide scores joined to their slide's width and height, with the expected heatmap shape;
    slides in ``expected_slides`` without a score get a row with ``scored = False``."""
    frame = slide_scores.with_columns(scored=pl.lit(True))
    if "slide_id" not in frame.columns:
        return frame.with_columns(
            *[pl.lit(None, pl.Int64).alias(c) for c in ("width", "height")],
            *[pl.lit(None, pl.Int64).alias(f"expected_{a}") for a in ("rows", "cols")],
        )
    frame = frame.with_columns(pl.col("slide_id").cast(pl.String))
    if expected_slides is not None:
        have = set(frame.get_column("slide_id").drop_nulls().to_list())
        missing = sorted(set(expected_slides) - have)
        frame = pl.concat(
            [frame, pl.DataFrame({"slide_id": missing, "scored": [False] * len(missing)})],
            how="diagonal_relaxed",
        )
    sizes = slides.select(
        pl.col("slide_id").cast(pl.String),
        pl.col("width").cast(pl.Int64),
        pl.col("height").cast(pl.Int64),
    ).unique(subset="slide_id", keep="first", maintain_order=True)
    frame = frame.drop([c for c in ("width", "height") if c in frame.columns]).join(
        sizes, on="slide_id", how="left", maintain_order="left"
    )
    if "heatmap_downsample" in frame.columns:
        ds = pl.col("heatmap_downsample").cast(pl.Int64)
        ds = pl.when(ds > 0).then(ds)  # a bad downsample has its own rule; no division by it
        frame = frame.with_columns(
            ((pl.col("height") + ds - 1) // ds).alias("expected_rows"),
            ((pl.col("width") + ds - 1) // ds).alias("expected_cols"),
        )
    return frame
