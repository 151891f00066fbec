"""Run the contracts and turn great-expectations results into small typed records.

One ephemeral GX context (in memory, nothing written to disk) is created per process on first
use and reused, because importing GX and creating a context take seconds while a validation
takes a fraction of one. Each suite is compiled once per parameter set (e.g. a score range).
great_expectations itself is imported lazily so that importing this module stays cheap; the
records it returns are in ``data_contracts.results``.

Great-expectations decides pass or fail. For each failed expectation the rule's polars twin
(``data_contracts.rules``) then finds the offending rows: a few become the example rows of the
message, and their ``slide_id`` values say which slides a quarantine would take out.
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import cache
from typing import TYPE_CHECKING, Any

import polars as pl
import polars.selectors as cs

from vadflow.data_contracts.results import ContractResult, ExpectationFailure, plain_values
from vadflow.data_contracts.schemas import (
    SLIDE_SCHEMA,
    TILE_SCHEMA,
    TILE_SCORES_SCHEMA,
    TYPE_ERRORS,
    conform_types,
)

if TYPE_CHECKING:
    import great_expectations as gx

    from vadflow.data_contracts.grid import Grids
    from vadflow.data_contracts.rules import Rule

MAX_EXAMPLES = 5
_LOCK = threading.Lock()  # the shared GX context is not documented as thread-safe

# suite name -> (module, function returning its rules); the function's arguments are the
# suite's parameters, and each parameter set is compiled once.
SUITES: dict[str, tuple[str, str]] = {
    "slide_manifest": ("vadflow.data_contracts.slide_manifest", "slide_manifest_rules"),
    "tile_manifest": ("vadflow.data_contracts.tile_manifest", "tile_manifest_rules"),
    "tile_scores": ("vadflow.data_contracts.tile_scores", "tile_scores_rules"),
    "slide_scores": ("vadflow.data_contracts.slide_scores", "slide_scores_rules"),
    "metrics": ("vadflow.data_contracts.metrics", "metrics_rules"),
}
# Columns that identify a row, shown first in example rows when the frame has them.
ROW_KEYS = ("record", "metric", "slide_id", "tile_id")


@cache
def _datasource() -> Any:
    """The process-wide ephemeral context's pandas data source (created on first use)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _skip_batch_fingerprint()
    return context.data_sources.add_pandas("vadflow")


def _skip_batch_fingerprint() -> None:
    """Stop GX hashing every in-memory batch for its ``pandas_data_fingerprint`` marker.

    GX hashes any pandas batch under HASH_THRESHOLD bytes; on a 1,000,000-row tile manifest
    the hash of its string columns costs a third of the validation, and nothing here reads the
    marker (results are matched to frames by the caller). A missing constant (a GX upgrade)
    just leaves the hashing on.
    """
    from great_expectations.execution_engine import pandas_execution_engine

    if hasattr(pandas_execution_engine, "HASH_THRESHOLD"):
        pandas_execution_engine.HASH_THRESHOLD = 0


@cache
def _batch_definition(name: str) -> Any:
    return _datasource().add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")


def suite_rules(name: str, *params: Any) -> list[Rule]:
    """The rules of suite ``name`` for these parameters (see SUITES)."""
    if name not in SUITES:
        raise KeyError(f"no contract named {name!r}; known: {', '.join(SUITES)}")
    module, function = SUITES[name]
    return getattr(importlib.import_module(module), function)(*params)


@cache
def _compiled(name: str, params: tuple[Any, ...]) -> tuple[gx.ExpectationSuite, tuple[Rule, ...]]:
    import great_expectations as gx

    _datasource()  # a suite needs the active context
    rules = tuple(suite_rules(name, *params))
    suite = gx.ExpectationSuite(name=name)
    for index, rule in enumerate(rules):
        suite.add_expectation(rule.build(index))
    return suite, rules


def expectation_suite(name: str, *params: Any) -> gx.ExpectationSuite:
    """The compiled great-expectations suite (shared: do not modify it)."""
    return _compiled(name, tuple(params))[0]


def _detail(kwargs: dict[str, Any], description: str | None) -> str:
    parts = []
    for key in ("min_value", "max_value", "value_set"):
        if kwargs.get(key) is not None:
            parts.append(f"{key}={kwargs[key]!r}")
    parts += [key for key in ("strict_min", "or_equal") if kwargs.get(key) is True]
    if kwargs.get("row_condition"):
        parts.append(f"where {_condition_text(kwargs['row_condition'])}")
    if description:
        parts.append(description)
    return "; ".join(parts)


def _condition_text(condition: Any) -> str:
    """GX 1.x serialises a row condition as a dict; show it as `column op value`."""
    if isinstance(condition, dict) and "column" in condition:
        column = condition["column"]
        name = column.get("name") if isinstance(column, dict) else column
        if "operator" in condition:
            return f"{name} {condition['operator']} {condition.get('parameter')!r}"
        return f"{name} is {'null' if condition.get('is_null') else 'not null'}"
    return str(condition)


def _column(kwargs: dict[str, Any]) -> str | None:
    if "column" in kwargs:
        return kwargs["column"]
    if "column_A" in kwargs:
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    if "column_list" in kwargs:
        return ", ".join(kwargs["column_list"])
    return None


def _failure(r: Any, rules: tuple[Rule, ...], frame: pl.DataFrame) -> ExpectationFailure:
    config = r.expectation_config
    kwargs = dict(config.kwargs)
    result = r.result or {}
    examples = [plain_values(v) for v in result.get("partial_unexpected_list", [])[:MAX_EXAMPLES]]
    count = int(result.get("unexpected_count") or 0)
    # An expectation that could not run (e.g. its column is missing) has no counts, only errors.
    errors = _exception_messages(r.exception_info)
    if errors and not examples:
        examples = errors[:MAX_EXAMPLES]
    rows: list[dict[str, Any]] = []
    slide_counts: dict[str, int] = {}
    index = (config.meta or {}).get("vadflow_rule")
    broken = rules[int(index)].violations(frame) if index is not None and not errors else None
    if broken is not None:
        bad = frame.filter(broken)
        shown = [c for c in (*ROW_KEYS, *rules[int(index)].columns) if c in frame.columns]
        rows = plain_values(bad.select(list(dict.fromkeys(shown))).head(MAX_EXAMPLES).to_dicts())
        if "slide_id" in frame.columns:
            counts = bad.group_by("slide_id").len().drop_nulls("slide_id")
            slide_counts = dict(zip(counts["slide_id"].cast(pl.String), counts["len"], strict=True))
    return ExpectationFailure(
        expectation=config.type,
        column=_column(kwargs),
        unexpected_count=count,
        examples=examples,
        detail=_detail(kwargs, getattr(config, "description", None)),
        example_rows=rows,
        slide_counts=dict(sorted(slide_counts.items())),
    )


def _exception_messages(info: Any) -> list[str]:
    if not isinstance(info, dict):
        return []
    if info.get("raised_exception"):
        return [str(info.get("exception_message"))]
    return sorted(
        {
            str(v.get("exception_message"))
            for v in info.values()
            if isinstance(v, dict) and v.get("raised_exception")
        }
    )


def type_failures(
    frame: pl.DataFrame, schema: Mapping[str, pl.DataType]
) -> list[ExpectationFailure]:
    """One failure per column that some rows of a conformed frame (`conform_types`) had with
    the wrong type, blaming the slides those rows belong to: no value of it can be trusted."""
    if TYPE_ERRORS not in frame.columns:
        return []
    flagged = frame.filter(pl.col(TYPE_ERRORS).is_not_null())
    found: dict[str, pl.DataFrame] = {}
    for note in flagged[TYPE_ERRORS].unique(maintain_order=True).to_list():
        for entry in note.split("; "):
            column, _, dtype = entry.partition(": ")
            rows = flagged.filter(pl.col(TYPE_ERRORS).str.contains(f"{entry}", literal=True))
            found.setdefault(f"{column}\0{dtype}", rows)
    failures = []
    for key, rows in found.items():
        column, dtype = key.split("\0")
        counts: dict[str, int] = {}
        if "slide_id" in rows.columns:
            ids = rows["slide_id"].drop_nulls().cast(pl.String).value_counts()
            counts = {str(k): int(n) for k, n in ids.iter_rows()}
        failures.append(
            ExpectationFailure(
                expectation="expect_column_values_to_be_of_type",
                column=column,
                unexpected_count=rows.height,
                examples=[],
                detail=f"{dtype} where the schema has {schema[column]}",
                slide_counts=counts,
            )
        )
    return failures


def with_failures(result: ContractResult, first: list[ExpectationFailure]) -> ContractResult:
    """`result` with `first` failures (checked before the suite ran) put ahead of its own."""
    if not first:
        return result
    failures = [*first, *result.failures]
    return replace(
        result,
        success=False,
        evaluated=result.evaluated + len(first),
        failures=failures,
        failing_slides=sorted({s for f in failures for s in f.slide_counts}),
    )


def run_suite(
    name: str, frame: pl.DataFrame, params: tuple[Any, ...] = (), notes: Iterable[str] = ()
) -> ContractResult:
    """Validate an already-built validation frame against suite ``name``."""
    suite, rules = _compiled(name, params)
    # GX vectorises a range check only on int64/float64 columns; an Int32 column (level,
    # size) would be checked value by value in Python.
    # split_blocks: each column stays its own block, so numeric columns are handed over
    # without the copy pandas makes to consolidate them (~140 MB less on 1,000,000 tiles).
    pdf = frame.with_columns(cs.integer().cast(pl.Int64), cs.float().cast(pl.Float64)).to_pandas(
        split_blocks=True
    )
    with _LOCK:
        batch = _batch_definition(name).get_batch(batch_parameters={"dataframe": pdf})
        try:
            out = batch.validate(
                suite,
                result_format={
                    "result_format": "SUMMARY",
                    "partial_unexpected_count": MAX_EXAMPLES,
                },
            )
        finally:
            _forget_batch(batch)
    del pdf
    failed = [r for r in out.results if not r.success]
    # In suite order: column-exists rules come first, and a missing column explains the
    # errors of every expectation on it.
    failed.sort(key=lambda r: (r.expectation_config.meta or {}).get("vadflow_rule", len(rules)))
    failures = [_failure(r, rules, frame) for r in failed]
    return ContractResult(
        suite=name,
        success=bool(out.success),
        evaluated=int(out.statistics["evaluated_expectations"]),
        failures=failures,
        rows=frame.height,
        failing_slides=sorted({s for f in failures for s in f.slide_counts}),
        notes=list(notes),
        gx_result=out,
    )


def _forget_batch(batch: Any) -> None:
    """Drop GX's reference to a validated batch's data.

    The execution engine's batch manager keeps the last batch of each asset (the whole pandas
    frame, ~200 MB for 1,000,000 tiles) until the next validation of that asset replaces it,
    so the next call held two frames at once. Nothing reads the cached batch after `validate`;
    a GX without these attributes (an upgrade) just keeps caching.
    """
    manager = getattr(getattr(batch.data, "execution_engine", None), "batch_manager", None)
    for name in ("_batch_cache", "_batch_data_cache"):
        getattr(manager, name, {}).pop(batch.id, None)


def validate_slide_manifest(slides: pl.DataFrame) -> ContractResult:
    """Validate a slide manifest against the ``slide_manifest`` suite; a column of the wrong
    type is a failure of that column, like any other."""
    typed = conform_types(slides, SLIDE_SCHEMA)
    result = run_suite("slide_manifest", typed.drop(TYPE_ERRORS))
    return with_failures(result, type_failures(typed, SLIDE_SCHEMA))


def validate_tile_manifest(
    tiles: pl.DataFrame, slides: pl.DataFrame, grids: Grids | None = None
) -> ContractResult:
    """Validate a tile manifest against the ``tile_manifest`` suite, using its slide manifest
    for bounds, labels and splits. ``grids`` (one Grid, or slide_id -> Grid) turns on the
    tiling-grid rules; without it they are skipped and the result carries a note."""
    from vadflow.data_contracts.tile_manifest import validation_frame

    typed = conform_types(tiles, TILE_SCHEMA)
    typed_slides = conform_types(slides, SLIDE_SCHEMA).drop(TYPE_ERRORS)  # its own contract's
    frame = validation_frame(typed.drop(TYPE_ERRORS), typed_slides, grids)
    notes = []
    if grids is None:
        notes.append("tiling-grid rules skipped: no grid given (pass grids=)")
    result = run_suite("tile_manifest", frame, (grids is not None,), notes)
    return with_failures(result, type_failures(typed, TILE_SCHEMA))


def validate_tile_scores(
    scores: pl.DataFrame,
    tiles: pl.DataFrame,
    score_range: tuple[float, float] = (0.0, math.inf),
) -> ContractResult:
    """Validate tile scores (slide_id, tile_id, score) against the tile manifest: finite, in
    the detector's ``score_range``, exactly one per manifest tile of every scored slide."""
    from vadflow.data_contracts.tile_scores import validation_frame

    lo, hi = (float(v) for v in score_range)
    if lo > hi:
        raise ValueError(f"score_range {score_range} is empty: give (low, high)")
    typed = conform_types(scores, TILE_SCORES_SCHEMA)
    typed_tiles = conform_types(tiles, TILE_SCHEMA).drop(TYPE_ERRORS)
    frame = validation_frame(typed.drop(TYPE_ERRORS), typed_tiles)
    result = run_suite("tile_scores", frame, (lo, hi))
    return with_failures(result, type_failures(typed, TILE_SCORES_SCHEMA))


def validate_slide_scores(
    slide_scores: pl.DataFrame,
    slides: pl.DataFrame,
    expected_slides: Iterable[str] | None = None,
) -> ContractResult:
    """Validate one row per scored slide (slide_id, tiles, slide_score, heatmap_downsample,
    heatmap_rows, heatmap_cols) against the slide manifest; ``expected_slides`` are the slides
    that were sent to scoring, each of which must have a row."""
    from vadflow.data_contracts.slide_scores import validation_frame

    return run_suite("slide_scores", validation_frame(slide_scores, slides, expected_slides))


def validate_metrics(
    metrics: Mapping[str, float] | pl.DataFrame, record: str = "metrics"
) -> ContractResult:
    """Validate a metrics record (name -> value) or a long frame (record, metric, value)."""
    from vadflow.data_contracts.metrics import validation_frame

    return run_suite("metrics", validation_frame(metrics, record))
