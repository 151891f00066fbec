"""The score stage's task (`tasks/scoring/run.py`): one slide, one saved model."""

from __future__ import annotations

from typing import Any

from prefect import task

from vadflow.tasks.records import SlideScore
from vadflow.tasks.site import ParallelConfig


@task(name="score")
def score_task(
    model_dir: str,
    slide_row: dict[str, Any],
    tiles_path: str,
    out_dir: str,
    heatmap_downsample: int,
    slides_in_run: int | None = None,
    reuse: bool = False,
) -> SlideScore:
    """Score one slide with a saved model and the stain reference it was trained with.

    The flow maps this task over slides, and the mapped tasks run side by side in threads:
    each waits for a torch slot (at most one per core) and takes its share of the cores.
    A model calibrated on `tail` slide scores (its calibration.json) gives the slide its tail
    score against the model's own normal reference, so its threshold applies.
    `slides_in_run` is how many slides the map scores: the progress total, and how many tasks
    share the cores (None: assume the map has a task for every core).

    With `reuse` (the nightly), a slide this model folder scored before, unchanged since, gets
    its earlier heatmap and tile scores (linked into `out_dir`) and no pixel is decoded; each
    newly scored slide is recorded in the model folder for the next night
    (`tasks/scoring/reuse.py`).
    """
    # Imported here: scoring pulls in torch, which importing a flow should not.
    from vadflow.tasks.scoring.run import score_one

    return score_one(
        model_dir,
        slide_row,
        tiles_path,
        out_dir,
        heatmap_downsample,
        slides_in_run,
        reuse,
        side_by_side=slides_in_run,
    )


@task(name="score-site")
def score_site_task(
    parallel: ParallelConfig,
    model_dir: str,
    slide_rows: list[dict[str, Any]],
    tiles_paths: list[str],
    out_dir: str,
    heatmap_downsample: int,
    reuse: bool = False,
) -> list[SlideScore]:
    """Score many slides with one model on the site's `parallel` engine (a Dask cluster, local
    or at `dask_address`, or local processes): one job per slide, results in the slides'
    order. Used when the site's `parallel.backend` is `dask`; the same outputs as mapping
    `score_task` over the slides."""
    from vadflow.tasks.scoring.run import score_slides
    from vadflow.tasks.tiling.runners import tiling_executor, worker_count

    if not slide_rows:
        return []
    workers = min(worker_count(parallel), len(slide_rows))
    local = parallel.dask_address is None
    with tiling_executor(parallel.model_copy(update={"workers": workers})) as pool:
        return score_slides(
            model_dir,
            slide_rows,
            tiles_paths,
            out_dir,
            heatmap_downsample,
            executor=pool,
            workers=workers if local else None,
            reuse=reuse,
        )
