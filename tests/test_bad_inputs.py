"""Every case of the bad-input corpus through the real nightly flow, in one run.

Each case is either normalised and scored, recorded as having no tissue, or quarantined with a
specific reason file; the rest of the batch completes (see tests/corpus.py for the cases).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vadflow.tasks.records import SlideResult
from vadflow.tasks.scoring.heatmap import load_heatmap
from vadflow.tasks.slides.identity import is_safe_slide_id

pytestmark = [pytest.mark.slow, pytest.mark.flow]
pytest_plugins = ["tests.corpus"]

SYNTHETIC_TEST = 6  # test slides of the synthetic site; its held-out normal is scored too


def _slides(run: dict) -> dict[str, dict]:
    frame = pl.read_parquet(run["outputs"] / "slides.parquet")
    return {row["slide_id"]: row for row in frame.to_dicts()}


def _scored(run: dict) -> dict[str, SlideResult]:
    return {row.slide_id: row for row in run["summary"].families["ae_l2"].table}


def test_every_case_is_handled_as_documented(corpus_run: dict) -> None:
    slides, scored = _slides(corpus_run), _scored(corpus_run)
    quarantine = corpus_run["outputs"] / "quarantine"
    heatmaps = next((corpus_run["outputs"] / "heatmaps").glob("ae_l2-*"))
    handled = []
    for case in corpus_run["cases"]:
        row = slides.get(case.slide_id)
        assert row is not None, f"{case.name}: no row {case.slide_id!r} in the slide manifest"
        if case.expect == "quarantined":
            assert row["status"] == "quarantined", (case.name, row)
            reason = json.loads((quarantine / f"{case.slide_id}.json").read_text())["reason"]
            assert case.reason in reason, (case.name, reason)
            assert case.slide_id not in scored, case.name
        elif case.expect == "scored":
            assert row["status"] == "ok" and row["mpp_source"] == "metadata", (case.name, row)
            assert math.isfinite(scored[case.slide_id].score), case.name
            heat = load_heatmap(heatmaps / f"{case.slide_id}.heatmap.tif")
            assert heat.shape == (-(-row["height"] // 16), -(-row["width"] // 16)), case.name
            assert np.isfinite(heat).any(), case.name
            assert not (quarantine / f"{case.slide_id}.json").exists(), case.name
        else:  # no_tissue
            assert case.slide_id in corpus_run["summary"].no_tissue, case.name
            assert case.slide_id not in scored, case.name
            done = corpus_run["outputs"] / "tiles" / f"{case.slide_id}.done.json"
            assert case.reason in json.loads(done.read_text())["reason"], case.name
        handled.append(case.name)
    assert len(handled) == len(corpus_run["cases"]) >= 16


def test_both_files_sharing_an_id_are_quarantined(corpus_run: dict) -> None:
    slides = _slides(corpus_run)
    dups = {k: v for k, v in slides.items() if k.startswith("dup_case")}
    assert len(dups) == 2 and all(v["status"] == "quarantined" for v in dups.values())
    assert {Path(v["uri"]).parent.name for v in dups.values()} == {"images", "rescan"}
    for slide_id in dups:
        assert (corpus_run["outputs"] / "quarantine" / f"{slide_id}.json").is_file()


def test_a_tumour_without_its_annotation_is_left_out_of_pixel_metrics(corpus_run: dict) -> None:
    summary = corpus_run["summary"]
    assert "no_xml" in summary.gaps.anomalous_without_annotation
    metrics = summary.families["ae_l2"].metrics
    assert metrics["n_ground_truth_missing"] >= 1
    row = _scored(corpus_run)["no_xml"]
    assert row.label == "anomalous"  # it still counts at slide level


def test_copies_and_case_collisions_are_named_in_the_summary(corpus_run: dict) -> None:
    gaps = corpus_run["summary"].gaps
    assert len(gaps.train_test_copies) == 1
    assert gaps.train_test_copies[0].startswith("copy_of_train = normal_")
    assert gaps.renamed_for_case == tuple(
        c.slide_id for c in corpus_run["cases"] if c.slide_id.startswith("case_a--case-")
    )


def test_the_rest_of_the_batch_completes(corpus_run: dict) -> None:
    summary = corpus_run["summary"]
    scored = _scored(corpus_run)
    synthetic = {k for k in scored if k.startswith("test_")}
    assert len(synthetic) == SYNTHETIC_TEST
    expected_scored = {c.slide_id for c in corpus_run["cases"] if c.expect == "scored"}
    assert set(scored) == synthetic | expected_scored
    val = {k for k, v in _slides(corpus_run).items() if v["split"] == "val"}
    assert len(val) == 1
    metrics = summary.families["ae_l2"].metrics
    assert metrics["n_test_slides"] >= 6 and math.isfinite(metrics["slide_auroc"]), metrics
    quarantined = {q.slide_id for q in summary.quarantined}
    assert quarantined == {
        k for k, v in _slides(corpus_run).items() if v["status"] == "quarantined"
    }
    assert summary.families["ae_l2"].mlflow_run_id
    exports = corpus_run["outputs"] / "exports" / "ae_l2"
    overlays = {p.stem for p in exports.glob("*.png") if ".thumbnail" not in p.name}
    assert overlays == set(scored) | val


def test_every_output_name_is_on_the_allow_list_and_under_the_root(corpus_run: dict) -> None:
    root = corpus_run["outputs"].resolve()
    ids = set(_slides(corpus_run))
    assert all(is_safe_slide_id(i) for i in ids), sorted(ids)
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root), path
        assert path.name.isascii() and "\\" not in path.name and ".." not in path.name, path
    tiles = pl.concat(
        [pl.read_parquet(p) for p in sorted((root / "tiles").glob("*.parquet"))], how="vertical"
    )
    assert tiles["tile_id"].is_unique().all()
    assert set(tiles["slide_id"]) <= ids
