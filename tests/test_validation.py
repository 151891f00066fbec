"""The validation stage: strict vs quarantine, reports on disk, publishing, `vadflow validate`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np
import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from vadflow.data_contracts import ContractError, Grid
from vadflow.tasks.manifests import SCHEMA_VERSION, SLIDE_SCHEMA, TILE_SCHEMA, conform
from vadflow.tasks.scoring.heatmap import HeatmapGeometry, write_heatmap_tiff
from vadflow.tasks.site import TilingConfig
from vadflow.tasks.tiling.grid import tile_origins
from vadflow.tasks.validation import (
    QuarantinedSlide,
    check_manifests,
    check_metrics,
    check_scores,
    check_stage,
    load_report,
    mark_quarantined,
    publish_report,
    report_folder,
    slide_scores_frame,
    tile_grids,
    validate_outputs,
    validate_stage,
)

SITE = "tiny"
W, H, TILE, STRIDE = 128, 96, 32, 16
SLIDES = (  # slide_id, label, split
    ("good_001", "normal", "train"),
    ("good_002", "normal", "val"),
    ("bad_001", "anomalous", "test"),
)


def _slides() -> pl.DataFrame:
    rows = [
        {
            "schema_version": SCHEMA_VERSION,
            "site": SITE,
            "slide_id": sid,
            "uri": f"data/{sid}.png",
            "sha256": f"{i:064x}",
            "size_bytes": 100,
            "format": "png",
            "levels": 1,
            "width": W,
            "height": H,
            "mpp": None,
            "mpp_source": "none",
            "label": label,
            "category": "good" if label == "normal" else "hole",
            "split": split,
            "annotation_uri": None,
            "status": "ok",
            "reason": None,
        }
        for i, (sid, label, split) in enumerate(SLIDES)
    ]
    return conform(pl.DataFrame(rows, schema=SLIDE_SCHEMA), SLIDE_SCHEMA)


def _tiles(slide_id: str, split: str) -> pl.DataFrame:
    xs, ys = tile_origins(W, H, TILE, STRIDE)
    frame = pl.DataFrame(
        {
            "schema_version": SCHEMA_VERSION,
            "site": SITE,
            "slide_id": slide_id,
            "tile_id": [f"{slide_id}:{x}:{y}" for x, y in zip(xs, ys, strict=True)],
            "level": 0,
            "x": xs,
            "y": ys,
            "size": TILE,
            "extent": TILE,
            "mpp": None,
            "tissue_fraction": 1.0,
            "label_fraction": 0.0,
            "split": split,
        },
        schema_overrides={"mpp": pl.Float64},
    )
    return conform(frame, TILE_SCHEMA)


def _all_tiles() -> pl.DataFrame:
    return pl.concat([_tiles(sid, split) for sid, _, split in SLIDES])


def _corrupt(tiles: pl.DataFrame, tile_id: str, **values: object) -> pl.DataFrame:
    hit = pl.col("tile_id") == tile_id
    return tiles.with_columns(
        [
            pl.when(hit).then(pl.lit(v)).otherwise(pl.col(c)).cast(tiles.schema[c]).alias(c)
            for c, v in values.items()
        ]
    )


# --- validate_stage: strict and quarantine ---------------------------------------------------


def test_strict_raises_with_suite_expectation_count_rows_and_report(tmp_path: Path) -> None:
    tiles = _corrupt(_all_tiles(), "bad_001:96:0", x=200)  # ends at 232 > 128
    with pytest.raises(ContractError) as err:
        validate_stage("tile_manifest", tiles, _slides(), mode="strict", report_dir=tmp_path)
    message = str(err.value)
    assert "contract 'tile_manifest' failed" in message
    assert "expect_column_pair_values_a_to_be_greater_than_b" in message
    assert "1 unexpected" in message
    assert "bad_001:96:0" in message  # an example row
    assert f"report: {tmp_path / 'index.html'}" in message
    assert err.value.report == str(tmp_path / "index.html")
    _assert_report_names(
        tmp_path,
        "tile_manifest",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "tile ends inside the slide",
    )


def _assert_report_names(folder: Path, label: str, expectation: str, description: str) -> None:
    for name in ("index.html", "summary.md", f"{label}.json", f"{label}.gx.html"):
        assert (folder / name).is_file(), name
    assert expectation in (folder / "index.html").read_text()
    assert expectation in (folder / "summary.md").read_text()
    # GX's own Data Docs page shows an expectation by its description, with the counts.
    gx_page = (folder / f"{label}.gx.html").read_text()
    assert description in gx_page and "unexpected" in gx_page
    record = json.loads((folder / f"{label}.json").read_text())
    assert expectation in [f["expectation"] for f in record["result"]["failures"]]


def test_quarantine_drops_only_the_failing_slide(tmp_path: Path) -> None:
    tiles = _corrupt(_all_tiles(), "good_002:16:16", tissue_fraction=1.5)
    tiles = pl.concat([tiles, tiles.filter(pl.col("tile_id") == "good_002:0:0")])  # duplicate id
    stage = validate_stage(
        "tile_manifest", tiles, _slides(), mode="quarantine", report_dir=tmp_path
    )
    assert stage.passed and not stage.result.success
    assert stage.quarantined_ids == ["good_002"]
    assert stage.frame is not None
    assert set(stage.frame["slide_id"].unique()) == {"good_001", "bad_001"}
    assert stage.frame.height == 2 * _tiles("x", "train").height
    reason = stage.quarantined[0].reason
    assert "tile_manifest" in reason
    assert "expect_column_values_to_be_unique on 'tile_id'" in reason and "2 rows" in reason
    assert "tissue_fraction" in reason
    _assert_report_names(
        tmp_path, "tile_manifest", "expect_column_values_to_be_unique", "a tile is listed once"
    )
    assert "good_002" in (tmp_path / "index.html").read_text()
    assert load_report(tmp_path)[0]["outcome"] == "quarantined 1 slide(s)"


def test_same_frame_in_strict_mode_stops(tmp_path: Path) -> None:
    tiles = _corrupt(_all_tiles(), "good_002:16:16", tissue_fraction=1.5)
    stage = check_stage("tile_manifest", tiles, _slides(), mode="strict")
    assert not stage.passed and stage.quarantined == []
    assert stage.frame is not None and stage.frame.height == tiles.height
    assert isinstance(stage.error, ContractError)


def test_quarantine_cannot_fix_a_missing_column() -> None:
    tiles = _all_tiles().drop("tissue_fraction")
    with pytest.raises(ContractError, match="quarantine cannot fix"):
        validate_stage("tile_manifest", tiles, _slides(), mode="quarantine")


def test_quarantine_refuses_to_leave_no_slide() -> None:
    tiles = _all_tiles().with_columns(tissue_fraction=pl.lit(2.0))
    with pytest.raises(ContractError, match="none would be left"):
        validate_stage("tile_manifest", tiles, _slides(), mode="quarantine")


def test_unknown_mode_and_contract() -> None:
    with pytest.raises(ValueError, match="mode"):
        check_stage("tile_manifest", _all_tiles(), _slides(), mode="lenient")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="tile_manifest"):
        check_stage("tiles", _all_tiles(), _slides())


def test_grids_follow_the_tiler() -> None:
    slides = _slides().with_columns(
        mpp=pl.Series([0.25, 0.5, None]), mpp_source=pl.Series(["metadata", "metadata", "none"])
    )
    tiling = TilingConfig(tile_size=64, stride=32, target_mpp=0.5)
    # 0.5 um/px wanted: a step of 32 working px is 64 level-0 px at 0.25 um/px, 32 at 0.5,
    # and 32 for an image without MPP (read at level 0).
    assert tile_grids(slides, tiling) == {
        "good_001": Grid(64),
        "good_002": Grid(32),
        "bad_001": Grid(32),
    }
    industrial = tile_grids(_slides(), TilingConfig(tile_size=TILE, stride=STRIDE, target_mpp=None))
    assert set(industrial.values()) == {Grid(STRIDE)}
    tiles = _corrupt(_all_tiles(), "bad_001:16:16", y=20)
    stage = check_stage("tile_manifest", tiles, _slides(), grids=industrial, mode="quarantine")
    assert stage.quarantined_ids == ["bad_001"]
    assert "y_grid_offset" in stage.quarantined[0].reason


# --- boundary checks on files ---------------------------------------------------------------


def _write_manifests(root: Path, tiles: pl.DataFrame | None = None) -> tuple[Path, list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    slides_path = root / "slides.parquet"
    _slides().write_parquet(slides_path)
    tiles = _all_tiles() if tiles is None else tiles
    (root / "tiles").mkdir(exist_ok=True)
    paths = []
    for (slide_id,), part in tiles.group_by(["slide_id"], maintain_order=True):
        path = root / "tiles" / f"{slide_id}.parquet"
        part.write_parquet(path)
        paths.append(str(path))
    return slides_path, paths


def test_check_manifests_quarantines_files_and_manifest(tmp_path: Path) -> None:
    tiles = _corrupt(_all_tiles(), "good_001:0:0", x=W)  # past the edge
    slides_path, tile_paths = _write_manifests(tmp_path / "out", tiles)
    published: list[dict] = []
    check = check_manifests(
        slides_path,
        tile_paths,
        tiling=TilingConfig(tile_size=TILE, stride=STRIDE, target_mpp=None),
        mode="quarantine",
        report_dir=report_folder(tmp_path / "out" / "reports", "night-1"),
        quarantine_dir=tmp_path / "out" / "quarantine",
        markdown_artifact=lambda **kw: published.append(kw),
    )
    assert check.quarantined_ids == ["good_001"]
    assert check.stages == ["slide_manifest", "tile_manifest"]
    record = json.loads((tmp_path / "out" / "quarantine" / "good_001.json").read_text())
    assert record["uri"] == "data/good_001.png" and "x_end" in record["reason"]
    slides = pl.read_parquet(slides_path)
    row = slides.filter(pl.col("slide_id") == "good_001").row(0, named=True)
    assert row["status"] == "quarantined" and "x_end" in row["reason"]
    assert slides.filter(pl.col("status") == "ok").height == 2
    assert published and published[0]["key"] == "data-contracts"
    assert "tile_manifest" in published[0]["markdown"] and "good_001" in published[0]["markdown"]
    assert Path(check.report_dir).name == "night-1"


def test_check_manifests_strict_reports_before_raising(tmp_path: Path) -> None:
    tiles = pl.concat([_all_tiles(), _all_tiles().head(1)])  # duplicate tile id
    slides_path, tile_paths = _write_manifests(tmp_path / "out", tiles)
    published: list[dict] = []
    report_dir = tmp_path / "report"
    with pytest.raises(ContractError, match="expect_column_values_to_be_unique"):
        check_manifests(
            slides_path,
            tile_paths,
            report_dir=report_dir,
            quarantine_dir=tmp_path / "out" / "quarantine",
            markdown_artifact=lambda **kw: published.append(kw),
        )
    assert published and "FAILED" in published[0]["markdown"]
    assert [r["label"] for r in load_report(report_dir)] == ["slide_manifest", "tile_manifest"]
    assert not (tmp_path / "out" / "quarantine").exists()
    assert pl.read_parquet(slides_path)["status"].to_list() == ["ok"] * 3


def _write_scores(folder: Path, slide_id: str, tiles: pl.DataFrame, shape=None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scores = tiles.filter(pl.col("slide_id") == slide_id).select(
        "slide_id", "tile_id", pl.lit(rng.random()).alias("score")
    )
    scores.write_parquet(folder / f"{slide_id}.tiles.parquet")
    rows, cols = shape or (H, W)
    heatmap = np.full((rows, cols), 0.5, dtype=np.float32)  # downsample 1
    geometry = HeatmapGeometry(slide_id, 1, level0_width=cols, level0_height=rows, mpp=None)
    path = write_heatmap_tiff(folder / f"{slide_id}.heatmap.tif", heatmap, geometry)
    return {
        "slide_id": slide_id,
        "tiles": scores.height,
        "slide_score": 0.5,
        "heatmap": str(path),
        "tile_scores": str(folder / f"{slide_id}.tiles.parquet"),
        "heatmap_downsample": 1,
    }


def test_slide_scores_frame_reads_heatmap_shapes(tmp_path: Path) -> None:
    records = [
        _write_scores(tmp_path, "bad_001", _all_tiles()),
        {**_write_scores(tmp_path, "good_002", _all_tiles()), "heatmap": str(tmp_path / "no.tif")},
    ]
    frame = slide_scores_frame(records)
    assert frame.row(0, named=True)["heatmap_rows"] == H
    assert frame.row(0, named=True)["heatmap_cols"] == W
    assert frame.row(1, named=True)["heatmap_rows"] is None


def test_check_scores_quarantines_a_slide_with_a_wrong_heatmap(tmp_path: Path) -> None:
    slides_path, tile_paths = _write_manifests(tmp_path / "out")
    folder = tmp_path / "out" / "heatmaps" / "ae_l2-1"
    scores = [
        _write_scores(folder, "good_002", _all_tiles()),
        _write_scores(folder, "bad_001", _all_tiles(), shape=(H, W + 1)),
    ]
    check = check_scores(
        "ae_l2",
        scores,
        slides_path,
        tile_paths,
        expected_slides=["good_002", "bad_001"],
        mode="quarantine",
        report_dir=tmp_path / "report",
        quarantine_dir=tmp_path / "out" / "quarantine",
    )
    assert check.quarantined_ids == ["bad_001"]
    assert "heatmap_cols" in check.quarantined[0].reason
    assert (tmp_path / "report" / "slide_scores-ae_l2.gx.html").is_file()
    assert (tmp_path / "out" / "quarantine" / "bad_001.json").is_file()

    missing = scores[:1]  # bad_001 was sent to scoring but has no score
    with pytest.raises(ContractError, match="every slide sent to scoring has a score"):
        check_scores(
            "ae_l2",
            missing,
            slides_path,
            tile_paths,
            expected_slides=["good_002", "bad_001"],
            report_dir=tmp_path / "report2",
        )


def test_check_metrics_is_always_strict(tmp_path: Path) -> None:
    good = {"n_test_slides": 4.0, "n_test_anomalous": 2.0, "slide_auroc": 0.75}
    assert check_metrics("ae_l2", good, report_dir=tmp_path).quarantined == []
    with pytest.raises(ContractError, match="n_test_anomalous <= n_test_slides"):
        check_metrics("ae_l2", {**good, "n_test_anomalous": 5.0}, report_dir=tmp_path)
    labels = [r["label"] for r in load_report(tmp_path)]
    assert labels.count("metrics-ae_l2") == 1  # the second check replaced the first's files


def test_mark_quarantined_keeps_other_rows() -> None:
    slides = mark_quarantined(_slides(), [QuarantinedSlide("bad_001", "broken", "tile_manifest")])
    assert slides["status"].to_list() == ["ok", "ok", "quarantined"]
    assert slides["reason"].to_list() == [None, None, "broken"]


def test_publish_markdown_without_mlflow(tmp_path: Path) -> None:
    validate_stage("slide_manifest", _slides(), report_dir=tmp_path)
    seen: list[dict] = []
    markdown = publish_report(tmp_path, markdown_artifact=lambda **kw: seen.append(kw), key="C_1 x")
    assert seen[0]["key"] == "c-1-x"  # Prefect keys: lowercase letters, digits, dashes
    assert seen[0]["markdown"] == markdown and "slide_manifest" in markdown


def test_report_escapes_what_it_shows_in_html(tmp_path: Path) -> None:
    """Labels and example values are data: the HTML report escapes them (the templates
    autoescape by extension), the Markdown one shows them as they are."""
    slides = _slides().with_columns(
        uri=pl.when(pl.col("slide_id") == "bad_001")
        .then(pl.lit(None, pl.String))
        .otherwise(pl.col("uri"))
    )
    stage = check_stage("slide_manifest", slides, report_dir=tmp_path, label="<b>night</b>")
    assert not stage.passed
    index = (tmp_path / "index.html").read_text()
    assert "&lt;b&gt;night&lt;/b&gt;" in index and "<b>night</b>" not in index
    assert "href='#b_night_b'" in index and "expect_column_values_to_not_be_null" in index
    assert "| <b>night</b> | strict |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_report_folder_is_logged_to_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    validate_stage("slide_manifest", _slides(), report_dir=tmp_path / "report")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("contracts", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment).info.run_id
    publish_report(tmp_path / "report", run_id=run_id, tracking_uri=uri)
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, "data_contracts")}
    assert {"index.html", "summary.md", "slide_manifest.json", "slide_manifest.gx.html"} <= logged


# --- every contract on existing outputs, and `vadflow validate` -------------------------------


def _make_outputs(home: Path) -> Path:
    """A site folder and the outputs a nightly run would have left for it."""
    site_dir = home / "data" / SITE
    site_dir.mkdir(parents=True)
    (site_dir / "site.yaml").write_text(
        f"name: {SITE}\ndomain: industrial\ntiling:\n"
        f"  {{tile_size: {TILE}, stride: {STRIDE}, target_mpp: null, heatmap_downsample: 1}}\n"
    )
    root = home / "outputs" / SITE
    _write_manifests(root)
    folder = root / "heatmaps" / "ae_l2-20260101T000000"
    for slide_id in ("good_002", "bad_001"):
        _write_scores(folder, slide_id, _all_tiles())
    (root / "heatmaps" / "ae_l2-20250101T000000").mkdir()  # an older model: not checked
    (root / "reports" / "ae_l2").mkdir(parents=True)
    metrics = {"n_test_slides": 1.0, "n_test_anomalous": 1.0, "threshold": 0.4, "froc": math.nan}
    (root / "reports" / "ae_l2" / "metrics.json").write_text(json.dumps(metrics))
    return site_dir


def test_validate_outputs_runs_every_contract(tmp_path: Path) -> None:
    from vadflow.tasks.site import load_site

    site_dir = _make_outputs(tmp_path)
    outcome = validate_outputs(tmp_path / "outputs" / SITE, load_site(site_dir), run="check")
    labels = [s.label for s in outcome.stages]
    assert labels == [
        "slide_manifest",
        "tile_manifest",
        "tile_scores-ae_l2",
        "slide_scores-ae_l2",
        "metrics-ae_l2",
    ]
    assert outcome.passed, [s.result.message() for s in outcome.stages]
    assert outcome.report_dir == tmp_path / "outputs" / SITE / "reports" / "contracts" / "check"
    assert outcome.stages[1].result.notes == []  # the grid was known and checked


def _cli() -> typer.Typer:
    from vadflow.flows.cli import app

    return app


def test_validate_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VADFLOW_HOME", os.environ.get("VADFLOW_HOME", ""))  # restored after
    site_dir = _make_outputs(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(_cli(), ["validate", str(site_dir), "--home", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "slide_scores-ae_l2" in ok.output and "report:" in ok.output

    tiles_path = tmp_path / "outputs" / SITE / "tiles" / "bad_001.parquet"
    tiles = pl.read_parquet(tiles_path)
    pl.concat([tiles, tiles.head(1)]).write_parquet(tiles_path)
    bad = runner.invoke(_cli(), ["validate", str(site_dir), "--home", str(tmp_path)])
    assert bad.exit_code == 1, bad.output
    assert "expect_column_values_to_be_unique" in bad.output
    assert "bad_001:0:0" in bad.output

    missing = runner.invoke(
        _cli(), ["validate", str(tmp_path / "nowhere"), "--home", str(tmp_path)]
    )
    assert missing.exit_code == 2
