"""Exports and reports per run, published as latest in one atomic step (#24, case 4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vadflow.tasks.exports.latest import KEEP_RUNS, RUNS, publish_latest, run_folder, run_key
from vadflow.tasks.records import SlideScore


def _run(root: Path, name: str, run: str, text: str) -> Path:
    folder = run_folder(root, name, run)
    folder.mkdir(parents=True)
    (folder / "report.html").write_text(text)
    return folder


def test_latest_flips_from_one_whole_run_to_the_next(tmp_path: Path) -> None:
    _run(tmp_path, "ae_l2", "ae_l2-20261206T010000.000-aaaa", "night one")
    link = publish_latest(tmp_path, "ae_l2", "ae_l2-20261206T010000.000-aaaa")
    assert link == tmp_path / "ae_l2" and link.is_symlink()
    assert not os.path.isabs(os.readlink(link))  # relative: the outputs folder can move
    assert (link / "report.html").read_text() == "night one"
    # Night two writes its own folder; until it publishes, readers still see night one whole.
    _run(tmp_path, "ae_l2", "ae_l2-20261207T010000.000-bbbb", "night two, half written")
    assert (link / "report.html").read_text() == "night one"
    publish_latest(tmp_path, "ae_l2", "ae_l2-20261207T010000.000-bbbb")
    assert (link / "report.html").read_text() == "night two, half written"
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUNS, "ae_l2"]  # no staged link left


def test_a_folder_from_before_is_kept_and_categories_nest(tmp_path: Path) -> None:
    old = tmp_path / "ae_l2"
    old.mkdir()
    (old / "test_000.png").write_bytes(b"old")
    _run(tmp_path, "ae_l2", "ae_l2-20261206T010000.000-aaaa", "new")
    publish_latest(tmp_path, "ae_l2", "ae_l2-20261206T010000.000-aaaa")
    (kept,) = [p for p in (tmp_path / RUNS / "ae_l2").iterdir() if p.name.startswith("before-")]
    assert (kept / "test_000.png").read_bytes() == b"old"
    _run(tmp_path, "padim/bottle", "padim-20261206T010000.000-cccc", "bottle")
    link = publish_latest(tmp_path, "padim/bottle", "padim-20261206T010000.000-cccc")
    assert link == tmp_path / "padim" / "bottle" and (link / "report.html").read_text() == "bottle"


def test_old_runs_are_pruned_never_the_published_one(tmp_path: Path) -> None:
    runs = [f"ae_l2-202612{d:02d}T010000.000-aaaa" for d in range(1, KEEP_RUNS + 4)]
    for run in runs:
        _run(tmp_path, "ae_l2", run, run)
    publish_latest(tmp_path, "ae_l2", runs[-1])
    left = sorted(p.name for p in (tmp_path / RUNS / "ae_l2").iterdir())
    assert left == runs[-KEEP_RUNS:]
    with pytest.raises(FileNotFoundError, match="wrote no folder"):
        publish_latest(tmp_path, "ae_l2", "ae_l2-never-written")


def test_run_key_is_the_heatmap_folder_of_the_run() -> None:
    def score(path: str) -> SlideScore:
        return SlideScore("s", 1, 0.5, path, "t.parquet", 16)

    assert run_key("ae_l2", [score("/o/heatmaps/ae_l2-2026X/s.heatmap.tif")]) == "ae_l2-2026X"
    category = [score("/o/heatmaps/ae_l2-2026X/bottle/s.heatmap.tif")]
    assert run_key("ae_l2/bottle", category) == "ae_l2-2026X"
    assert run_key("ae_l2/bottle", []) == "ae_l2-bottle"
