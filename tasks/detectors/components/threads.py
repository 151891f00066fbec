"""How many CPU threads torch uses in a training or scoring task, and how many such tasks run
at once in one process.

A flow maps its scoring task over slides, and Prefect's default task runner runs every mapped
task at once, each in a thread of the flow's process (`ThreadPoolTaskRunner` has no limit
unless one is set). Each torch would then start a thread per core: on a busy 2-core machine,
scoring with 2 threads per task was 6.5x slower than with 1. So a task asks for a slot
(`torch_slot`): at most one task per usable core holds one, and each holder uses its share of
the cores. Training runs one family at a time and takes every core.

OpenMP keeps the thread count per thread (a new thread starts from the last count set
anywhere), so the count is set in the thread the task runs in, each time a task starts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def threads_per_task(cores: int, concurrent: int) -> int:
    """Torch threads for each of `concurrent` tasks sharing `cores`: an equal share, at least
    one (more tasks than cores still get a thread each; the slots keep that from happening)."""
    return max(1, max(1, cores) // max(1, concurrent))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_torch_threads(concurrent: int = 1) -> int:
    """Give torch, in the calling thread, its share of the cores when `concurrent` torch tasks
    run at once; returns the thread count set. A user's `OMP_NUM_THREADS` caps it."""
    import torch

    threads = threads_per_task(usable_cores(), concurrent)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) > 0:
        threads = min(threads, int(cap))
    torch.set_num_threads(threads)
    return threads


SLOTS = usable_cores()  # torch tasks that may run at once in this process
_SLOTS = threading.BoundedSemaphore(SLOTS)


@contextmanager
def torch_slot(expected: int | None = None) -> Iterator[int]:
    """Hold one of the process's torch slots while a mapped task trains or scores.

    Waits while every usable core has a task; then sets this thread's torch threads to its
    share when `expected` tasks run side by side (None: as many as there are slots, the usual
    map over more slides than cores). Yields the thread count.
    """
    concurrent = SLOTS if expected is None else min(SLOTS, max(1, expected))
    with _SLOTS:
        yield set_torch_threads(concurrent)
