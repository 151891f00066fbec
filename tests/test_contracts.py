"""Each manifest contract: a passing frame, and failing frames that must name what broke."""

from __future__ import annotations

import math
import os
import time

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import polars as pl
import pytest

from vadflow.data_contracts import (
    SUITES,
    ContractError,
    ContractResult,
    Grid,
    expectation_suite,
    require,
    runner,
    suite_rules,
    validate_metrics,
    validate_slide_manifest,
    validate_slide_scores,
    validate_tile_manifest,
    validate_tile_scores,
)
from vadflow.tasks.manifests import SCHEMA_VERSION, SLIDE_SCHEMA, TILE_SCHEMA, conform

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
    # The polars twin finds exactly the rows great-expectations counted, and shows some.
    if "slide_id" in str(failure.example_rows) or failure.slide_counts:
        assert sum(failure.slide_counts.values()) == count, failure
    assert failure.example_rows, failure
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


# --- rules and suites --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_rule_but_column_exists_can_name_its_rows(name: str) -> None:
    rules = suite_rules(name)
    assert rules, name
    for rule in rules:
        is_exists = rule.expectation.__name__ == "ExpectColumnToExist"
        assert (rule.twin is None) == is_exists, rule
    assert len(expectation_suite(name).expectations) == len(rules)


def test_one_gx_context_per_process() -> None:
    validate_tile_manifest(_tiles(), _slides())
    validate_metrics({"n_test_slides": 1, "n_test_anomalous": 0})
    assert runner._datasource.cache_info().currsize == 1
    assert runner._datasource.cache_info().misses == 1


# --- tile manifest: the grid, the slide's split ------------------------------------------


def test_tiles_on_the_grid_pass_and_off_grid_tiles_fail() -> None:
    slides = _slides()
    assert validate_tile_manifest(_tiles(), slides, grids=Grid(1024)).success
    assert validate_tile_manifest(_tiles(), slides, grids=Grid(512)).success  # a finer grid
    per_slide = {"normal_001": Grid(1024), "tumor_001": Grid(256)}
    assert validate_tile_manifest(_tiles(), slides, grids=per_slide).success

    tiles = _set(_tiles(), "tumor_001:1024:0", x=1000)
    result = validate_tile_manifest(tiles, slides, grids=Grid(1024))
    _assert_names(result, "expect_column_values_to_be_in_set", "x_grid_offset", 1)
    assert _failure(result, "expect_column_values_to_be_in_set", "x_grid_offset").examples == [1000]
    assert result.failing_slides == ["tumor_001"]

    shifted = validate_tile_manifest(_tiles(), slides, grids=Grid(1024, origin_y=8))
    # 24 tiles off the shifted grid, less the 8 of the last row: it ends flush with the slide's
    # bottom edge, where the tiler puts the last row so that no strip goes unscored.
    _assert_names(shifted, "expect_column_values_to_be_in_set", "y_grid_offset", 16)


def test_a_slide_without_a_known_grid_fails_and_no_grid_is_a_note() -> None:
    result = validate_tile_manifest(_tiles(), _slides(), grids={"normal_001": Grid(1024)})
    _assert_names(result, "expect_column_values_to_not_be_null", "grid_step", 16)
    assert result.failing_slides == ["tumor_001"]

    plain = validate_tile_manifest(_tiles(), _slides())
    assert plain.success
    assert plain.notes and "grid" in plain.notes[0]
    assert "grid" in plain.message() and "grid" in plain.to_markdown()


def test_grid_step_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Grid(0)


def test_tile_split_differs_from_its_slide() -> None:
    tiles = _set(_tiles(), "tumor_001:0:0", split="train")  # a test slide's tile in training
    result = validate_tile_manifest(tiles, _slides())
    _assert_names(result, "expect_column_pair_values_to_be_equal", "split, slide_split", 1)
    assert result.failing_slides == ["tumor_001"]


# --- tile scores ---------------------------------------------------------------------------


def _scores(slide_id: str = "tumor_001") -> pl.DataFrame:
    return (
        _tiles()
        .filter(pl.col("slide_id") == slide_id)
        .select("slide_id", "tile_id", pl.lit(0.25).alias("score"))
    )


def _score(df: pl.DataFrame, tile_id: str, value: float) -> pl.DataFrame:
    hit = pl.col("tile_id") == tile_id
    return df.with_columns(
        pl.when(hit).then(pl.lit(value)).otherwise(pl.col("score")).alias("score")
    )


def test_tile_scores_pass() -> None:
    result = validate_tile_scores(_scores(), _tiles())
    assert result.success, result.message()
    both = pl.concat([_scores(), _scores("normal_001")])
    assert validate_tile_scores(both, _tiles(), score_range=(0.0, 1.0)).success


@pytest.mark.parametrize(
    ("value", "expectation", "column"),
    [
        (math.nan, "expect_column_values_to_not_be_null", "score"),
        (math.inf, "expect_column_values_to_not_be_in_set", "score"),
        (-0.5, "expect_column_values_to_be_between", "score"),
    ],
)
def test_tile_score_not_finite_or_out_of_range(value: float, expectation: str, column: str) -> None:
    scores = _score(_scores(), "tumor_001:1024:0", value)
    result = validate_tile_scores(scores, _tiles())
    _assert_names(result, expectation, column, 1)
    assert result.failing_slides == ["tumor_001"]
    assert result.failures[0].example_rows[0]["tile_id"] == "tumor_001:1024:0"


def test_tile_score_range_is_a_parameter() -> None:
    scores = _score(_scores(), "tumor_001:0:0", 3.0)
    assert validate_tile_scores(scores, _tiles()).success  # default [0, inf)
    result = validate_tile_scores(scores, _tiles(), score_range=(0.0, 1.0))
    _assert_names(result, "expect_column_values_to_be_between", "score", 1)
    assert "1.0" in _failure(result, "expect_column_values_to_be_between", "score").detail
    with pytest.raises(ValueError, match="empty"):
        validate_tile_scores(scores, _tiles(), score_range=(1.0, 0.0))


def test_each_family_is_held_to_its_declared_score_range() -> None:
    """Classifier logits are negative on normal tiles; a distance never is."""
    from vadflow.tasks.validation import declared_score_range, family_of_run

    logits = _score(_scores(), "tumor_001:0:0", -24.0)
    assert declared_score_range("supervised_cnn") == declared_score_range("mil")
    assert validate_tile_scores(logits, _tiles(), declared_score_range("supervised_cnn")).success
    result = validate_tile_scores(logits, _tiles(), declared_score_range("ae_l2"))
    _assert_names(result, "expect_column_values_to_be_between", "score", 1)
    assert declared_score_range("not-a-family") == (0.0, math.inf)
    assert family_of_run("batch-mil") == "mil" and family_of_run("ae_l2") == "ae_l2"
    # Unbounded still means finite.
    broken = _score(logits, "tumor_001:1024:0", math.inf)
    unbounded = validate_tile_scores(broken, _tiles(), score_range=(-math.inf, math.inf))
    _assert_names(unbounded, "expect_column_values_to_not_be_in_set", "score", 1)


def test_tile_scored_twice() -> None:
    scores = pl.concat([_scores(), _scores().head(1)])
    result = validate_tile_scores(scores, _tiles())
    _assert_names(result, "expect_column_values_to_be_unique", "tile_id", 2)


def test_tile_scores_must_match_the_manifest_set() -> None:
    missing = _scores().filter(pl.col("tile_id") != "tumor_001:0:0")
    result = validate_tile_scores(missing, _tiles())
    _assert_names(result, "expect_column_values_to_be_in_set", "scored", 1)
    assert result.failures[0].example_rows[0]["tile_id"] == "tumor_001:0:0"

    extra = pl.concat(
        [
            _scores(),
            pl.DataFrame({"slide_id": ["tumor_001"], "tile_id": ["tumor_001:5:5"], "score": [0.1]}),
        ]
    )
    result = validate_tile_scores(extra, _tiles())
    _assert_names(result, "expect_column_values_to_be_in_set", "in_manifest", 1)
    assert result.failing_slides == ["tumor_001"]


# --- slide scores --------------------------------------------------------------------------


def _slide_scores() -> pl.DataFrame:
    # normal_001 is 4096 x 2048, tumor_001 4096 x 4096; heatmap downsample 16 -> 256 wide.
    return pl.DataFrame(
        {
            "slide_id": ["normal_001", "tumor_001"],
            "tiles": [8, 16],
            "slide_score": [0.1, 0.9],
            "heatmap_downsample": [16, 16],
            "heatmap_rows": [128, 256],
            "heatmap_cols": [256, 256],
        }
    )


def _slide_set(**values: object) -> pl.DataFrame:
    df = _slide_scores()
    hit = pl.col("slide_id") == "tumor_001"
    return df.with_columns(
        [
            pl.when(hit).then(pl.lit(v)).otherwise(pl.col(c)).cast(df.schema[c]).alias(c)
            for c, v in values.items()
        ]
    )


def test_slide_scores_pass() -> None:
    result = validate_slide_scores(_slide_scores(), _slides(), ["normal_001", "tumor_001"])
    assert result.success, result.message()
    odd = _slide_set(heatmap_downsample=1000, heatmap_rows=5, heatmap_cols=5)  # ceil(4096/1000)
    assert validate_slide_scores(odd, _slides()).success


@pytest.mark.parametrize(
    ("values", "expectation", "column"),
    [
        ({"slide_score": math.nan}, "expect_column_values_to_not_be_null", "slide_score"),
        ({"slide_score": -math.inf}, "expect_column_values_to_not_be_in_set", "slide_score"),
        (
            {"heatmap_rows": 255},
            "expect_column_pair_values_to_be_equal",
            "heatmap_rows, expected_rows",
        ),
        (
            {"heatmap_cols": 512},
            "expect_column_pair_values_to_be_equal",
            "heatmap_cols, expected_cols",
        ),
        ({"heatmap_rows": None}, "expect_column_values_to_not_be_null", "heatmap_rows"),
        ({"tiles": 0}, "expect_column_values_to_be_between", "tiles"),
        ({"heatmap_downsample": 0}, "expect_column_values_to_be_between", "heatmap_downsample"),
        ({"slide_id": "ghost_001"}, "expect_column_values_to_not_be_null", "width"),
    ],
)
def test_bad_slide_score(values: dict, expectation: str, column: str) -> None:
    result = validate_slide_scores(_slide_set(**values), _slides())
    _assert_names(result, expectation, column, 1)
    assert result.failing_slides == [values.get("slide_id", "tumor_001")]


def test_one_score_per_scored_slide() -> None:
    twice = pl.concat([_slide_scores(), _slide_scores().tail(1)])
    _assert_names(
        validate_slide_scores(twice, _slides()), "expect_column_values_to_be_unique", "slide_id", 2
    )
    result = validate_slide_scores(
        _slide_scores().head(1), _slides(), expected_slides=["normal_001", "tumor_001"]
    )
    _assert_names(result, "expect_column_values_to_be_in_set", "scored", 1)
    assert result.failing_slides == ["tumor_001"]


# --- metrics -------------------------------------------------------------------------------

GOOD_METRICS = {
    "n_test_slides": 6.0,
    "n_test_anomalous": 3.0,
    "threshold": 0.37,
    "slide_auroc": 0.9,
    "slide_f1_max": 0.8,
    "slide_sensitivity": 1.0,
    "slide_specificity": math.nan,  # undefined without normal test slides: allowed
    "pixel_auroc": 0.0,
    "froc": 0.5,
    "sens_at_0_25_fp": 0.25,
}


def test_metrics_pass() -> None:
    result = validate_metrics(GOOD_METRICS, record="ae_l2")
    assert result.success, result.message()
    assert result.rows == len(GOOD_METRICS)


@pytest.mark.parametrize(
    ("changes", "expectation", "column"),
    [
        ({"slide_auroc": 1.2}, "expect_column_values_to_be_between", "value"),
        ({"sens_at_0_25_fp": -0.1}, "expect_column_values_to_be_between", "value"),
        (
            {"n_test_slides": -1.0, "n_test_anomalous": -2.0},
            "expect_column_values_to_be_between",
            "value",
        ),
        (
            {"n_test_anomalous": 2.5},
            "expect_column_pair_values_to_be_equal",
            "value, value_rounded",
        ),
        (
            {"n_test_anomalous": 7.0},
            "expect_column_pair_values_a_to_be_greater_than_b",
            "n_test_slides, value",
        ),
        ({"threshold": math.inf}, "expect_column_values_to_not_be_in_set", "value"),
        ({"n_test_slides": None}, "expect_column_values_to_not_be_null", "value"),
    ],
)
def test_bad_metrics(changes: dict, expectation: str, column: str) -> None:
    result = validate_metrics({**GOOD_METRICS, **changes}, record="ae_l2")
    assert not result.success
    failure = _failure(result, expectation, column)
    assert failure.unexpected_count >= 1
    assert failure.example_rows and failure.example_rows[0]["record"] == "ae_l2"
    assert not result.attributable  # no slide to blame: quarantine cannot fix a metric
    assert "metrics" in result.message() and expectation in result.message()


def test_missing_count_and_non_numbers() -> None:
    result = validate_metrics({"slide_auroc": 0.5})
    _failure(result, "expect_column_values_to_not_be_null", "value")
    with pytest.raises(TypeError, match="slide_auroc"):
        validate_metrics({**GOOD_METRICS, "slide_auroc": "high"})


def test_a_column_of_the_wrong_type_is_a_contract_failure_not_a_crash() -> None:
    """`x` written as text: the tile contract names the column and its type, blames the slide,
    and the other rules still run on the values that do convert."""
    slides = _slides()
    tiles = _tiles().with_columns(pl.col("x").cast(pl.String))
    result = validate_tile_manifest(tiles, slides, grids=Grid(1024))
    assert not result.success and result.attributable
    first = result.failures[0]
    assert (first.expectation, first.column) == ("expect_column_values_to_be_of_type", "x")
    assert "String where the schema has Int64" in first.detail
    assert result.failing_slides == ["normal_001", "tumor_001"]
    assert "x" in result.message()
    # Read file by file (as the validate stage does), only the wrongly typed file is blamed.
    from vadflow.data_contracts.schemas import TILE_SCHEMA, conform_types

    by_file = pl.concat(
        [
            conform_types(_tiles().filter(pl.col("slide_id") == "normal_001"), TILE_SCHEMA),
            conform_types(tiles.filter(pl.col("slide_id") == "tumor_001"), TILE_SCHEMA),
        ],
        how="diagonal_relaxed",
    )
    assert validate_tile_manifest(by_file, slides, grids=Grid(1024)).failing_slides == ["tumor_001"]
    # A value that cannot be read as a number at all is null after the cast: still reported.
    garbage = _set(tiles, "tumor_001:1024:0", x="ten")
    assert not validate_tile_manifest(garbage, slides, grids=Grid(1024)).success
    # Right kinds, narrower types (Int32 for Int64) are fine.
    narrow = _tiles().with_columns(pl.col("x").cast(pl.Int32))
    assert validate_tile_manifest(narrow, slides, grids=Grid(1024)).success
    wrong_slides = slides.with_columns(pl.col("width").cast(pl.String))
    manifest = validate_slide_manifest(wrong_slides)
    assert [f.column for f in manifest.failures][:1] == ["width"]
