"""The nightly flow on sites laid out as the public datasets are released (issue #20).

- Camelyon16: a synthetic site rearranged into the release layout (`as_camelyon16_release`,
  test annotations zipped as downloaded): every slide gets its label, slide AUROC and FROC are
  computed, and the summary lists no label gap; with a test slide left out of reference.csv
  the summary names it.
- MVTec AD: three categories in one folder, 224 px images and 64 px tiles: one model per
  category, per-category metrics and their mean (printout, MLflow, compare), every pixel scored.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from vadflow.tasks.records import NightlySummary

pytestmark = [pytest.mark.slow, pytest.mark.flow]


def _nightly(site: Path, state_dir: Path, tracking: str, **options) -> NightlySummary:
    from vadflow.flows.nightly import nightly

    return nightly(
        str(site),
        output_root=str(state_dir / "outputs"),
        tracking_uri=tracking,
        flags={"epochs": 1},
        families=["ae_l2"],
        **options,
    )


@pytest.fixture(scope="module")
def camelyon16(prefect_harness, state_dir: Path) -> Path:
    from vadflow.tasks.synth.pathology import make_pathology_site
    from vadflow.tasks.synth.releases import as_camelyon16_release

    site = make_pathology_site(
        state_dir / "data",
        "c16-source",
        n_train_normal=3,
        n_test_normal=2,
        n_test_tumor=2,
        width=2048,
        height=1536,
        seed=3,
    )
    release = as_camelyon16_release(site, state_dir / "data" / "CAMELYON16", zipped=True)
    text = (release / "site.yaml").read_text().replace("name: c16-source", "name: c16")
    (release / "site.yaml").write_text(text)
    return release


@pytest.fixture(scope="module")
def camelyon16_run(camelyon16: Path, state_dir: Path) -> NightlySummary:
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'release-c16.db'}"
    return _nightly(camelyon16, state_dir, tracking)


def test_camelyon16_release_every_slide_labelled(camelyon16: Path, camelyon16_run) -> None:
    assert (camelyon16 / "testing" / "lesion_annotations.zip").is_file()
    assert not (camelyon16 / "testing" / "lesion_annotations").exists()
    slides = pl.read_parquet(Path(camelyon16_run.outputs) / "slides.parquet")
    reference = {
        row.split(",")[0].lower(): row.split(",")[1]
        for row in (camelyon16 / "testing" / "reference.csv").read_text().split()
    }
    assert len(reference) == 4
    for row in slides.iter_rows(named=True):
        sid = row["slide_id"]
        assert row["status"] == "ok", (sid, row["reason"])
        if sid.startswith("normal_"):
            assert (row["label"], row["split"] in ("train", "val")) == ("normal", True)
        elif sid.startswith("test_"):
            expected = "anomalous" if reference[sid] == "Tumor" else "normal"
            assert (row["label"], row["split"]) == (expected, "test")
            # tumour test slides are annotated from inside the zip, read in place
            annotated = row["annotation_uri"] is not None
            assert annotated == (expected == "anomalous")
            if annotated:
                assert "lesion_annotations.zip!/" in row["annotation_uri"]
        else:
            pytest.fail(f"unexpected slide {sid}")
    assert slides.filter(pl.col("slide_id").str.starts_with("test_")).height == 4


def test_camelyon16_release_metrics_and_no_gap(camelyon16_run) -> None:
    metrics = camelyon16_run.families["ae_l2"].metrics
    assert math.isfinite(metrics["slide_auroc"])
    assert math.isfinite(metrics["froc"])
    assert metrics["n_test_slides"] == 4 and metrics["n_test_anomalous"] == 2
    assert not camelyon16_run.gaps and camelyon16_run.gaps.lines() == []
    # Most of the tissue is scored; tiles under the minimum tissue fraction (slivers at the
    # tissue's edge) are not tiled, and the share says so (0.95 on this site).
    assert 0.9 < metrics["scored_share"] < 1.0


def test_candidates_are_capped_and_froc_no_worse(camelyon16_run) -> None:
    """The site's candidate rule (one per 100 um, at most 100 per slide) against the rule
    before it (every local maximum, 2 heatmap cells apart) on the same heatmaps."""
    from vadflow.tasks.evaluation.evaluate import CandidateRule, evaluate_site

    out = Path(camelyon16_run.outputs)
    slides = pl.read_parquet(out / "slides.parquet")
    heatmaps = sorted((out / "heatmaps").glob(f"ae_l2-{camelyon16_run.version}/*.heatmap.tif"))
    from vadflow.tasks.scoring.heatmap import load_heatmap

    scores = {}
    for path in heatmaps:
        heatmap = load_heatmap(path)
        scores[path.name.removesuffix(".heatmap.tif")] = (float(np.nanmax(heatmap)), str(path))
    mpp = float(slides["mpp"][0])
    common = dict(heatmap_downsample=16, target_fpr=0.05, domain="pathology", itc_um=10)
    before = evaluate_site(
        slides, scores, **common, candidate_rule=CandidateRule(2 * mpp * 16, None)
    )
    after = evaluate_site(slides, scores, **common, candidate_rule=CandidateRule())
    assert after.metrics["froc"] >= before.metrics["froc"] - 1e-9
    assert after.metrics["froc"] == camelyon16_run.families["ae_l2"].metrics["froc"]
    assert all(len(c) <= 100 for c in after.candidates.values())
    assert sum(map(len, after.candidates.values())) <= sum(map(len, before.candidates.values()))


def test_camelyon16_test_slide_missing_from_reference_is_named(
    camelyon16: Path, state_dir: Path
) -> None:
    site = state_dir / "data" / "CAMELYON16-gap"
    shutil.copytree(camelyon16, site)
    reference = site / "testing" / "reference.csv"
    rows = reference.read_text().splitlines()
    dropped = next(r for r in rows if ",Normal," in r)
    reference.write_text("".join(f"{r}\n" for r in rows if r != dropped))
    (site / "site.yaml").write_text((site / "site.yaml").read_text().replace("c16", "c16-gap"))
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'release-c16-gap.db'}"
    summary = _nightly(site, state_dir, tracking, export=False)
    missing = dropped.split(",")[0].lower()
    assert summary.gaps.unlabelled_test == (missing,)
    assert summary.gaps.lines("slides") == [
        f"1 test slides without a label (no metric counts them): {missing}"
    ]
    from vadflow.tasks.tracking.nightly import summary_markdown

    assert f"1 test slides without a label (no metric counts them): {missing}" in (
        summary_markdown(summary)
    )
    assert summary.families["ae_l2"].metrics["n_test_slides"] == 4  # scored, not counted
    # --no-export: no overlay drawn, the run's scored.json saved for `vadflow export`
    assert not summary.exported
    assert not list((Path(summary.outputs) / "exports").rglob("*.png"))
    assert list((Path(summary.outputs) / "heatmaps").glob("ae_l2-*/scored.json"))


CATEGORIES = {"fabric": ("fabric", 0), "wood": ("wood", 1), "carpet": ("fabric", 2)}


@pytest.fixture(scope="module")
def mvtec_run(prefect_harness, state_dir: Path) -> dict:
    from vadflow.tasks.synth.industrial import make_industrial_site

    root = state_dir / "data" / "mvtec3"
    root.mkdir(parents=True)
    for category, (kind, seed) in CATEGORIES.items():
        made = make_industrial_site(
            state_dir / "data" / "mvtec-parts",
            f"part-{category}",
            category=kind,
            n_train=8,
            n_test_good=3,
            n_test_per_defect=2,
            defects=("stain",),
            image_size=224,
            seed=seed,
        )
        shutil.copytree(made / kind, root / category)
    (root / "site.yaml").write_text(
        "name: mvtec3\ndomain: industrial\n"
        "tiling: {tile_size: 64, target_mpp: null, heatmap_downsample: 1}\n"
    )
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'release-mvtec.db'}"
    summary = _nightly(root, state_dir, tracking)
    return {"summary": summary, "tracking": tracking, "root": root}


def test_mvtec_one_model_per_category(mvtec_run) -> None:
    summary = mvtec_run["summary"]
    result = summary.families["ae_l2"]
    assert sorted(result.categories) == sorted(CATEGORIES)
    model_dirs = {c.model_dir for c in result.categories.values()}
    assert len(model_dirs) == 3
    for name, category in result.categories.items():
        assert Path(category.model_dir).name == name
        assert (Path(category.model_dir) / "config.json").is_file()
        # trained on its own category's good images only: 8 of them, 2 held out for calibration
        fit = (Path(category.model_dir) / "fit_report.json").read_text()
        assert fit
        assert math.isfinite(category.metrics["slide_auroc"])
        assert math.isfinite(category.metrics["pixel_auroc"])
        assert math.isfinite(category.metrics["pro"])
        assert category.metrics["n_test_slides"] == 5
        assert Path(category.report).is_file()
    for key in ("slide_auroc", "pixel_auroc", "pro"):
        mean = np.mean([c.metrics[key] for c in result.categories.values()])
        assert result.metrics[key] == pytest.approx(mean)
    assert result.metrics["n_categories"] == 3 and result.metrics["n_test_slides"] == 15
    assert {row.slide_id.split("-")[0] for row in result.table} == set(CATEGORIES)


def test_mvtec_every_pixel_scored(mvtec_run) -> None:
    result = mvtec_run["summary"].families["ae_l2"]
    for category in result.categories.values():
        assert category.metrics["scored_share"] == 1.0
    assert result.metrics["scored_share"] == 1.0


def test_mvtec_categories_in_mlflow_and_compare(mvtec_run) -> None:
    from vadflow.tasks.tracking.compare import compare_runs

    client = MlflowClient(mvtec_run["tracking"], registry_uri=mvtec_run["tracking"])
    frame = compare_runs(client, "mvtec3")
    rows = {r["category"]: r for r in frame.iter_rows(named=True)}
    assert sorted(rows) == sorted([*CATEGORIES, "mean"])
    summary = mvtec_run["summary"]
    per = summary.families["ae_l2"].categories
    for name, category in per.items():
        assert rows[name]["slide_auroc"] == pytest.approx(category.metrics["slide_auroc"])
        run = client.get_run(category.mlflow_run_id)
        assert run.data.tags["category"] == name and run.info.run_name == f"ae_l2/{name}"
    assert rows["mean"]["pro"] == pytest.approx(summary.families["ae_l2"].metrics["pro"])
    versions = client.search_model_versions("name = 'mvtec3-ae_l2-wood'")
    assert len(versions) == 1
    parent = client.get_run(summary.parent_run_id).data.metrics
    assert parent["ae_l2.pro"] == pytest.approx(summary.families["ae_l2"].metrics["pro"])
    assert parent["ae_l2.wood.pro"] == pytest.approx(per["wood"].metrics["pro"])


def test_mvtec_printout_names_each_category(mvtec_run, state_dir: Path, capsys) -> None:
    from vadflow.flows.cli.results import print_summary
    from vadflow.flows.env import configure_state

    print_summary(mvtec_run["summary"], configure_state(state_dir / "home"), domain="industrial")
    out = capsys.readouterr().out
    assert "one model per category" in out and "mean over 3 categories" in out
    for name in CATEGORIES:
        assert name in out
    assert "scored share of pixels" in out and "1.0000" in out
