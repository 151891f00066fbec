"""The tile scores contract: one finite score, in the detector's range, for every tile of a
scored slide and for nothing else.

``validation_frame`` lines the scores up with the tile manifest of the slides that were scored:
scored rows carry ``in_manifest`` (is this tile in its slide's manifest?), and one extra row per
manifest tile left without a score carries ``scored = False``. So "the scored set equals the
manifest's set" becomes two row-level rules that name the offending tiles.
"""

from __future__ import annotations

import math

import polars as pl

from vadflow.data_contracts.rules import (
    Rule,
    Where,
    between,
    finite,
    in_set,
    not_null,
    schema,
    unique,
)
from vadflow.data_contracts.schemas import TILE_SCORES_SCHEMA

SUITE_NAME = "tile_scores"
COLUMNS = tuple(TILE_SCORES_SCHEMA)  # <slide>.tiles.parquet, written by scoring
KEYS = ("slide_id", "tile_id")
DEFAULT_RANGE = (0.0, math.inf)


def tile_scores_rules(lo: float = 0.0, hi: float = math.inf) -> list[Rule]:
    """Rules for ``validation_frame(scores, tiles)``; [lo, hi] is the detector's score range."""
    rules = schema(COLUMNS, "tile scores column")
    rules.append(unique("tile_id", "one score per tile"))
    rules += [not_null(c) for c in KEYS]
    rules.append(
        not_null(
            "score",
            Where("scored", "==", True),
            "a scored tile has a number (NaN is not a score)",
        )
    )
    rules.append(finite("score", description="scores are finite"))
    if not (math.isinf(lo) and math.isinf(hi)):  # an unbounded range has nothing to check
        rules.append(
            between(
                "score",
                None if math.isinf(lo) else lo,
                None if math.isinf(hi) else hi,
                description=f"within the detector's declared range [{lo}, {hi}]",
            )
        )
    rules.append(in_set("in_manifest", [True], description="a scored tile is in its slide's tiles"))
    rules.append(in_set("scored", [True], description="every tile of a scored slide has a score"))
    return rules


def validation_frame(scores: pl.DataFrame, tiles: pl.DataFrame) -> pl.DataFrame:
    """Scores with ``in_manifest`` and ``scored``, plus a row per unscored manifest tile of
    every slide that has scores."""
    if any(k not in scores.columns for k in KEYS) or any(k not in tiles.columns for k in KEYS):
        return scores.with_columns(
            pl.lit(None, pl.Boolean).alias("in_manifest"), pl.lit(None, pl.Boolean).alias("scored")
        )
    scores = scores.with_columns(*[pl.col(k).cast(pl.String) for k in KEYS])
    scored_slides = scores.get_column("slide_id").drop_nulls().unique()
    expected = (
        tiles.select(*[pl.col(k).cast(pl.String) for k in KEYS])
        .filter(pl.col("slide_id").is_in(scored_slides.implode()))
        .unique()
        .with_columns(in_manifest=pl.lit(True))
    )
    frame = scores.join(expected, on=list(KEYS), how="left", maintain_order="left").with_columns(
        pl.col("in_manifest").fill_null(False), scored=pl.lit(True)
    )
    unscored = expected.join(scores.select(KEYS), on=list(KEYS), how="anti").with_columns(
        scored=pl.lit(False)
    )
    return pl.concat([frame, unscored], how="diagonal_relaxed")
