"""The progress library: listeners, counts across threads, and a failing listener."""

from __future__ import annotations

import logging
import threading

import pytest

from vadflow.tasks import progress
from vadflow.tasks.progress import Progress, advance, listening, report


def test_reports_reach_every_listener_until_its_block_ends() -> None:
    first: list[Progress] = []
    second: list[Progress] = []
    with listening(first.append):
        report("tile", 1, 4, "slide_001: 12 tiles")
        with listening(second.append):
            report("tile", 2, 4)
        report("tile", 3, 4)
    report("tile", 4, 4)  # nobody listens any more
    assert first == [
        Progress("tile", 1, 4, "slide_001: 12 tiles"),
        Progress("tile", 2, 4),
        Progress("tile", 3, 4),
    ]
    assert second == [Progress("tile", 2, 4)]


def test_without_a_listener_nothing_is_counted() -> None:
    assert advance("score ae_l2", 3) == 0
    seen: list[Progress] = []
    with listening(seen.append):
        assert advance("score ae_l2", 3) == 1  # the earlier call left no count behind
    assert [p.done for p in seen] == [1]


def test_advance_counts_across_threads_and_restarts_at_the_total() -> None:
    seen: list[Progress] = []
    lock = threading.Lock()

    def listener(event: Progress) -> None:
        with lock:
            seen.append(event)

    per_thread, n_threads = 50, 8
    total = per_thread * n_threads
    start = threading.Barrier(n_threads)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            advance("score ae_l2", total, "a slide")

    with listening(listener):
        workers = [threading.Thread(target=work) for _ in range(n_threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # Each count is handed out once and heard in order: no update lost or overtaken.
        assert [e.done for e in seen] == list(range(1, total + 1))
        assert advance("score ae_l2", total) == 1  # a second map of the same stage
        assert advance("contracts", None) == 1  # no total: counts on
        assert advance("contracts", None) == 2
    with listening(seen.append):
        assert advance("contracts", None) == 1  # the last listener left: counts cleared


def test_a_failing_listener_never_fails_the_stage(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Progress] = []

    def broken(event: Progress) -> None:
        raise RuntimeError("display went away")

    with (
        caplog.at_level(logging.DEBUG, logger=progress.__name__),
        listening(broken),
        listening(seen.append),
    ):
        report("train ae_l2", 1, 8, "loss 0.1")
        assert advance("score ae_l2", 2) == 1
    assert [e.stage for e in seen] == ["train ae_l2", "score ae_l2"]  # the others still hear
    assert "display went away" in caplog.text


# -- what the command line shows (flows/cli/progress.py) -------------------------------------


def test_stage_lines_without_a_terminal_give_each_stages_latest_figures() -> None:
    from io import StringIO

    from rich.console import Console

    from vadflow.flows.cli.progress import StageBars

    out = StringIO()
    console = Console(file=out, width=200, color_system=None)
    with StageBars(console, "starting the local API", live=False) as bars, listening(bars):
        report("register", 1, 2, "slide_a ok")
        report("register", 2, 2, "none quarantined")
        report("train ae_l2", 1, 3, "loss 0.2000, val 0.3000")
        report("train ae_l2", 3, 3, "val 0.1000")
        advance("score ae_l2", None, "slide_a: 12 tiles")
        advance("score ae_l2", None, "slide_b: 9 tiles")
    lines = [line.split("  (")[0].split() for line in out.getvalue().splitlines()]
    assert lines[1][:3] == ["✓", "prefect", "ready"]  # after N s: when the first stage reported
    assert lines[:1] + lines[2:] == [
        ["prefect", "starting", "the", "local", "API"],
        ["✓", "register", "2/2", "slides", "none", "quarantined"],
        ["✓", "train", "ae_l2", "3/3", "epochs", "val", "0.1000"],
        ["·", "score", "ae_l2", "2", "slides", "slide_b:", "9", "tiles"],
    ]


def test_prefect_log_moves_terminal_lines_to_the_file_and_back(tmp_path) -> None:
    import io

    from prefect.logging.handlers import PrefectConsoleHandler

    from vadflow.flows.cli.progress import PrefectLog

    terminal = io.StringIO()
    console = PrefectConsoleHandler(stream=terminal)
    logger = logging.getLogger("vadflow-test-terminal")
    logger.addHandler(console)
    logger.propagate = False
    try:
        log = PrefectLog(tmp_path / "logs" / "run.log").start()
        logger.warning("during the run")
        first_log = log
        second = PrefectLog(tmp_path / "logs" / "run-2.log").start()  # replaces the first
        logger.warning("during the second run")
        second.restore()
        first_log.restore()  # already restored by the second: nothing happens
        logger.warning("after the run")
    finally:
        logger.removeHandler(console)
    assert "during the run" in (tmp_path / "logs" / "run.log").read_text()
    assert "during the second run" in (tmp_path / "logs" / "run-2.log").read_text()
    assert "during" not in terminal.getvalue() and "after the run" in terminal.getvalue()
    assert logger.handlers == []  # exactly its own handler came back, once
