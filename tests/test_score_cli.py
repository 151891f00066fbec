"""`vadflow score` on new, unlabelled slides and `vadflow export` redrawing without rescoring.

A tiny Camelyon16-shaped site is trained once with the nightly flow (which calibrates the
model and makes it the site's champion); its test slides, copied into a plain folder with no
layout and no labels, are the "new slides".
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from vadflow.tasks.scoring.heatmap import HeatmapGeometry, read_heatmap_tiff, write_heatmap_tiff

SITE = "score-cli"
flow_test = [pytest.mark.slow, pytest.mark.flow]


def _cli():
    from vadflow.flows.cli import app

    return app


def test_heatmaps_and_records_from_runs_before_the_tiff_only_layout_still_load(
    tmp_path: Path,
) -> None:
    from vadflow.tasks.exports.render import _slide_score
    from vadflow.tasks.scoring.heatmap import heatmap_file_shape, load_heatmap

    heat = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    npy = tmp_path / "s1.heatmap.npy"
    np.save(npy, heat)
    assert np.array_equal(load_heatmap(npy), heat) and heatmap_file_shape(npy) == (5, 7)
    geometry = HeatmapGeometry("s1", 16, level0_width=7 * 16, level0_height=5 * 16, mpp=0.25)
    tif = write_heatmap_tiff(tmp_path / "s1.heatmap.tif", heat, geometry)
    assert np.array_equal(load_heatmap(tif), heat) and heatmap_file_shape(tif) == (5, 7)
    old = {"slide_id": "s1", "tiles": 3, "slide_score": 0.9, "heatmap": str(npy)}
    old |= {"tile_scores": "s1.tiles.parquet", "heatmap_downsample": 16}
    assert _slide_score({**old, "heatmap_tiff": str(tif)}).heatmap == str(npy)


def test_heatmap_tiff_round_trip_with_geometry_and_pyramid(tmp_path: Path) -> None:
    import pyvips

    geometry = HeatmapGeometry("s1", downsample=16, level0_width=9000, level0_height=5000, mpp=0.25)
    rng = np.random.default_rng(0)
    heat = rng.random(geometry.shape).astype(np.float32)  # (313, 563)
    heat[:40, :] = np.nan  # background
    heat[100:102, 200:202] = [[1.0, 3.0], [np.nan, 5.0]]
    path = write_heatmap_tiff(tmp_path / "s1.heatmap.tif", heat, geometry, tile=128)

    values, read = read_heatmap_tiff(path)
    assert read == geometry and values.dtype == np.float32
    assert np.array_equal(values, heat, equal_nan=True)  # raw scores, NaN kept
    level1, geo1 = read_heatmap_tiff(path, level=1)
    assert level1.shape == (157, 282) and geo1.downsample == 32 and geo1.shape == level1.shape
    assert level1[50, 100] == pytest.approx(3.0)  # mean of the scored cells of its 2x2 block
    assert np.isnan(level1[:20]).all()
    # Halved until the longer side fits one tile: 563 -> 282 -> 141 -> 71 columns.
    top, geo3 = read_heatmap_tiff(path, level=3)
    assert top.shape == (40, 71) and geo3.downsample == 128
    with pytest.raises(ValueError, match="levels 0-3"):
        read_heatmap_tiff(path, level=4)
    # Other readers place it from the resolution tags: 4 um per heatmap pixel.
    image = pyvips.Image.new_from_file(str(path))
    assert (image.width, image.height) == (563, 313)
    assert image.xres == pytest.approx(1e3 / 4.0)  # libvips: pixels per millimetre

    plain = tmp_path / "plain.tif"
    pyvips.Image.new_from_array(np.zeros((8, 8), np.uint8)).tiffsave(str(plain))
    with pytest.raises(ValueError, match="not a vadflow heatmap TIFF"):
        read_heatmap_tiff(plain)
    with pytest.raises(ValueError, match="needs"):
        write_heatmap_tiff(tmp_path / "bad.tif", heat[:-1], geometry)


@pytest.fixture(scope="module")
def trained(prefect_harness, state_dir: Path):
    """The nightly flow on a tiny site (the model, its calibration, the champion alias), and a
    folder of 'new' slides: the site's test slides, with no layout, labels or annotations."""
    from vadflow.flows.nightly import nightly
    from vadflow.tasks.synth.pathology import make_pathology_site

    data = state_dir / "data"
    site = make_pathology_site(
        data, SITE, n_train_normal=2, n_test_normal=1, n_test_tumor=1, width=1536, height=1024
    )
    with (site / "site.yaml").open("a") as handle:
        handle.write("parallel:\n  backend: serial\nfamilies: [ae_l2]\n")
    new = data / "new-slides"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for path in sorted((site / "testing" / "images").glob("*.tif")):
        shutil.copy(path, new / path.name)
    home = state_dir / "score-cli-home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VADFLOW_HOME", str(home))  # the CLI resolves champions in this home's MLflow
        summary = nightly(
            str(site),
            output_root=str(home / "outputs"),
            flags={"epochs": 2, "base_channels": 8},
        )
        yield {"site": site, "new": new, "home": home, "summary": summary}


def _score(trained: dict, model: str, *options: str):
    from vadflow.tasks.exports.render import load_scored_run

    home = trained["home"]
    result = CliRunner().invoke(
        _cli(),
        ["score", str(trained["new"]), "--model", model, "--home", str(home), *options],
    )
    assert result.exit_code == 0, result.output
    runs = sorted((home / "outputs" / "new-slides" / "heatmaps").glob("score-ae_l2-*"))
    return result.output, load_scored_run(runs[-1])


@pytest.fixture(scope="module")
def scored(trained):
    model_dir = trained["summary"].families["ae_l2"].model_dir
    output, run = _score(trained, model_dir)
    return {"output": output, "run": run, "model_dir": Path(model_dir)}


@pytest.mark.slow
@pytest.mark.flow
def test_score_calls_new_slides_at_the_models_calibrated_threshold(trained, scored) -> None:
    run, output = scored["run"], scored["output"]
    calibration = json.loads((scored["model_dir"] / "calibration.json").read_text())
    assert np.isfinite(calibration["threshold"])
    assert run.threshold == run.calibrated_threshold == calibration["threshold"]
    assert run.value_range == tuple(calibration["heatmap_value_range"])
    assert run.metrics == {}
    slides = pl.read_parquet(trained["home"] / "outputs" / "new-slides" / "slides.parquet")
    assert set(slides["label"]) == {"unknown"} and set(slides["split"]) == {"test"}
    assert sorted(s.slide_id for s in run.exported) == sorted(slides["slide_id"])
    reports = trained["home"] / "outputs" / "new-slides" / "reports" / "score-ae_l2"
    assert (reports / "report.html").exists() and not (reports / "metrics.json").exists()
    for line in run.exported:
        assert line.slide_id in output
        assert line.predicted == (line.score > run.threshold)
        assert ("anomalous" if line.predicted else "normal") in output
        features = json.loads(Path(line.candidates_geojson).read_text())["features"]
        # Only predictions: candidates above the model's calibrated threshold.
        assert all(f["properties"]["measurements"]["raw_score"] > run.threshold for f in features)
        assert line.candidates == len(features)
        assert line.predicted == (line.candidates > 0)  # the slide score is the heatmap's top
        heat, geometry = read_heatmap_tiff(line.heatmap_tiff)
        row = slides.filter(pl.col("slide_id") == line.slide_id).row(0, named=True)
        assert (geometry.level0_width, geometry.level0_height) == (row["width"], row["height"])
        assert geometry.mpp == pytest.approx(row["mpp"]) and geometry.downsample == 16
        # The export points at the one heatmap file scoring wrote.
        written = next(s.heatmap for s in run.scores if s.slide_id == line.slide_id)
        assert line.heatmap_tiff == written
        assert np.nanmax(heat) == pytest.approx(line.score)
        assert Path(line.overlay).exists() and Path(line.asap_xml).exists()
    # The same slides under their labelled names scored the same in the nightly run.
    nightly = {r.slide_id: r.score for r in trained["summary"].families["ae_l2"].table}
    assert {s.slide_id: s.score for s in run.exported} == pytest.approx(nightly)


@pytest.mark.slow
@pytest.mark.flow
def test_score_resolves_the_champion_to_the_same_model(trained, scored) -> None:
    # A champion is per family: the new slides' folder has no site file naming one.
    _, run = _score(trained, f"champion@{SITE}", "--family", "ae_l2")
    assert run.model == f"champion@{SITE}"
    assert run.calibrated_threshold == scored["run"].calibrated_threshold
    first = {s.slide_id: s.score for s in scored["run"].exported}
    assert {s.slide_id: s.score for s in run.exported} == pytest.approx(first)


@pytest.mark.slow
@pytest.mark.flow
def test_a_model_never_calibrated_ranks_slides_without_calling_them(
    trained, scored, tmp_path: Path
) -> None:
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(
        scored["model_dir"], uncalibrated, ignore=shutil.ignore_patterns("calibration.json")
    )
    output, run = _score(trained, str(uncalibrated))
    assert "no calibrated threshold" in _words(output)
    assert math.isnan(run.calibrated_threshold)
    assert all(s.predicted is None for s in run.exported)
    first = {s.slide_id: s.score for s in scored["run"].exported}
    assert {s.slide_id: s.score for s in run.exported} == pytest.approx(first)


@pytest.mark.slow
@pytest.mark.flow
def test_export_redraws_without_rescoring(trained, scored) -> None:
    run = scored["run"]
    heatmaps = sorted(run.heatmap_dir.glob("*.heatmap.*"))
    before = {p: p.read_bytes() for p in heatmaps}
    runner = CliRunner()
    # Later score runs of these slides share the exports folder: draw this run's defaults first.
    default = runner.invoke(_cli(), ["export", str(run.heatmap_dir)])
    assert default.exit_code == 0, default.output
    files = {
        s.slide_id: {
            k: Path(getattr(s, k)).read_bytes()
            for k in ("overlay", "candidates_csv", "regions_geojson")
        }
        for s in run.exported
    }
    styled = runner.invoke(
        _cli(), ["export", str(run.heatmap_dir), "--colour-map", "viridis", "--alpha", "0.3"]
    )
    assert styled.exit_code == 0, styled.output
    from vadflow.tasks.exports.render import load_scored_run

    restyled = load_scored_run(run.heatmap_dir)
    assert restyled.style.colour_map == "viridis" and restyled.style.alpha == 0.3
    assert restyled.threshold == run.threshold
    for line in restyled.exported:
        old = files[line.slide_id]
        assert Path(line.overlay).read_bytes() != old["overlay"]  # a new look ...
        assert Path(line.candidates_csv).read_bytes() == old["candidates_csv"]  # ... same finds
        assert Path(line.regions_geojson).read_bytes() == old["regions_geojson"]

    # A threshold below every score and the normal floor (the median of normal heatmaps) calls
    # every slide anomalous and grows the regions.
    low = min(min(s.score for s in run.exported), run.value_range[0]) - 1e-6
    assert low < run.calibrated_threshold
    lowered = runner.invoke(_cli(), ["export", str(run.heatmap_dir), "--threshold", repr(low)])
    assert lowered.exit_code == 0, lowered.output
    redrawn = load_scored_run(run.heatmap_dir)
    assert redrawn.threshold == low and redrawn.calibrated_threshold == run.calibrated_threshold
    for line, old in zip(redrawn.exported, run.exported, strict=True):
        assert line.predicted and line.score == old.score
        assert line.candidates >= old.candidates
        regions = json.loads(Path(line.regions_geojson).read_text())["features"]
        area = sum(f["properties"]["measurements"]["area_level0_px2"] for f in regions)
        old_regions = json.loads(files[line.slide_id]["regions_geojson"])["features"]
        old_area = sum(f["properties"]["measurements"]["area_level0_px2"] for f in old_regions)
        assert area > old_area
    assert {p: p.read_bytes() for p in heatmaps} == before  # nothing was rescored
    assert f"{low:.5g}" in redrawn.report.read_text()


@pytest.mark.slow
@pytest.mark.flow
def test_evaluate_shares_the_scoring_path_and_its_run_can_be_redrawn(trained) -> None:
    """`vadflow evaluate` on the training site: metrics, and the same calibration as nightly."""
    from vadflow.tasks.exports.render import load_scored_run

    model_dir = trained["summary"].families["ae_l2"].model_dir
    result = CliRunner().invoke(
        _cli(),
        ["evaluate", str(trained["site"]), "--model", model_dir, "--home", str(trained["home"])],
    )
    assert result.exit_code == 0, result.output
    assert "slide_auroc" in result.output
    runs = sorted((Path(trained["summary"].outputs) / "heatmaps").glob("batch-ae_l2-*"))
    run = load_scored_run(runs[-1])
    assert run.metrics["slide_auroc"] == trained["summary"].families["ae_l2"].metrics["slide_auroc"]
    # Its own held-out normal slide recalibrates to the threshold the model carries.
    nightly = trained["summary"].families["ae_l2"].metrics["threshold"]
    assert run.calibrated_threshold == pytest.approx(nightly)
    assert len(run.exported) == 3  # the val slide and both test slides
    # A site's output folder stands for its newest scored run.
    assert load_scored_run(trained["summary"].outputs).heatmap_dir == run.heatmap_dir


@pytest.mark.slow
@pytest.mark.flow
def test_export_reproduces_the_nightly_runs_evaluated_candidates(trained) -> None:
    """Re-rendering a nightly run recomputes evaluation's candidates exactly (FROC inputs)."""
    from vadflow.tasks.exports.render import load_scored_run

    outputs = Path(trained["summary"].outputs)
    nightly = next((outputs / "heatmaps").glob("ae_l2-*"))
    run = load_scored_run(nightly)
    assert run.name == "ae_l2" and run.metrics  # the nightly's evaluated run
    csvs = {s: (outputs / "exports" / "ae_l2" / f"{s}.csv") for s in run.candidate_slides}
    assert csvs and all(p.exists() for p in csvs.values())
    before = {s: p.read_bytes() for s, p in csvs.items()}
    result = CliRunner().invoke(_cli(), ["export", str(nightly)])
    assert result.exit_code == 0, result.output
    assert {s: p.read_bytes() for s, p in csvs.items()} == before


@pytest.mark.slow
@pytest.mark.flow
def test_score_and_export_refuse_bad_input_clearly(trained, scored, tmp_path: Path) -> None:
    runner = CliRunner()
    one = next(trained["new"].glob("*.tif"))
    refused = runner.invoke(_cli(), ["score", str(one), "--home", str(trained["home"])])
    assert refused.exit_code == 2 and "give the folder holding it" in _words(refused.output)
    empty = runner.invoke(_cli(), ["export", str(tmp_path)])
    assert empty.exit_code == 2 and "no scored.json" in _words(empty.output)
    scored_dir = next((trained["home"] / "outputs" / "new-slides" / "heatmaps").glob("score-*"))
    bad_map = runner.invoke(_cli(), ["export", str(scored_dir), "--colour-map", "nope"])
    assert bad_map.exit_code == 2 and "unknown colour map 'nope'" in _words(bad_map.output)
    # The new slides' folder names no family, so the default's (padim) champion is looked
    # for; the error names the champions the site does have.
    other = runner.invoke(
        _cli(),
        [
            "score",
            str(trained["new"]),
            "--model",
            f"champion@{SITE}",
            "--home",
            str(trained["home"]),
        ],
    )
    words = _words(other.output)
    assert other.exit_code != 0 and f"{SITE}-padim has no champion" in words, words
    assert f"{SITE}'s champions: {SITE}-ae_l2" in words and "give --family" in words


def _words(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())
