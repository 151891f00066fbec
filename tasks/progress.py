"""How far a run has got, for whoever is watching it: a small publish/subscribe.

Stages (the thin tasks of `tasks/pipeline/`) report; a listener (the command line's progress
bars) draws. Stages never know who listens, and with no listener a report costs a lock and a
list copy.

    with listening(show):                          # show(Progress) is called for every report
        report("tile", 3, 10, "slide_003: 412 tiles")
        advance("score ae_l2", 10, "slide_007")    # mapped tasks in threads: a shared count

Listeners are called in the reporting thread (mapped tasks run in threads), so they must be
quick and thread-safe. A listener that raises is dropped from that report and logged at debug
level: progress is never a reason for a run to fail.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One report: `done` of `total` units of `stage` (total None: not known in advance)."""

    stage: str  # e.g. "tile", "train ae_l2", "score ae_l2"
    done: int
    total: int | None
    detail: str = ""  # what just finished, or the latest figures (a loss)


Listener = Callable[[Progress], None]

_lock = threading.Lock()
_listeners: list[Listener] = []
_counts: dict[str, int] = {}  # advance()'s shared counters, by stage
# Held from counting to reporting, so listeners hear a stage's counts in order (1, 2, 3 and
# never 2 before 1); re-entrant, so a listener that reports does not deadlock.
_in_order = threading.RLock()


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every report made until the block ends, from any thread."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
            if not _listeners:  # the next run counts from zero
                _counts.clear()


def report(stage: str, done: int, total: int | None, detail: str = "") -> None:
    """Tell the listeners that `done` of `total` units of `stage` are finished."""
    with _lock:
        listeners = list(_listeners)
    if not listeners:
        return
    event = Progress(stage, done, total, detail)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # a display's bug must not fail the stage that reported
            log.debug("progress listener %r failed on %s", listener, event, exc_info=True)


def advance(stage: str, total: int | None, detail: str = "") -> int:
    """Count one more unit of `stage` done, across threads, and report it; returns the count.

    For work split over tasks that run side by side (one scoring task per slide): each adds
    one. The count starts again at zero once it reaches `total`, and when the last listener
    leaves; with no listener nothing is counted and 0 is returned.
    """
    with _in_order:
        with _lock:
            if not _listeners:
                return 0
            done = _counts.get(stage, 0) + 1
            if total is not None and done >= total:
                _counts.pop(stage, None)
            else:
                _counts[stage] = done
        report(stage, done, total, detail)
    return done
