"""A tiling run killed with SIGKILL half way resumes without duplicate or missing tiles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyvips
from polars.testing import assert_frame_equal

from vadflow.tasks.site import TilingConfig
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.tiling.grid import tile_slides

ROOT = Path(__file__).resolve().parents[1]
N_SLIDES = 6

# Run in a child process: tile the site one slide at a time, pausing after each slide so the
# parent can kill it part way through (the pause is the test's, not the library's).
CHILD = """
import json, sys, time
from vadflow.tasks.site import TilingConfig
from vadflow.tasks.tiling.grid import tile_slides
rows = json.loads(open(sys.argv[1]).read())
tiling = TilingConfig.model_validate_json(sys.argv[2])
tile_slides(rows, tiling, "pathology", sys.argv[3], sys.argv[4],
            on_result=lambda result: time.sleep(0.3))
"""


def _site(folder: Path) -> list[dict]:
    folder.mkdir(parents=True)
    rows = []
    for i in range(N_SLIDES):
        rng = np.random.default_rng(i)
        array = np.full((2048, 2048, 3), 238, np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 1000, 2)
            h, w = rng.integers(600, 1000, 2)  # >= 150 um: above the 'he' preset's speck size
            array[y : y + h, x : x + w] = (190, 100, 165)
        path = folder / f"slide_{i}.tif"
        pyvips.Image.new_from_array(array).tiffsave(
            str(path), tile=True, pyramid=True, compression="jpeg", xres=4000.0, yres=4000.0
        )
        source = SlideSource(path.stem, str(path), "normal", "normal", "train", None)
        rows.append(register_slide(source, "resume", "pathology"))
    return rows


def _manifest(results) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(r.manifest) for r in results]).sort(
        "slide_id", maintain_order=True
    )


def test_sigkilled_tiling_resumes_to_the_uninterrupted_manifest(tmp_path: Path) -> None:
    rows = _site(tmp_path / "site")
    tiling = TilingConfig(tile_size=32)
    reference = tile_slides(rows, tiling, "pathology", tmp_path / "ref", tmp_path / "ref-masks")

    tiles, masks = tmp_path / "tiles", tmp_path / "masks"
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = dict(os.environ)  # the child imports vadflow as this process does
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "rows.json"), tiling.model_dump_json()]
        + [str(tiles), str(masks)],
        env=env,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while len(list(tiles.glob("*.done.json"))) < 2:  # kill it after two slides are committed
        assert child.poll() is None, "the tiling child exited before it could be killed"
        assert time.monotonic() < deadline, "the tiling child made no progress"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    done_before = {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.done.json")}
    assert 2 <= len(done_before) < N_SLIDES  # killed mid-run

    resumed = tile_slides(rows, tiling, "pathology", tiles, masks)

    assert [r.status for r in resumed] == ["ok"] * N_SLIDES
    assert_frame_equal(_manifest(resumed), _manifest(reference))  # row for row
    assert _manifest(resumed)["tile_id"].is_unique().all()
    for name, mtime in done_before.items():  # slides committed before the kill were kept
        assert (tiles / name).stat().st_mtime_ns == mtime
    assert len(list(tiles.glob("*.parquet"))) == N_SLIDES
