"""Where slides are tiled in parallel: local processes, a Dask cluster, or this process.

A site picks it in its file (`parallel: {backend: process | dask | serial, workers, dask_address}`).
Two ways in, for the two ways of orchestrating it:

- `tile_site(rows, site, ...)`, or `tiling_executor(site)` for the plain function
  `tasks.tiling.grid.tile_slides`: one Prefect task tiles the whole site; the workers run plain
  Python and need no Prefect API, and no pool is started when fewer than two slides need work
  (the usual nightly rerun) or the work is too small to pay for starting one.
- `task_runner_for(site)`: a Prefect task runner (`ProcessPoolTaskRunner`, or prefect-dask's
  `DaskTaskRunner` on a cluster) for a flow that maps one Prefect task per slide.

Worker processes are started with "spawn": libvips and OpenSlide run threads, which do not survive
a fork. Each worker's libvips gets a thread pool no larger than the machine divided by the workers,
so N workers do not fight over the same cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

from vadflow.tasks.site import ParallelConfig, SiteConfig
from vadflow.tasks.tiling.grid import TilingResult, finished_tiling, tile_slides


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parallel(site: SiteConfig | ParallelConfig) -> ParallelConfig:
    return site.parallel if isinstance(site, SiteConfig) else site


def worker_count(site: SiteConfig | ParallelConfig) -> int:
    return _parallel(site).workers or cpu_count()


def init_worker(vips_threads: int) -> None:
    """Run once in each tiling worker process."""
    import pyvips

    pyvips.concurrency_set(max(1, vips_threads))


@contextmanager
def tiling_executor(site: SiteConfig | ParallelConfig) -> Iterator[Executor | None]:
    """An executor for `tile_slides`; None for `serial` (tile in this process)."""
    parallel = _parallel(site)
    workers = worker_count(parallel)
    if parallel.backend == "serial":
        yield None
    elif parallel.backend == "process":
        from multiprocessing import get_context

        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=init_worker,
            initargs=(max(1, cpu_count() // workers),),
        ) as pool:
            yield pool
    else:
        from distributed import Client, LocalCluster

        if parallel.dask_address:
            with Client(parallel.dask_address) as client:
                yield client.get_executor()
        else:
            with (
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster,
                Client(cluster) as client,
            ):
                yield client.get_executor()


def task_runner_for(site: SiteConfig | ParallelConfig):
    """The Prefect task runner for mapping a per-slide tiling task, from the site's settings."""
    parallel = _parallel(site)
    workers = worker_count(parallel)
    if parallel.backend == "dask":
        from prefect_dask import DaskTaskRunner

        if parallel.dask_address:
            return DaskTaskRunner(address=parallel.dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True},
        )
    if parallel.backend == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def tile_site(
    rows: list[dict],
    site: SiteConfig,
    tiles_dir: str | Path,
    masks_dir: str | Path,
    on_result: Callable[[TilingResult], None] | None = None,
) -> list[TilingResult]:
    """Tile a site's usable slides with its parallel settings; finished slides are skipped.

    Workers (processes or a Dask cluster) start only when two or more slides need tiling and they
    add up to `parallel.min_megapixels` (a handful of small slides tiles faster here than a
    spawned worker imports), and never more workers than those slides.
    """
    storage = site.storage.options()
    todo = [
        row
        for row in rows
        if finished_tiling(row, site.tiling, tiles_dir, storage, site.domain, site.qc) is None
    ]
    parallel = site.parallel
    megapixels = sum((row.get("width") or 0) * (row.get("height") or 0) for row in todo) / 1e6
    if len(todo) < 2 or parallel.backend == "serial" or megapixels < parallel.min_megapixels:
        executor = nullcontext(None)
    else:
        workers = min(worker_count(parallel), len(todo))
        executor = tiling_executor(parallel.model_copy(update={"workers": workers}))
    with executor as pool:
        return tile_slides(
            rows,
            site.tiling,
            site.domain,
            tiles_dir,
            masks_dir,
            executor=pool,
            storage=storage,
            on_result=on_result,
            qc=site.qc,
        )
