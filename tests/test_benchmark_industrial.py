"""The industrial hard-mode benchmark (tasks/benchmark/industrial.py): a row per family and
category from the pipeline's own tiling, scoring and MVTec AD metrics, and its CLI option."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vadflow.flows.cli import app
from vadflow.tasks.benchmark import (
    LineSize,
    benchmark_industrial,
    build_hard_line,
    format_industrial_table,
    line_categories,
    load_benchmark_tiles,
)
from vadflow.tasks.synth.industrial import CATEGORIES

# Small enough for seconds, large enough that a ranking of 8 defective against 6 good images
# per category means something: 96 px images, 32 px tiles (16 per image with the half overlap).
LINE = LineSize(n_train=12, n_test_good=6, n_test_per_defect=4, image_size=96)


def test_hard_line_has_every_category_and_is_tiled_whole(tmp_path: Path):
    site = build_hard_line(
        tmp_path, LINE, seed=0, tile_size=32, detectors={"padim": {"ridge": 0.1}}
    )
    config = yaml.safe_load((site / "site.yaml").read_text())
    assert config["domain"] == "industrial"
    assert config["tiling"]["tile_size"] == 32 and config["tiling"]["stride"] == 16
    assert config["detectors"] == {"padim": {"ridge": 0.1}}
    assert line_categories(site) == sorted(CATEGORIES)
    for category in CATEGORIES:
        assert len(list((site / category / "test" / "good").glob("*.png"))) == 6
        assert len(list((site / category / "ground_truth").rglob("*_mask.png"))) == 8
    data = load_benchmark_tiles(site, 32, tmp_path / "work", category="wood")
    # Only wood's images: a quarter of its 12 good training images is held out as validation.
    assert set(data.slides["slide_id"].str.slice(0, 5)) == {"wood-"}
    assert len(data.train) == 9 * 25 and len(data.val) == 3 * 25  # (96 - 32) / 16 + 1 = 5


def test_industrial_benchmark_ranks_planted_defects_per_category(tmp_path: Path, capsys):
    # Smudges only, at the industrial domain's defaults for patch_knn (no `detectors:` block:
    # ImageNet features, 2 x 2 windows, whitened, each map read per pixel). Then every planted
    # smudge outranks every good image. Scratches, the hard half of the line, are what the
    # measured table in the README is about.
    rows = benchmark_industrial(
        ["patch_knn"],
        LINE,
        None,
        seed=0,
        device="cpu",
        tile_size=32,
        defects=["smudge"],
        out_dir=tmp_path,
    )
    assert [(r.family, r.category) for r in rows] == [("patch_knn", c) for c in sorted(CATEGORIES)]
    for row in rows:
        assert row.direction == "ok" and not row.error, row
        for value in (row.slide_auc_max, row.slide_auc, row.pixel_auroc, row.pro):
            assert 0.0 <= value <= 1.0 and not math.isnan(value), row
        assert math.isnan(row.froc)  # no FROC on images
        # Defective images above good ones, defect pixels above good pixels (a random map:
        # AUROC 0.5, AU-PRO about 0.15).
        assert row.slide_auc_max > 0.9, row
        assert row.pixel_auroc > 0.9 and row.pro > 0.8, row
    table = format_industrial_table(rows)
    assert table.splitlines()[0].startswith("| family | category | image AUROC")
    assert "| patch_knn | fabric |" in table and "| patch_knn | wood |" in table
    assert "hard industrial line" in capsys.readouterr().out


def test_the_line_detectors_block_reaches_the_families(tmp_path: Path, monkeypatch):
    from vadflow.tasks.detectors import registry

    built = []
    create = registry.create_detector

    def recording(family, **config):
        built.append(create(family, **config))
        return built[-1]

    monkeypatch.setattr(registry, "create_detector", recording)
    tiny = LineSize(n_train=4, n_test_good=2, n_test_per_defect=1, image_size=32)
    # The block overrides the industrial domain's defaults key by key: the rest stay.
    block = {"patch_knn": {"coreset_size": 64, "window": 1, "map_norm": "none"}}
    rows = benchmark_industrial(
        ["patch_knn"], tiny, None, device="cpu", tile_size=32, detectors=block, show=False
    )
    assert all(not r.error for r in rows), rows
    chosen = [
        (d.config.coreset_size, d.config.window, d.config.map_norm, d.config.features)
        for d in built
    ]
    assert chosen == [(64, 1, "none", "imagenet")] * 2


def test_industrial_benchmark_gives_a_failing_family_its_row(tmp_path: Path, monkeypatch):
    from vadflow.tasks.detectors.padim.detector import PadimDetector

    def broken_fit(self, train, val, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(PadimDetector, "fit", broken_fit)
    tiny = LineSize(n_train=4, n_test_good=2, n_test_per_defect=1, image_size=32)
    rows = benchmark_industrial(["padim"], tiny, 1, device="cpu", tile_size=32, show=False)
    assert [r.category for r in rows] == sorted(CATEGORIES)
    assert all(r.direction == "failed" and "RuntimeError: boom" in r.error for r in rows)
    assert "| padim | fabric | n/a | n/a | n/a | n/a |" in format_industrial_table(rows)


def test_industrial_benchmark_refuses_unknown_sizes_and_families():
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        build_hard_line(Path("unused"), "huge")
    with pytest.raises(KeyError, match="no_such_family"):
        benchmark_industrial(["no_such_family"])


def test_cli_runs_the_industrial_domain_and_writes_its_table(tmp_path: Path):
    markdown = tmp_path / "table.md"
    args = ["benchmark-detectors", "--domain", "industrial", "--size", "tiny"]
    args += ["--family", "patch_knn", "--own-budget", "--device", "cpu", "--markdown", markdown]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    lines = markdown.read_text().splitlines()
    assert lines[0].startswith("| family | category | image AUROC")
    assert [line.split(" | ")[1] for line in lines[2:]] == sorted(CATEGORIES)
    refused = CliRunner().invoke(
        app, ["benchmark-detectors", "--domain", "industrial", "--contamination", "0.1"]
    )
    assert refused.exit_code != 0 and "pathology site only" in refused.output
