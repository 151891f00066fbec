"""What a contract check says: the typed records a validation turns into (``ContractResult``,
``ExpectationFailure``), their message and Markdown, and the error a broken contract raises.

Kept apart from the great-expectations runner so that reading, writing or reporting a result
(``ContractResult.from_dict`` on a report's JSON) never imports great-expectations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vadflow.data_contracts.rendering import render_template


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation: which, on what column, how many rows, a few offending values,
    a few offending rows, and how many failing rows each slide owns."""

    expectation: str
    column: str | None
    unexpected_count: int
    examples: list[Any]
    detail: str = ""  # bounds, value set, row condition or description; "" when none
    example_rows: list[dict[str, Any]] = field(default_factory=list)
    slide_counts: dict[str, int] = field(default_factory=dict)  # empty: no slide to blame

    @property
    def slides(self) -> list[str]:
        return sorted(self.slide_counts)

    def describe(self) -> str:
        """`expectation on 'column' [detail]`: the failing expectation in one line."""
        detail = f" [{self.detail}]" if self.detail else ""
        return f"{self.expectation} on '{self.column}'{detail}"


@dataclass(frozen=True)
class ContractResult:
    """Outcome of one suite over one frame; ``failing_slides`` own the failing rows."""

    suite: str
    success: bool
    evaluated: int
    failures: list[ExpectationFailure]
    rows: int
    failing_slides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # checks that could not run, and why
    # The great-expectations validation result, for Data Docs; None once serialised.
    gx_result: Any = field(default=None, repr=False, compare=False)

    @property
    def attributable(self) -> bool:
        """True when every failure is pinned on slides: quarantining them would fix it."""
        return not self.success and all(f.slide_counts for f in self.failures)

    def slide_reasons(self) -> dict[str, str]:
        """slide_id -> why it fails this contract (each failing expectation, with its count)."""
        reasons: dict[str, list[str]] = {}
        for f in self.failures:
            for slide, count in f.slide_counts.items():
                rows = "row" if count == 1 else "rows"
                reasons.setdefault(slide, []).append(f"{f.describe()}: {count} {rows}")
        return {s: f"contract '{self.suite}': " + "; ".join(r) for s, r in sorted(reasons.items())}

    def message(self) -> str:
        """Human-readable summary for logs and exceptions."""
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        if self.success:
            return (
                f"contract '{self.suite}' passed: {self.evaluated} expectations on "
                f"{self.rows} rows{notes}"
            )
        lines = [
            f"contract '{self.suite}' failed: {len(self.failures)} of {self.evaluated} "
            f"expectations on {self.rows} rows"
        ]
        for f in self.failures:
            examples = f", e.g. {f.examples}" if f.examples else ""
            lines.append(f"  - {f.describe()}: {f.unexpected_count} unexpected{examples}")
            lines += [f"      row {row}" for row in f.example_rows[:3]]
        if self.failing_slides:
            shown = ", ".join(self.failing_slides[:20])
            more = len(self.failing_slides) - 20
            lines.append(
                f"  slides with failing rows: {shown}{f' (+{more} more)' if more > 0 else ''}"
            )
        return "\n".join(lines) + notes

    def to_markdown(self) -> str:
        """A Markdown table of the failures, for a Prefect artifact or a report."""
        return render_template("vadflow.data_contracts", "result.md.j2", result=self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (without the GX result)."""
        return {
            "suite": self.suite,
            "success": self.success,
            "evaluated": self.evaluated,
            "rows": self.rows,
            "failures": [
                {
                    "expectation": f.expectation,
                    "column": f.column,
                    "unexpected_count": f.unexpected_count,
                    "examples": plain_values(f.examples),
                    "detail": f.detail,
                    "example_rows": plain_values(f.example_rows),
                    "slide_counts": f.slide_counts,
                }
                for f in self.failures
            ],
            "failing_slides": self.failing_slides,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContractResult:
        failures = [
            ExpectationFailure(
                expectation=f["expectation"],
                column=f["column"],
                unexpected_count=f["unexpected_count"],
                examples=list(f["examples"]),
                detail=f.get("detail", ""),
                example_rows=list(f.get("example_rows", [])),
                slide_counts=dict(f.get("slide_counts", {})),
            )
            for f in data["failures"]
        ]
        return cls(
            suite=data["suite"],
            success=data["success"],
            evaluated=data["evaluated"],
            failures=failures,
            rows=data["rows"],
            failing_slides=list(data.get("failing_slides", [])),
            notes=list(data.get("notes", [])),
        )


class ContractError(ValueError):
    """A frame broke its contract; ``.result`` holds the details, ``.report`` the report file."""

    def __init__(self, result: ContractResult, report: str | None = None, hint: str = "") -> None:
        message = result.message()
        if hint:
            message += f"\n  {hint}"
        if report:
            message += f"\n  report: {report}"
        super().__init__(message)
        self.result = result
        self.report = report


def require(result: ContractResult) -> ContractResult:
    """Pass a successful result through; raise ContractError otherwise."""
    if not result.success:
        raise ContractError(result)
    return result


def plain_values(value: Any) -> Any:
    """numpy scalars and tuples of them -> plain Python, NaN -> None, for readable messages."""
    if isinstance(value, tuple | list):
        return type(value)(plain_values(v) for v in value)
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
