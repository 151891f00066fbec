"""Run the manifest contracts and turn great-expectations results into small typed records.

One ephemeral GX context (in memory, nothing written to disk) is created per process on first
use and reused, because creating it and importing GX take seconds while a validation takes a
fraction of one. great_expectations itself is imported lazily so that importing this module
(e.g. for ``ContractResult``) stays cheap.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

MAX_EXAMPLES = 5
_LOCK = threading.Lock()  # the shared GX context is not documented as thread-safe


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation: which, on what column, how many rows, a few offending values."""

    expectation: str
    column: str | None
    unexpected_count: int
    examples: list[Any]
    detail: str = ""  # bounds, value set, row condition or description; "" when none


@dataclass(frozen=True)
class ContractResult:
    """Outcome of one suite over one manifest; ``failing_slides`` own the failing rows."""

    suite: str
    success: bool
    evaluated: int
    failures: list[ExpectationFailure]
    rows: int
    failing_slides: list[str] = field(default_factory=list)

    def message(self) -> str:
        """Human-readable summary for logs and exceptions."""
        if self.success:
            return (
                f"contract '{self.suite}' passed: {self.evaluated} expectations on {self.rows} rows"
            )
        lines = [
            f"contract '{self.suite}' failed: {len(self.failures)} of {self.evaluated} "
            f"expectations on {self.rows} rows"
        ]
        for f in self.failures:
            detail = f" [{f.detail}]" if f.detail else ""
            lines.append(
                f"  - {f.expectation} on column '{f.column}'{detail}: "
                f"{f.unexpected_count} unexpected, e.g. {f.examples}"
            )
        if self.failing_slides:
            shown = ", ".join(self.failing_slides[:20])
            more = (
                f" (+{len(self.failing_slides) - 20} more)" if len(self.failing_slides) > 20 else ""
            )
            lines.append(f"  slides with failing rows: {shown}{more}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A Markdown table of the failures, for a Prefect artifact or a report."""
        status = "passed" if self.success else "FAILED"
        head = (
            f"### Contract `{self.suite}`: {status}\n\n"
            f"{self.evaluated} expectations, {self.rows} rows, "
            f"{len(self.failures)} failed.\n"
        )
        if not self.failures:
            return head
        rows = [
            "| expectation | column | unexpected | examples | detail |",
            "| --- | --- | ---: | --- | --- |",
        ]
        for f in self.failures:
            cells = [f.expectation, f.column or "", str(f.unexpected_count), repr(f.examples)]
            cells.append(f.detail)
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        tail = ""
        if self.failing_slides:
            tail = "\n\nSlides with failing rows: " + ", ".join(
                f"`{s}`" for s in self.failing_slides
            )
        return head + "\n" + "\n".join(rows) + tail + "\n"


class ContractError(ValueError):
    """A manifest broke its contract; ``.result`` holds the details."""

    def __init__(self, result: ContractResult) -> None:
        super().__init__(result.message())
        self.result = result


def require(result: ContractResult) -> ContractResult:
    """Pass a successful result through; raise ContractError otherwise."""
    if not result.success:
        raise ContractError(result)
    return result


@cache
def _batch_definitions() -> dict[str, Any]:
    """The process-wide ephemeral context's batch definitions, one per suite."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("vadflow_manifests")
    return {
        name: source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        for name in ("tile_manifest", "slide_manifest")
    }


@cache
def _suite(name: str) -> gx.ExpectationSuite:
    if name == "tile_manifest":
        from data_contracts.tile_manifest import tile_manifest_suite

        return tile_manifest_suite()
    from data_contracts.slide_manifest import slide_manifest_suite

    return slide_manifest_suite()


def _plain(value: Any) -> Any:
    """numpy scalars and tuples of them -> plain Python, NaN -> None, for readable messages."""
    if isinstance(value, tuple | list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


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
    if isinstance(condition, dict) and {"column", "operator"} <= condition.keys():
        column = condition["column"]
        name = column.get("name") if isinstance(column, dict) else column
        return f"{name} {condition['operator']} {condition.get('parameter')!r}"
    return str(condition)


def _failure(r: Any) -> ExpectationFailure:
    config = r.expectation_config
    kwargs = dict(config.kwargs)
    if "column" in kwargs:
        column = kwargs["column"]
    elif "column_A" in kwargs:
        column = f"{kwargs['column_A']}, {kwargs['column_B']}"
    elif "column_list" in kwargs:
        column = ", ".join(kwargs["column_list"])
    else:
        column = None
    result = r.result or {}
    examples = [_plain(v) for v in result.get("partial_unexpected_list", [])[:MAX_EXAMPLES]]
    count = int(result.get("unexpected_count") or 0)
    # An expectation that could not run (e.g. its column is missing) has no counts, only errors.
    errors = _exception_messages(r.exception_info)
    if errors and not examples:
        examples = errors[:MAX_EXAMPLES]
    return ExpectationFailure(
        expectation=config.type,
        column=column,
        unexpected_count=count,
        examples=examples,
        detail=_detail(kwargs, getattr(config, "description", None)),
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


def _validate(
    name: str, frame: pl.DataFrame, failing_slides: Callable[[pl.DataFrame], list[str]]
) -> ContractResult:
    pdf: pd.DataFrame = frame.to_pandas()
    with _LOCK:
        batch = _batch_definitions()[name].get_batch(batch_parameters={"dataframe": pdf})
        out = batch.validate(
            _suite(name),
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES},
        )
    failures = [_failure(r) for r in out.results if not r.success]
    # A missing column explains the errors of every expectation on it: list it first.
    failures.sort(key=lambda f: f.expectation != "expect_column_to_exist")
    return ContractResult(
        suite=name,
        success=bool(out.success),
        evaluated=int(out.statistics["evaluated_expectations"]),
        failures=failures,
        rows=frame.height,
        failing_slides=[] if out.success else failing_slides(frame),
    )


def validate_tile_manifest(tiles: pl.DataFrame, slides: pl.DataFrame) -> ContractResult:
    """Validate a tile manifest against the ``tile_manifest`` suite, using its slide manifest
    for the bounds and normal-slide checks."""
    from data_contracts.tile_manifest import failing_slide_ids, validation_frame

    frame = validation_frame(tiles, slides)
    return _validate("tile_manifest", frame, failing_slide_ids)


def validate_slide_manifest(slides: pl.DataFrame) -> ContractResult:
    """Validate a slide manifest against the ``slide_manifest`` suite."""
    from data_contracts.slide_manifest import failing_slide_ids

    return _validate("slide_manifest", slides, failing_slide_ids)
