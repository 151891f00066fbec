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
        # Each count is handed out once: no update lost to a race.
        assert sorted(e.done for e in seen) == list(range(1, total + 1))
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
