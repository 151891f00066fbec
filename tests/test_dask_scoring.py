"""Slides scored on a 2-worker Dask cluster give the tile scores and heatmaps of a serial run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import pyvips
from polars.testing import assert_frame_equal

from vadflow.tasks.scoring.heatmap import read_heatmap_tiff
from vadflow.tasks.scoring.run import score_slides
from vadflow.tasks.site import ParallelConfig, TilingConfig
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.slides.tiles import load_tiles
from vadflow.tasks.tiling.grid import tile_slide

TILING = TilingConfig(tile_size=32)


@pytest.fixture(scope="module")
def scored_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict], list[str]]:
    """Three small tiled slides and a PaDiM model fitted on the first one's tiles."""
    from vadflow.tasks.detectors.registry import create_detector

    folder = tmp_path_factory.mktemp("dask-score")
    rows, manifests = [], []
    for i in range(3):
        rng = np.random.default_rng(20 + i)
        array = np.full((1536, 1536, 3), 238, np.uint8)
        y, x = rng.integers(0, 600, 2)
        noise = rng.integers(-25, 25, (800, 800, 3))
        array[y : y + 800, x : x + 800] = np.array([190, 100, 165]) + noise  # stained tissue
        path = folder / f"slide_{i}.tif"
        pyvips.Image.new_from_array(array).tiffsave(
            str(path), tile=True, pyramid=True, compression="jpeg", xres=4000.0, yres=4000.0
        )
        source = SlideSource(path.stem, str(path), "normal", "normal", "test", None)
        row = register_slide(source, "dask", "pathology")
        tiled = tile_slide(row, TILING, "pathology", folder / "tiles", folder / "masks")
        rows.append(row)
        manifests.append(tiled.manifest)
    first = pl.read_parquet(manifests[0])
    assert first.height >= 16
    pixels = load_tiles(first, {rows[0]["slide_id"]: rows[0]["uri"]})
    detector = create_detector("padim", tile_size=32, device="cpu")
    detector.fit(pixels[::2], pixels[1::2])
    model_dir = detector.save(folder / "model")
    return str(model_dir), rows, manifests


def _outputs(scores) -> tuple[pl.DataFrame, list[np.ndarray]]:
    frames = pl.concat([pl.read_parquet(s.tile_scores) for s in scores])
    heatmaps = [read_heatmap_tiff(s.heatmap)[0] for s in scores]
    return frames, heatmaps


def test_two_dask_workers_score_as_a_serial_run(scored_site, tmp_path: Path) -> None:
    from distributed import LocalCluster

    from vadflow.tasks.pipeline import score_site_task

    model_dir, rows, manifests = scored_site
    serial = score_slides(model_dir, rows, manifests, str(tmp_path / "serial"), 16)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        assert len(cluster.workers) == 2
        parallel = ParallelConfig(backend="dask", dask_address=cluster.scheduler_address)
        on_dask = score_site_task.fn(
            parallel, model_dir, rows, manifests, str(tmp_path / "dask"), 16
        )
    assert [s.slide_id for s in on_dask] == [r["slide_id"] for r in rows]
    assert [(s.tiles, s.slide_score) for s in on_dask] == [(s.tiles, s.slide_score) for s in serial]
    serial_frames, serial_maps = _outputs(serial)
    dask_frames, dask_maps = _outputs(on_dask)
    assert_frame_equal(dask_frames, serial_frames)
    for got, expected in zip(dask_maps, serial_maps, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_one_manifest_per_slide(scored_site, tmp_path: Path) -> None:
    model_dir, rows, manifests = scored_site
    with pytest.raises(ValueError, match="3 slides but 2 tile manifests"):
        score_slides(model_dir, rows, manifests[:2], str(tmp_path), 16)
