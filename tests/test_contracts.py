"""Each manifest contract: a passing frame, and failing frames that must name what broke."""

from __future__ import annotations

import os
import time

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import polars as pl
import pytest

from data_contracts import (
    ContractError,
    ContractResult,
    require,
    validate_slide_manifest,
    validate_tile_manifest,
)
from tasks.manifests import SCHEMA_VERSION, SLIDE_SCHEMA, TILE_SCHEMA, conform

SITE = "site-a"


def _slides() -> pl.DataFrame:
    rows = [
        # slide_id, width, height, mpp, mpp_source, label, split, status
        ("normal_001", 4096, 2048, 0.25, "metadata", "normal", "train", "ok"),
        ("tumor_001", 4096, 4096, 0.25, "metadata", "anomalous", "test", "ok"),
        ("broken_001", None, None, None, "none", "unknown", "test", "quarantined"),
    ]
    return conform(
        pl.DataFrame(
            [
                {
                    "schema_version": SCHEMA_VERSION,
                    "site": SITE,
                    "slide_id": sid,
                    "uri": f"data/{SITE}/{sid}.tif",
                    "sha256": f"{i:064x}",
                    "size_bytes": 1000 + i,
                    "format": "tiff",
                    "levels": None if status == "quarantined" else 3,
                    "width": w,
                    "height": h,
                    "mpp": mpp,
                    "mpp_source": src,
                    "label": label,
                    "category": "tumor" if label == "anomalous" else "good",
                    "split": split,
                    "annotation_uri": None,
                    "status": status,
                }
                for i, (sid, w, h, mpp, src, label, split, status) in enumerate(rows)
            ],
            schema=SLIDE_SCHEMA,
        ),
        SLIDE_SCHEMA,
    )


def _tiles() -> pl.DataFrame:
    rows = []
    for sid, height in (("normal_001", 2048), ("tumor_001", 4096)):
        for x in range(0, 4096, 1024):
            for y in range(0, height, 1024):
                label_fraction = 0.5 if sid == "tumor_001" and x == 0 and y == 0 else 0.0
                rows.append(
                    {
                        "schema_version": SCHEMA_VERSION,
                        "site": SITE,
                        "slide_id": sid,
                        "tile_id": f"{sid}:{x}:{y}",
                        "level": 1,
                        "x": x,
                        "y": y,
                        "size": 256,
                        "extent": 1024,
                        "mpp": 1.0,
                        "tissue_fraction": 0.8,
                        "label_fraction": label_fraction,
                        "split": "train" if sid == "normal_001" else "test",
                    }
                )
    return conform(pl.DataFrame(rows, schema=TILE_SCHEMA), TILE_SCHEMA)


def _set(df: pl.DataFrame, tile_id: str, **values: object) -> pl.DataFrame:
    """Overwrite columns of one tile row (keeping dtypes)."""
    hit = pl.col("tile_id") == tile_id
    return df.with_columns(
        [
            pl.when(hit).then(pl.lit(v)).otherwise(pl.col(c)).cast(df.schema[c]).alias(c)
            for c, v in values.items()
        ]
    )


def _failure(result: ContractResult, expectation: str, column: str):
    hits = [f for f in result.failures if f.expectation == expectation and f.column == column]
    assert hits, f"no {expectation} failure on {column}: {result.message()}"
    return hits[0]


def _assert_names(result: ContractResult, expectation: str, column: str, count: int) -> None:
    assert not result.success
    failure = _failure(result, expectation, column)
    assert failure.unexpected_count == count
    message = result.message()
    assert result.suite in message
    assert expectation in message
    assert column in message
    assert f"{count} unexpected" in message
    with pytest.raises(ContractError) as err:
        require(result)
    assert err.value.result is result
    assert str(err.value) == message


def test_passing_manifests_pass_quickly() -> None:
    slides, tiles = _slides(), _tiles()
    validate_tile_manifest(tiles, slides)  # warm-up: GX import and context creation
    start = time.perf_counter()
    result = validate_tile_manifest(tiles, slides)
    elapsed = time.perf_counter() - start
    assert result.success, result.message()
    assert result.rows == tiles.height
    assert result.evaluated > 20
    assert result.failures == [] and result.failing_slides == []
    assert "passed" in result.message()
    assert require(result) is result
    assert "passed" in result.to_markdown()
    assert elapsed < 2.0, f"one tile validation took {elapsed:.2f}s"

    slide_result = validate_slide_manifest(slides)
    assert slide_result.success, slide_result.message()
    assert slide_result.rows == 3


def test_duplicate_tile_id() -> None:
    tiles = _tiles()
    tiles = pl.concat([tiles, tiles.filter(pl.col("tile_id") == "tumor_001:1024:0")])
    result = validate_tile_manifest(tiles, _slides())
    _assert_names(result, "expect_column_values_to_be_unique", "tile_id", 2)
    assert _failure(result, "expect_column_values_to_be_unique", "tile_id").examples[0] == (
        "tumor_001:1024:0"
    )
    assert result.failing_slides == ["tumor_001"]


def test_tile_past_slide_width() -> None:
    tiles = _set(_tiles(), "normal_001:3072:0", x=3500)
    result = validate_tile_manifest(tiles, _slides())
    failure = _failure(result, "expect_column_pair_values_a_to_be_greater_than_b", "width, x_end")
    assert failure.unexpected_count == 1
    assert failure.examples == [(4096, 3500 + 1024)]
    assert "x_end" in result.message() and "width" in result.message()
    assert result.failing_slides == ["normal_001"]
    # A tile ending exactly on the edge is fine.
    assert validate_tile_manifest(_set(_tiles(), "normal_001:3072:0", y=1024), _slides()).success


def test_tissue_fraction_above_one() -> None:
    tiles = _set(_tiles(), "tumor_001:0:0", tissue_fraction=1.5)
    result = validate_tile_manifest(tiles, _slides())
    _assert_names(result, "expect_column_values_to_be_between", "tissue_fraction", 1)
    assert _failure(result, "expect_column_values_to_be_between", "tissue_fraction").examples == [
        1.5
    ]
    assert result.failing_slides == ["tumor_001"]
    assert "tissue_fraction" in result.to_markdown()


def test_bad_split() -> None:
    tiles = _set(_tiles(), "normal_001:0:0", split="validation")
    result = validate_tile_manifest(tiles, _slides())
    _assert_names(result, "expect_column_values_to_be_in_set", "split", 1)
    assert result.failing_slides == ["normal_001"]


def test_normal_slide_with_label() -> None:
    tiles = _set(_tiles(), "normal_001:1024:1024", label_fraction=0.25)
    result = validate_tile_manifest(tiles, _slides())
    _assert_names(result, "expect_column_values_to_be_between", "label_fraction", 1)
    assert "normal" in result.message()  # the row condition is shown
    assert result.failing_slides == ["normal_001"]


def test_tile_of_unknown_slide() -> None:
    tiles = _set(_tiles(), "tumor_001:0:0", slide_id="ghost_001")
    result = validate_tile_manifest(tiles, _slides())
    _assert_names(result, "expect_column_values_to_not_be_null", "width", 1)
    assert result.failing_slides == ["ghost_001"]


def test_missing_tile_column_is_reported_not_raised() -> None:
    result = validate_tile_manifest(_tiles().drop("tissue_fraction"), _slides())
    assert not result.success
    exist = _failure(result, "expect_column_to_exist", "tissue_fraction")
    assert exist is not None


def test_slide_mpp_out_of_range() -> None:
    slides = _slides().with_columns(
        pl.when(pl.col("slide_id") == "tumor_001").then(50.0).otherwise(pl.col("mpp")).alias("mpp")
    )
    result = validate_slide_manifest(slides)
    _assert_names(result, "expect_column_values_to_be_between", "mpp", 1)
    assert _failure(result, "expect_column_values_to_be_between", "mpp").examples == [50.0]
    assert result.failing_slides == ["tumor_001"]


@pytest.mark.parametrize(
    ("column", "value", "expectation"),
    [
        ("label", "tumour", "expect_column_values_to_be_in_set"),
        ("status", "lost", "expect_column_values_to_be_in_set"),
        ("mpp_source", "guess", "expect_column_values_to_be_in_set"),
        ("sha256", None, "expect_column_values_to_not_be_null"),
        ("width", 0, "expect_column_values_to_be_between"),
        ("width", None, "expect_column_values_to_not_be_null"),  # readable slide, no geometry
    ],
)
def test_bad_slide_rows(column: str, value: object, expectation: str) -> None:
    slides = _slides()
    slides = slides.with_columns(
        pl.when(pl.col("slide_id") == "normal_001")
        .then(pl.lit(value))
        .otherwise(pl.col(column))
        .cast(slides.schema[column])
        .alias(column)
    )
    result = validate_slide_manifest(slides)
    _assert_names(result, expectation, column, 1)
    assert result.failing_slides == ["normal_001"]


def test_duplicate_slide() -> None:
    slides = _slides()
    result = validate_slide_manifest(pl.concat([slides, slides.head(1)]))
    _assert_names(result, "expect_compound_columns_to_be_unique", "site, slide_id", 2)
    assert result.failing_slides == ["normal_001"]
    # The duplicated slide does not fake duplicate tiles in the tile contract.
    assert validate_tile_manifest(_tiles(), pl.concat([slides, slides.head(1)])).success
