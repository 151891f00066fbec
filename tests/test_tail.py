"""Slide calls without labels (`tasks/scoring/tail.py`): tail probabilities, the binomial slide
score, leave-one-slide-out normals, the calibration that carries the reference, and the
evaluation that uses them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from vadflow.tasks.evaluation.calibration import (
    CALIBRATION_FILE,
    Calibration,
    calibrated_slide_score,
    read_calibration,
    write_calibration,
)
from vadflow.tasks.records import SlideScore
from vadflow.tasks.scoring.tail import (
    TailReference,
    TailSettings,
    scored_tiles,
    slide_tail_scores,
    tail_slide_score,
)

GRID = 16  # a slide of 16 x 16 tiles
EXTENT = 128  # level-0 px per tile


def _slide(slide_id: str, scores: np.ndarray, artefact: np.ndarray | None = None) -> pl.DataFrame:
    """A scored slide on a GRID x GRID tile grid, as scoring writes `<slide>.tiles.parquet`."""
    rows, cols = np.divmod(np.arange(scores.size), GRID)
    frame = pl.DataFrame(
        {
            "slide_id": slide_id,
            "tile_id": [
                f"{slide_id}:{c * EXTENT}:{r * EXTENT}" for r, c in zip(rows, cols, strict=True)
            ],
            "score": scores.astype(np.float64),
            "x": cols * EXTENT,
            "y": rows * EXTENT,
            "extent": np.full(scores.size, EXTENT),
        }
    )
    return frame if artefact is None else frame.with_columns(pl.Series("artefact", artefact))


def test_probability_is_strictly_monotone_and_keeps_the_ranking() -> None:
    rng = np.random.default_rng(0)
    reference = TailReference.fit(rng.gamma(2.0, size=5000), max_quantiles=512)
    assert len(reference.knots) <= 512 and reference.n_tiles == 5000
    # Below every normal tile, among them, and far beyond the largest.
    raw = np.sort(np.concatenate([rng.uniform(-50, 100, 4000), [1e3, 1e5, 1e8]]))
    probability = reference.probability(raw)
    assert np.all(np.diff(probability) > 0), "not strictly increasing"
    assert probability.min() >= 0 and probability.max() <= 1
    p_value = reference.p_value(raw)
    assert np.all(np.diff(p_value) < 0) and p_value.min() > 0
    # A share of normal tiles: the normal median sits near 0.5, the 99th percentile near 0.99.
    normal = rng.gamma(2.0, size=20000)
    assert reference.probability(np.median(normal))[0] == pytest.approx(0.5, abs=0.02)
    assert reference.probability(np.quantile(normal, 0.99))[0] == pytest.approx(0.99, abs=0.005)
    labels = rng.random(raw.size) < 0.3
    assert roc_auc_score(labels, probability) == roc_auc_score(labels, raw)


def test_reference_survives_json_and_ties() -> None:
    scores = np.r_[np.zeros(50), np.arange(100.0)]  # 51 zeros: tied knots merge
    reference = TailReference.fit(scores)
    again = TailReference.from_dict(json.loads(json.dumps(reference.to_dict())))
    assert again == reference
    raw = np.linspace(-1, 120, 500)
    assert np.all(np.diff(again.probability(raw)) > 0)
    with pytest.raises(ValueError, match="no finite normal tile scores"):
        TailReference.fit([np.nan])
    with pytest.raises(ValueError, match="strictly increasing"):
        TailReference.from_dict({**reference.to_dict(), "knots": reference.knots[::-1]})


def test_tail_score_ranks_a_lesion_cluster_above_isolated_extremes() -> None:
    """A normal slide with 2 isolated extreme tiles, a tumour slide with a cluster of 30
    moderately high ones: the heatmap maximum ranks them the wrong way, the tail score not."""
    rng = np.random.default_rng(1)
    normal_val = [rng.normal(size=GRID * GRID) for _ in range(3)]
    normal = rng.normal(size=GRID * GRID)
    normal[[17, 200]] = 12.0  # a fold and an edge: far beyond every normal tile
    tumour = rng.normal(size=GRID * GRID)
    block = (np.arange(GRID * GRID) // GRID < 5) & (np.arange(GRID * GRID) % GRID < 6)
    tumour[block] = rng.uniform(1.5, 2.5, int(block.sum()))  # 30 tiles, top few % of normal
    assert block.sum() == 30 and tumour.max() < normal.max()
    tiles = {f"val{i}": _slide(f"val{i}", s) for i, s in enumerate(normal_val)}
    tiles |= {"normal": _slide("normal", normal), "tumour": _slide("tumour", tumour)}
    scores, reference = slide_tail_scores(tiles, ["val0", "val1", "val2"], TailSettings())
    assert reference is not None and reference.n_tiles == 3 * GRID * GRID
    assert scores["tumour"] > scores["normal"]
    assert scores["tumour"] > max(scores[f"val{i}"] for i in range(3))


@pytest.mark.parametrize("baseline", [None, 0.1])
def test_normal_slides_are_scored_leave_one_slide_out(baseline: float | None) -> None:
    """A val slide's own tiles never judge it: its score uses the other val slides only."""
    rng = np.random.default_rng(2)
    unlike = rng.normal(0.8, 1.6, GRID * GRID)  # a val slide unlike the others
    others = [rng.normal(size=GRID * GRID) for _ in range(2)]
    tiles = {"a": _slide("a", unlike), "b": _slide("b", others[0]), "c": _slide("c", others[1])}
    settings = TailSettings(alpha=0.2, baseline=baseline)
    scores, _ = slide_tail_scores(tiles, ["a", "b", "c"], settings)
    held_out = TailReference.fit_slides(others, baseline).slide_p_values(unlike)
    assert scores["a"] == pytest.approx(tail_slide_score(held_out, 0.2))
    in_sample = TailReference.fit_slides([unlike, *others], baseline).slide_p_values(unlike)
    assert scores["a"] > tail_slide_score(in_sample, 0.2)  # in-sample would bias it low
    # One val slide only: its halves are scored against each other, never against themselves.
    alone, reference = slide_tail_scores({"a": _slide("a", unlike)}, ["a"], settings)
    assert reference is not None and np.isfinite(alone["a"])
    assert slide_tail_scores({"t": _slide("t", unlike)}, [], settings)[1] is None


def test_slide_baseline_ignores_a_whole_slide_shift_but_not_a_lesion() -> None:
    """A normal slide whose tissue all scores a little high (stain, thickness) against a
    tumour slide with a 30-tile lesion: raw counts call the shifted normal, the baseline
    (each slide aligned on its own 10th percentile) calls the tumour."""
    rng = np.random.default_rng(7)
    val = [rng.normal(size=GRID * GRID) + offset for offset in (-0.3, 0.0, 0.3)]
    shifted = rng.normal(size=GRID * GRID) + 1.0
    tumour = rng.normal(size=GRID * GRID) - 0.2
    block = (np.arange(GRID * GRID) // GRID < 5) & (np.arange(GRID * GRID) % GRID < 6)
    tumour[block] = rng.uniform(2.5, 3.5, int(block.sum()))
    tiles = {f"v{i}": _slide(f"v{i}", s) for i, s in enumerate(val)}
    tiles |= {"shifted": _slide("shifted", shifted), "tumour": _slide("tumour", tumour)}
    normals = ["v0", "v1", "v2"]
    raw, _ = slide_tail_scores(tiles, normals, TailSettings(baseline=None))
    aligned, reference = slide_tail_scores(tiles, normals, TailSettings(baseline=0.1))
    assert raw["shifted"] > raw["tumour"]
    assert aligned["tumour"] > aligned["shifted"]
    assert aligned["tumour"] > max(aligned[v] for v in normals)
    # Shifting a slide as a whole changes nothing; the reference stays on the raw scale.
    assert reference is not None and reference.baseline == 0.1
    again = reference.slide_p_values(tumour + 5.0)
    assert np.allclose(again, reference.slide_p_values(tumour))
    assert reference.anchor == pytest.approx(np.quantile(val[1], 0.1), abs=0.3)
    assert reference.probability([np.median(val[1])])[0] == pytest.approx(0.5, abs=0.1)
    # It travels in calibration.json; a reference written before it reads as raw.
    record = json.loads(json.dumps(reference.to_dict()))
    assert TailReference.from_dict(record) == reference
    old = {k: v for k, v in record.items() if k not in ("baseline", "anchor")}
    assert TailReference.from_dict(old).baseline is None
    with pytest.raises(ValueError, match="baseline quantile"):
        TailReference.from_dict({**record, "baseline": 0.7})
    with pytest.raises(ValueError, match="baseline quantile"):
        TailReference.fit_slides(val, baseline=-0.1)


def test_artefact_tiles_are_left_out_unless_kept() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=GRID * GRID)
    flagged = np.zeros(GRID * GRID, dtype=bool)
    flagged[:40] = True
    scores[:40] = 10.0  # a fold QC caught
    frame = _slide("s", scores, flagged)
    assert scored_tiles(frame).height == GRID * GRID - 40
    assert scored_tiles(frame, keep_artefacts=True).height == GRID * GRID
    assert scored_tiles(_slide("s", scores)).height == GRID * GRID  # no column: every tile
    tiles = {"v": _slide("v", rng.normal(size=GRID * GRID)), "s": frame}
    left_out, _ = slide_tail_scores(tiles, ["v"], TailSettings())
    kept, _ = slide_tail_scores(tiles, ["v"], TailSettings(keep_artefacts=True))
    assert kept["s"] > left_out["s"]


def test_calibration_carries_the_reference_and_old_files_still_load(tmp_path: Path) -> None:
    reference = TailReference.fit(np.random.default_rng(4).normal(size=1000))
    calibration = Calibration(3.5, 0.05, (0.1, 2.0), "tail", reference, 0.1, True)
    write_calibration(tmp_path, calibration)
    assert read_calibration(tmp_path) == calibration
    old = {"threshold": 0.7, "target_fpr": 0.05, "heatmap_value_range": [0.1, 2.0]}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(old))
    loaded = read_calibration(tmp_path)
    assert loaded is not None and loaded.slide_score == "max" and loaded.tail_reference is None
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({**old, "slide_score": "tail"}))
    with pytest.raises(ValueError, match="tail_reference"):
        read_calibration(tmp_path)


def test_a_tail_calibrated_model_scores_new_slides_on_its_own_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    reference = TailReference.fit(rng.normal(size=2000))
    scores = rng.normal(size=GRID * GRID)
    path = tmp_path / "s.tiles.parquet"
    _slide("s", scores).write_parquet(path)
    score = SlideScore("s", GRID * GRID, 9.0, "s.heatmap.tif", str(path), 16)
    assert calibrated_slide_score(score, None) == score  # never calibrated: the maximum
    as_max = Calibration(1.0, 0.05, (0.0, 1.0))
    assert calibrated_slide_score(score, as_max) == score
    tail = Calibration(1.0, 0.05, (0.0, 1.0), "tail", reference, 0.2)
    rescored = calibrated_slide_score(score, tail)
    assert rescored.slide_score == pytest.approx(tail_slide_score(reference.p_value(scores), 0.2))
    # A reference fitted with a slide baseline aligns the new slide the same way first.
    aligned = TailReference.fit_slides([rng.normal(size=500) for _ in range(4)], baseline=0.1)
    _slide("s", scores + 3.0).write_parquet(path)  # the whole slide scores higher
    rescored = calibrated_slide_score(score, replace(tail, tail_reference=aligned))
    expected = tail_slide_score(aligned.slide_p_values(scores), 0.2)
    assert rescored.slide_score == pytest.approx(expected)
    assert expected < tail_slide_score(aligned.p_value(scores + 3.0), 0.2)


def test_evaluation_thresholds_and_ranks_on_the_chosen_slide_score(tmp_path: Path) -> None:
    """evaluate_site with `tail`: tumour slides (a cluster of moderately high tiles) rank above
    normals with two extreme tiles, where the maximum ranks them below; the threshold comes
    from the val slides' held-out tail scores; `forest` and `max` stay choices."""
    from vadflow.tasks.evaluation.evaluate import evaluate_site, slide_threshold
    from vadflow.tasks.scoring.heatmap import HeatmapGeometry, write_heatmap_tiff

    rng = np.random.default_rng(6)
    block = (np.arange(GRID * GRID) // GRID < 5) & (np.arange(GRID * GRID) % GRID < 6)
    rows, scores, tiles = [], {}, {}
    plan = [(f"v{i}", "val", "normal") for i in range(3)]
    plan += [(f"n{i}", "test", "normal") for i in range(2)]
    plan += [(f"t{i}", "test", "anomalous") for i in range(2)]
    for slide_id, split, label in plan:
        tile_scores = rng.normal(size=GRID * GRID)
        if slide_id.startswith("n"):
            tile_scores[[17, 200]] = 12.0
        if label == "anomalous":
            tile_scores[block] = rng.uniform(1.5, 2.5, int(block.sum()))
        heatmap = tile_scores.reshape(GRID, GRID).astype(np.float32)  # one cell per tile
        path = write_heatmap_tiff(
            tmp_path / f"{slide_id}.heatmap.tif",
            heatmap,
            HeatmapGeometry(slide_id, EXTENT, GRID * EXTENT, GRID * EXTENT, mpp=None),
        )
        rows.append(
            {
                "slide_id": slide_id,
                "split": split,
                "label": label,
                "category": "good" if label == "normal" else "tumor",
                "annotation_uri": None,
                "width": GRID * EXTENT,
                "height": GRID * EXTENT,
                "mpp": None,
            }
        )
        scores[slide_id] = (float(heatmap.max()), str(path))
        tiles[slide_id] = _slide(slide_id, tile_scores)
    slides = pl.DataFrame(rows)
    common = {"heatmap_downsample": EXTENT, "target_fpr": 0.05, "domain": "industrial"}
    tail = evaluate_site(slides, scores, **common, slide_score="tail", tile_scores=tiles)
    assert tail.slide_score == "tail" and tail.tail_reference is not None
    assert tail.metrics["slide_auroc"] == 1.0 and tail.metrics["slide_auroc_max"] == 0.0
    held_out, _ = slide_tail_scores(tiles, ["v0", "v1", "v2"], TailSettings())
    assert tail.threshold == slide_threshold([held_out[f"v{i}"] for i in range(3)], 0.05)
    assert set(tail.slide_scores) == {s for s, _, _ in plan}
    maximum = evaluate_site(slides, scores, **common)
    assert maximum.slide_score == "max" and maximum.metrics["slide_auroc"] == 0.0
    assert "slide_auroc_max" not in maximum.metrics
    forest = evaluate_site(slides, scores, **common, slide_score="forest")
    assert forest.slide_score == "forest" and np.isfinite(forest.threshold)
    with pytest.raises(ValueError, match="needs the tile scores"):
        evaluate_site(slides, scores, **common, slide_score="tail")
    # `auto` (the site default): tail with two or more held-out normal slides, else the maximum.
    auto = evaluate_site(slides, scores, **common, slide_score="auto", tile_scores=tiles)
    assert auto.slide_score == "tail" and auto.slide_scores == tail.slide_scores
    one_normal = slides.filter(~pl.col("slide_id").is_in(["v1", "v2"]))
    fewer = {s: v for s, v in scores.items() if s not in ("v1", "v2")}
    auto = evaluate_site(one_normal, fewer, **common, slide_score="auto", tile_scores=tiles)
    assert auto.slide_score == "max"
    # A model that learned from lesion labels: `auto` is its maximum.
    labelled = evaluate_site(
        slides, scores, **common, slide_score="auto", tile_scores=tiles, labelled=True
    )
    assert labelled.slide_score == "max"
