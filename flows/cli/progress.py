"""What a person sees while a flow runs: one progress bar per stage, and Prefect's log in a file.

    with flow_output(state.home, verbose=False) as output:
        summary = nightly(...)
    console.print(output.where)          # "Prefect's log: .vadflow/logs/run-....log"

The stages report through `vadflow.tasks.progress`; `StageBars` draws each stage as one line
(registered k/N, tiled k/N, epochs e/E with the loss, scored k/N, evaluated, exported,
tracked): live bars on a terminal, otherwise (a CI log, a pipe, `--verbose`) a printed line
per stage once the next stage reports. `PrefectLog` sends the lines Prefect, MLflow and
great-expectations log to the terminal into `<home>/logs/run-<time>.log` instead, unless
`--verbose` keeps them there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from vadflow.tasks import progress

# The unit each stage counts, by the stage's first word ("score ae_l2" counts slides); the
# others are one step, and their detail says how it went.
UNITS = {
    "register": "slides",
    "tile": "slides",
    "score": "slides",
    "train": "epochs",
    "contracts": "checks",
}


def _count(stage: str, done: int, total: int | None) -> str:
    """`3/8 epochs`, `3 checks` when the total is not known in advance, "" for one-step stages."""
    unit = UNITS.get(stage.split(" ", 1)[0])
    if unit is None:
        return ""
    if total is None:  # a running count
        return f"{done} {unit.removesuffix('s') if done == 1 else unit}"
    return f"{done}/{total} {unit}"


class StageBars:
    """A `vadflow.tasks.progress` listener that shows one line per stage.

    On a terminal, live bars in the order the stages first report. Elsewhere (a CI log, a pipe,
    `--verbose` between log lines), a stage's line is printed once another stage reports after
    it, with its latest figures, and the rest at the end. The first line is Prefect's API
    getting ready (its local API takes ~25 s to start); it is done when a stage first reports.
    """

    def __init__(self, console: Console, api_note: str, *, live: bool) -> None:
        self.console = console
        self.live = live
        self._api_note = api_note
        self._lock = threading.Lock()  # stages report from the threads their tasks run in
        self._rows: dict[str, TaskID] = {}
        self._started: dict[str, float] = {}
        self._unprinted: dict[str, progress.Progress] = {}  # line mode: latest, not yet shown
        self._api_started: float | None = None
        self._bars = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description:<16}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]:>12}"),
            TextColumn("{task.fields[detail]}", style="dim"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not live,
        )

    def __enter__(self) -> StageBars:
        self._bars.start()
        self._api_started = time.monotonic()
        if self.live:
            self._rows["prefect"] = self._bars.add_task(
                "prefect", total=None, count="", detail=self._api_note
            )
        else:
            self.console.print(f"  {'prefect':<16}  {self._api_note}", highlight=False)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        with self._lock:
            self._print_lines(but=None)
            if self.live and exc_type is None:  # stages without a total end with the run
                for row in self._bars.tasks:
                    if row.total is None:
                        self._bars.update(
                            row.id, total=row.completed or 1, completed=row.completed or 1
                        )
        self._bars.stop()

    def __call__(self, event: progress.Progress) -> None:
        with self._lock:
            now = time.monotonic()
            if self._api_started is not None:
                self._api_ready(now - self._api_started)
                self._api_started = None
            self._started.setdefault(event.stage, now)
            if self.live:
                self._draw(event)
            else:
                self._print_lines(but=event.stage)
                self._unprinted[event.stage] = event

    def _api_ready(self, waited: float) -> None:
        detail = f"ready after {waited:.0f} s"
        if self.live:
            self._bars.update(self._rows["prefect"], total=1, completed=1, detail=detail)
        else:
            self.console.print(f"[green]✓[/] {'prefect':<16}  {detail}", highlight=False)

    def _draw(self, event: progress.Progress) -> None:
        fields = {"count": _count(event.stage, event.done, event.total), "detail": event.detail}
        row = self._rows.get(event.stage)
        if row is None:
            self._rows[event.stage] = self._bars.add_task(
                event.stage, total=event.total, completed=event.done, **fields
            )
        else:
            self._bars.update(row, total=event.total, completed=event.done, **fields)

    def _print_lines(self, but: str | None) -> None:
        """Line mode: print every stage with unshown reports except `but` (still reporting)."""
        for stage, event in list(self._unprinted.items()):
            if stage == but:
                continue
            del self._unprinted[stage]
            done = event.total is not None and event.done >= event.total
            # Since the first of the reports this line sums up: a stage that reports again
            # later (the contracts, tracking) gets a new line with its own time.
            seconds = time.monotonic() - self._started.pop(stage)
            parts = [
                f"{'[green]✓[/]' if done else '·'} {stage:<16}",
                _count(stage, event.done, event.total),
                event.detail,
                f"({seconds:.0f} s)",
            ]
            self.console.print("  ".join(p for p in parts if p), highlight=False, soft_wrap=True)


class PrefectLog:
    """Sends what would be logged to the terminal during a run (Prefect's flow and task lines,
    its server notices, MLflow's and great-expectations' messages, Python warnings) to a file.

    Every handler that writes to the terminal is swapped for one file handler (in Prefect's
    format) until `restore`, or until another `PrefectLog` starts (one route at a time). MLflow,
    imported during the run by the stage that needs it, normally puts its own terminal handler
    on its logger; it is asked not to (`MLFLOW_CONFIGURE_LOGGING`), so its lines reach the file.
    """

    active: ClassVar[PrefectLog | None] = None  # the route in force

    def __init__(self, path: Path) -> None:
        self.path = path
        self._swapped: list[tuple[logging.Logger, logging.Handler]] = []
        self._file: logging.FileHandler | None = None
        self._env_set = False
        self._mlflow_level = logging.NOTSET

    def start(self) -> PrefectLog:
        if PrefectLog.active is not None:  # an earlier run's route, kept until exit
            PrefectLog.active.restore()
        PrefectLog.active = self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.FileHandler(self.path, encoding="utf-8")
        for logger, handler in _terminal_handlers():
            if not self._swapped:  # the file reads like the terminal did: Prefect's format
                self._file.setFormatter(handler.formatter or logging.Formatter())
            logger.removeHandler(handler)
            if self._file not in logger.handlers:
                logger.addHandler(self._file)
            self._swapped.append((logger, handler))
        if "MLFLOW_CONFIGURE_LOGGING" not in os.environ:
            os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
            self._env_set = True
        mlflow_logger = logging.getLogger("mlflow")
        self._mlflow_level = mlflow_logger.level
        mlflow_logger.setLevel(logging.INFO)  # its INFO lines, as MLflow itself would log them
        logging.captureWarnings(True)
        return self

    def restore(self) -> None:
        """Put the terminal handlers back and close the file (again: nothing happens)."""
        if PrefectLog.active is self:
            PrefectLog.active = None
        logging.captureWarnings(False)
        logging.getLogger("mlflow").setLevel(self._mlflow_level)
        if self._env_set:
            os.environ.pop("MLFLOW_CONFIGURE_LOGGING", None)
        for logger, handler in reversed(self._swapped):
            if self._file in logger.handlers:
                logger.removeHandler(self._file)
            logger.addHandler(handler)
        self._swapped.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


def _terminal_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """(logger, handler) for every handler that writes to the terminal: Prefect's console
    handlers (whatever stream they were built with), and stream handlers on stdout/stderr."""
    from prefect.logging.handlers import PrefectConsoleHandler

    streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    found = []
    for logger in loggers:
        for handler in logger.handlers:
            terminal = isinstance(handler, PrefectConsoleHandler) or (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and id(getattr(handler, "stream", None)) in streams
            )
            if terminal:
                found.append((logger, handler))
    return found


@dataclass
class FlowOutput:
    """Where a run's Prefect log went (None: the terminal, with `--verbose`)."""

    log_file: Path | None

    @property
    def where(self) -> str:
        return f"Prefect's log: {self.log_file}" if self.log_file else ""


def api_note() -> str:
    """What the first line says while Prefect gets ready."""
    url = os.environ.get("PREFECT_API_URL")
    return f"connecting to {url}" if url else "starting the local API (~25 s the first time)"


@contextmanager
def flow_output(
    home: Path, *, verbose: bool, until_exit: bool = False, console: Console | None = None
) -> Iterator[FlowOutput]:
    """Progress bars on stderr while the block runs a flow, and Prefect's log in
    `<home>/logs/run-<time>.log` (or left on the terminal when `verbose`).

    `until_exit` keeps the log in its file after the block, until the process ends (or the
    next run's log starts): a command line's process, whose local Prefect API says it is
    stopping at exit.
    """
    console = console or Console(stderr=True)
    log = None
    if verbose and PrefectLog.active is not None:  # an earlier run's file: the terminal again
        PrefectLog.active.restore()
    if not verbose:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        log = PrefectLog(Path(home) / "logs" / f"run-{stamp}.log").start()
    output = FlowOutput(log.path if log else None)
    # Live bars only on a terminal, and not between --verbose's log lines.
    bars = StageBars(console, api_note(), live=console.is_terminal and not verbose)
    try:
        with bars, progress.listening(bars):
            yield output
    finally:
        if log is not None and not until_exit:
            log.restore()
