"""One contract check: run a suite on a stage's frames and decide what the run does.

strict: any failure stops the run. quarantine: slides that own every failure are set aside
(``quarantine.set_aside``) and the rest go on. Either way the check's report is written before
anything raises, so a failed night still leaves the reason on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from vadflow.data_contracts import (
    ContractError,
    ContractResult,
    validate_metrics,
    validate_slide_manifest,
    validate_slide_scores,
    validate_tile_manifest,
    validate_tile_scores,
)
from vadflow.tasks.validation.quarantine import QuarantinedSlide, set_aside
from vadflow.tasks.validation.report import write_stage_report

log = logging.getLogger(__name__)

Mode = Literal["strict", "quarantine"]
MODES: tuple[Mode, ...] = ("strict", "quarantine")

# suite -> the function that validates it; the first frame is the one quarantine filters.
VALIDATORS: dict[str, Callable[..., ContractResult]] = {
    "slide_manifest": validate_slide_manifest,
    "tile_manifest": validate_tile_manifest,
    "tile_scores": validate_tile_scores,
    "slide_scores": validate_slide_scores,
    "metrics": validate_metrics,
}

STRICT_HINT = (
    "what to do: fix the named inputs and rerun; a damaged tile manifest is re-tiled once its "
    "tiles/<slide_id>.done.json marker is deleted; or set `contracts: quarantine` in the site "
    "file to set failing slides aside and go on"
)


@dataclass(frozen=True)
class StageValidation:
    """One contract check. ``frame`` is the checked frame, minus the quarantined slides in
    quarantine mode; ``error`` is what ``validate_stage`` raises (None when the run goes on)."""

    label: str
    mode: Mode
    result: ContractResult
    frame: pl.DataFrame | None
    quarantined: list[QuarantinedSlide] = field(default_factory=list)
    report: str | None = None  # index.html of the run's report folder
    error: ContractError | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """True when the run may go on (possibly without the quarantined slides)."""
        return self.error is None

    @property
    def quarantined_ids(self) -> list[str]:
        return [q.slide_id for q in self.quarantined]

    @property
    def outcome(self) -> str:
        """passed, FAILED, or how many slides quarantine set aside (as the report shows it)."""
        if self.result.success:
            return "passed"
        if self.error is None:
            return f"quarantined {len(self.quarantined)} slide(s)"
        return "FAILED"


def check_stage(
    name: str,
    *frames: Any,
    mode: Mode = "strict",
    report_dir: str | Path | None = None,
    label: str | None = None,
    **options: Any,
) -> StageValidation:
    """Run contract ``name`` on ``frames`` (see ``VALIDATORS`` for each suite's arguments) and
    decide what the run does; never raises for a broken contract (``validate_stage`` does).

    quarantine mode: when every failing expectation is pinned on slides, those slides are
    dropped from the first frame and returned with their reasons; a failure no slide owns (a
    missing column, a bad metric), or one that would leave no slide at all, is still an error.
    """
    if mode not in MODES:
        raise ValueError(f"contract mode must be one of {MODES}, not {mode!r}")
    if name not in VALIDATORS:
        raise KeyError(f"no contract named {name!r}; known: {', '.join(VALIDATORS)}")
    label = label or name
    result = VALIDATORS[name](*frames, **options)
    frame = frames[0] if frames and isinstance(frames[0], pl.DataFrame) else None
    quarantined: list[QuarantinedSlide] = []
    hint: str | None = None  # None: the run goes on; otherwise why it cannot
    if not result.success and mode == "strict":
        hint = STRICT_HINT
    else:
        frame, quarantined, hint = set_aside(result, frame)
    stage = StageValidation(label, mode, result, frame, quarantined)
    if hint is not None:
        stage = replace(stage, error=ContractError(result, hint=hint))
    if report_dir is not None:
        report = str(write_stage_report(stage, report_dir))
        stage = replace(stage, report=report)
        if hint is not None:
            stage = replace(stage, error=ContractError(result, report=report, hint=hint))
    if hint is None:
        for q in quarantined:
            log.warning("quarantined %s: %s", q.slide_id, q.reason)
    return stage


def validate_stage(
    name: str,
    *frames: Any,
    mode: Mode = "strict",
    report_dir: str | Path | None = None,
    label: str | None = None,
    **options: Any,
) -> StageValidation:
    """``check_stage``, raising ContractError (suite, expectation, count, example rows, report
    path) when the run cannot go on: any failure in strict mode, an unattributable one in
    quarantine mode."""
    stage = check_stage(name, *frames, mode=mode, report_dir=report_dir, label=label, **options)
    if stage.error is not None:
        raise stage.error
    return stage
