"""Contract rules: one great-expectations expectation and its polars twin, built from one call.

A suite is a list of ``Rule``. Great-expectations decides pass or fail: it is the source of
truth for what is checked. The twin is consulted only for an expectation that failed, to find
the rows that broke it, so a failure can name example rows and the slides that own them (which
is what quarantine needs). Because both halves come from the same arguments they cannot drift;
``tests/test_contracts.py`` also checks that the twin counts what great-expectations counts.

Null semantics follow great-expectations on pandas: a map expectation skips null cells (and a
float NaN is null to pandas), a pair expectation here skips rows where either value is missing,
and a row condition with ``!=`` keeps rows whose column is null (``DataFrame.query`` semantics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import great_expectations.expectations as gxe
import polars as pl
from great_expectations.expectations.row_conditions import Column

# (frame) -> boolean expression, True on rows that break the rule; None when it cannot be
# evaluated on this frame (a column is missing: the column-exists expectation reports that).
Twin = Callable[[pl.DataFrame], pl.Expr | None]


@dataclass(frozen=True)
class Where:
    """A row condition: the rule applies only to rows where ``column op value``
    (``op="not_null"``: where the column has a value; ``value`` is then ignored)."""

    column: str
    op: Literal["==", "!=", "in", "not_null"]
    value: Any = None

    def gx(self) -> Any:
        column = Column(self.column)
        if self.op == "==":
            return column == self.value
        if self.op == "!=":
            return column != self.value
        if self.op == "not_null":
            return column.is_not_null()
        return column.is_in(list(self.value))

    def polars(self) -> pl.Expr:
        column = pl.col(self.column)
        if self.op == "==":
            return (column == self.value).fill_null(False)
        if self.op == "!=":
            return (column != self.value).fill_null(True)
        if self.op == "not_null":
            return column.is_not_null()
        return column.is_in(list(self.value)).fill_null(False)

    def text(self) -> str:
        if self.op == "not_null":
            return f"{self.column} is not null"
        return f"{self.column} {self.op} {self.value!r}"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


@dataclass(frozen=True)
class Rule:
    """One expectation (its class and arguments) and the twin that finds its failing rows."""

    expectation: type[gxe.Expectation]
    kwargs: dict[str, Any]
    twin: Twin | None  # None: a table-level rule, no row is to blame
    columns: tuple[str, ...] = field(default=())  # shown in example rows

    def build(self, index: int) -> gxe.Expectation:
        """The expectation, tagged with its index so results map back to this rule."""
        return self.expectation(**self.kwargs, meta={"vadflow_rule": index})

    def violations(self, frame: pl.DataFrame) -> pl.Expr | None:
        if self.twin is None or any(c not in frame.columns for c in self.columns):
            return None
        return self.twin(frame)


def _present(frame: pl.DataFrame, column: str) -> pl.Expr:
    """Not null to pandas: polars null, and for floats also NaN."""
    expr = pl.col(column).is_not_null()
    if frame.schema[column].is_float():
        expr = expr & ~pl.col(column).is_nan()
    return expr


def _apply(where: Where | None, twin: Twin) -> Twin:
    if where is None:
        return twin

    def conditioned(frame: pl.DataFrame) -> pl.Expr | None:
        broken = twin(frame)
        return None if broken is None else where.polars() & broken

    return conditioned


def _common(
    where: Where | None, description: str | None, columns: Sequence[str]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    kwargs: dict[str, Any] = {}
    if where is not None:
        kwargs["row_condition"] = where.gx()
    if description:
        kwargs["description"] = description
    shown = tuple(dict.fromkeys([*columns, *(where.columns if where else ())]))
    return kwargs, shown


def exists(column: str, description: str = "schema column") -> Rule:
    return Rule(
        gxe.ExpectColumnToExist,
        {"column": column, "description": description},
        None,
    )


def unique(column: str, description: str | None = None) -> Rule:
    kwargs, shown = _common(None, description, [column])
    return Rule(
        gxe.ExpectColumnValuesToBeUnique,
        {"column": column, **kwargs},
        lambda f: _present(f, column) & pl.col(column).is_duplicated(),
        shown,
    )


def compound_unique(columns: Sequence[str], description: str | None = None) -> Rule:
    kwargs, shown = _common(None, description, columns)
    return Rule(
        gxe.ExpectCompoundColumnsToBeUnique,
        {"column_list": list(columns), **kwargs},
        lambda f: (
            pl.struct(list(columns)).is_duplicated()
            & pl.any_horizontal([_present(f, c) for c in columns])
        ),
        shown,
    )


def not_null(column: str, where: Where | None = None, description: str | None = None) -> Rule:
    kwargs, shown = _common(where, description, [column])
    return Rule(
        gxe.ExpectColumnValuesToNotBeNull,
        {"column": column, **kwargs},
        _apply(where, lambda f: ~_present(f, column)),
        shown,
    )


def null(column: str, where: Where | None = None, description: str | None = None) -> Rule:
    kwargs, shown = _common(where, description, [column])
    return Rule(
        gxe.ExpectColumnValuesToBeNull,
        {"column": column, **kwargs},
        _apply(where, lambda f: _present(f, column)),
        shown,
    )


def between(
    column: str,
    lo: float | None,
    hi: float | None,
    *,
    strict_min: bool = False,
    where: Where | None = None,
    description: str | None = None,
) -> Rule:
    """lo <= value <= hi (lo < value with ``strict_min``); None is unbounded."""
    kwargs, shown = _common(where, description, [column])
    if strict_min:
        kwargs["strict_min"] = True

    def twin(frame: pl.DataFrame) -> pl.Expr:
        value = pl.col(column)
        outside = pl.lit(False)
        if lo is not None:
            outside = outside | (value <= lo if strict_min else value < lo)
        if hi is not None:
            outside = outside | (value > hi)
        return _present(frame, column) & outside.fill_null(False)

    return Rule(
        gxe.ExpectColumnValuesToBeBetween,
        {"column": column, "min_value": lo, "max_value": hi, **kwargs},
        _apply(where, twin),
        shown,
    )


def in_set(
    column: str,
    values: Sequence[Any],
    where: Where | None = None,
    description: str | None = None,
) -> Rule:
    kwargs, shown = _common(where, description, [column])
    return Rule(
        gxe.ExpectColumnValuesToBeInSet,
        {"column": column, "value_set": list(values), **kwargs},
        _apply(
            where,
            lambda f: _present(f, column) & ~pl.col(column).is_in(list(values)).fill_null(False),
        ),
        shown,
    )


def finite(column: str, where: Where | None = None, description: str | None = None) -> Rule:
    """No +/-inf. NaN is null to pandas: pair this with ``not_null`` to refuse NaN too."""
    kwargs, shown = _common(where, description, [column])

    def twin(frame: pl.DataFrame) -> pl.Expr:
        if not frame.schema[column].is_float():
            return pl.lit(False)
        return pl.col(column).is_infinite().fill_null(False)

    return Rule(
        gxe.ExpectColumnValuesToNotBeInSet,
        {"column": column, "value_set": [math.inf, -math.inf], **kwargs},
        _apply(where, twin),
        shown,
    )


def at_least(
    column_a: str,
    column_b: str,
    *,
    or_equal: bool = True,
    where: Where | None = None,
    description: str | None = None,
) -> Rule:
    """column_a >= column_b (> without ``or_equal``); rows missing either value are skipped."""
    kwargs, shown = _common(where, description, [column_a, column_b])

    def twin(frame: pl.DataFrame) -> pl.Expr:
        a, b = pl.col(column_a), pl.col(column_b)
        broken = a < b if or_equal else a <= b
        both = _present(frame, column_a) & _present(frame, column_b)
        return both & broken.fill_null(False)

    return Rule(
        gxe.ExpectColumnPairValuesAToBeGreaterThanB,
        {
            "column_A": column_a,
            "column_B": column_b,
            "or_equal": or_equal,
            "ignore_row_if": "either_value_is_missing",
            **kwargs,
        },
        _apply(where, twin),
        shown,
    )


def equal(
    column_a: str, column_b: str, where: Where | None = None, description: str | None = None
) -> Rule:
    """column_a == column_b; rows missing either value are skipped."""
    kwargs, shown = _common(where, description, [column_a, column_b])

    def twin(frame: pl.DataFrame) -> pl.Expr:
        both = _present(frame, column_a) & _present(frame, column_b)
        return both & (pl.col(column_a) != pl.col(column_b)).fill_null(False)

    return Rule(
        gxe.ExpectColumnPairValuesToBeEqual,
        {
            "column_A": column_a,
            "column_B": column_b,
            "ignore_row_if": "either_value_is_missing",
            **kwargs,
        },
        _apply(where, twin),
        shown,
    )


def schema(columns: Sequence[str], description: str = "schema column") -> list[Rule]:
    """One column-exists rule per column."""
    return [exists(c, description) for c in columns]
