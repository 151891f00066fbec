"""Slides tiled in parallel (local processes, a 2-worker Dask cluster) equal a serial run."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl
import pytest
import pyvips
from polars.testing import assert_frame_equal

from vadflow.tasks.site import ParallelConfig, QcConfig, SiteConfig, TilingConfig
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.tiling.grid import tile_slides
from vadflow.tasks.tiling.runners import task_runner_for, tile_site, tiling_executor

TILING = TilingConfig(tile_size=32)


@pytest.fixture(scope="module")
def site_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("parallel-site")
    rows = []
    for i in range(4):
        rng = np.random.default_rng(10 + i)
        array = np.full((2048, 2048, 3), 238, np.uint8)
        y, x = rng.integers(0, 900, 2)
        array[y : y + 1100, x : x + 1100] = (190, 100, 165)
        path = folder / f"slide_{i}.tif"
        pyvips.Image.new_from_array(array).tiffsave(
            str(path), tile=True, pyramid=True, compression="jpeg", xres=4000.0, yres=4000.0
        )
        source = SlideSource(path.stem, str(path), "normal", "normal", "train", None)
        rows.append(register_slide(source, "par", "pathology"))
    return rows


@pytest.fixture(scope="module")
def serial(site_rows, tmp_path_factory) -> pl.DataFrame:
    out = tmp_path_factory.mktemp("serial")
    # The site default runs artefact QC, as tile_site does below.
    tiled = tile_slides(site_rows, TILING, "pathology", out / "t", out / "m", qc=QcConfig())
    return _manifest(tiled)


def _manifest(results) -> pl.DataFrame:
    assert [r.status for r in results] == ["ok"] * len(results)
    return pl.concat([pl.read_parquet(r.manifest) for r in results])


def test_local_process_pool_equals_serial(site_rows, serial, tmp_path: Path) -> None:
    site = SiteConfig(
        name="par",
        domain="pathology",
        source=str(tmp_path),
        tiling=TILING,
        parallel={"backend": "process", "workers": 2, "min_megapixels": 0},
    )
    results = tile_site(site_rows, site, tmp_path / "t", tmp_path / "m")
    assert_frame_equal(_manifest(results), serial)
    # Nothing left to do: no pool is started, the results come from the done markers.
    with mock.patch("vadflow.tasks.tiling.runners.tiling_executor", side_effect=AssertionError):
        again = tile_site(site_rows, site, tmp_path / "t", tmp_path / "m")
    assert again == results


def test_a_few_small_slides_are_tiled_without_starting_workers(site_rows, serial, tmp_path) -> None:
    """Four 4-megapixel slides: spawning workers (seconds of imports each) would cost more."""
    site = SiteConfig(
        name="par", domain="pathology", source=str(tmp_path), tiling=TILING, parallel={}
    )
    with mock.patch("vadflow.tasks.tiling.runners.tiling_executor", side_effect=AssertionError):
        results = tile_site(site_rows, site, tmp_path / "t", tmp_path / "m")
    assert_frame_equal(_manifest(results), serial)


def test_dask_cluster_of_two_workers_equals_serial(site_rows, serial, tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        assert len(cluster.workers) == 2
        # The site's settings name the scheduler; tiling_executor connects a client to it.
        parallel = ParallelConfig(backend="dask", dask_address=cluster.scheduler_address)
        seen = []
        with tiling_executor(parallel) as executor:
            results = tile_slides(
                site_rows,
                TILING,
                "pathology",
                tmp_path / "t",
                tmp_path / "m",
                executor=executor,
                on_result=seen.append,
                qc=QcConfig(),
            )
    assert sorted(r.slide_id for r in seen) == [r["slide_id"] for r in site_rows]
    assert_frame_equal(_manifest(results), serial)


def test_task_runner_follows_the_site() -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    def site(**parallel) -> SiteConfig:
        return SiteConfig(name="s", domain="pathology", source="/x", parallel=parallel)

    assert isinstance(task_runner_for(site()), ProcessPoolTaskRunner)
    assert isinstance(task_runner_for(site(backend="serial")), ThreadPoolTaskRunner)
    dask = task_runner_for(site(backend="dask", dask_address="tcp://10.0.0.1:8786"))
    assert isinstance(dask, DaskTaskRunner) and dask.address == "tcp://10.0.0.1:8786"
    local = task_runner_for(site(backend="dask", workers=2))
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 2
