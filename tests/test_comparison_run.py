"""The comparison run of issue 7: one unsupervised family and both labelled baselines, one table.

A small labelled synthetic site (tumour training slides with ASAP XML lesion outlines) goes
through the nightly flow with `families: [ae_l2, supervised_cnn, mil]`; then `vadflow compare`
reads the site's MLflow experiment, prints one table with slide AUC, FROC and pixel AUROC per
family, and logs it (CSV and plot) to the nightly parent run.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import Result
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

pytestmark = [pytest.mark.slow, pytest.mark.flow]

FAMILIES = ("ae_l2", "supervised_cnn", "mil")
HEADLINE = {"slide AUC": "slide_auroc", "FROC": "froc", "pixel AUROC": "pixel_auroc"}
# Small models, few epochs: the synthetic lesions are easy and the budget is a busy 2-core box.
OVERRIDES = {
    "ae_l2": {"base_channels": 16, "lr": 3e-3, "epochs": 8, "device": "cpu"},
    "supervised_cnn": {
        "base_channels": 8,
        "stages": 3,
        "batch_size": 32,
        "lr": 3e-3,
        "epochs": 3,
        "hard_negative_epochs": 1,
        "device": "cpu",
    },
    "mil": {"base_channels": 8, "stages": 3, "batch_size": 32, "epochs": 8, "device": "cpu"},
}


@pytest.fixture(scope="module")
def comparison_run(prefect_harness, state_dir: Path) -> dict:
    from vadflow.flows.nightly import nightly
    from vadflow.tasks.synth.pathology import make_pathology_site

    site = make_pathology_site(
        state_dir / "data",
        "cmp-path",
        n_train_normal=3,  # one is held out as `val` for the threshold
        n_train_tumor=3,
        n_test_normal=3,
        n_test_tumor=3,
        width=2048,
        height=1536,
        seed=12,
    )
    config = yaml.safe_load((site / "site.yaml").read_text())
    # Synthetic lesions are 20-80 um across; Camelyon16's ITC rule (275 um) would ignore them all.
    config.update(families=list(FAMILIES), detectors=OVERRIDES, froc_itc_um=10)
    (site / "site.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    home = state_dir / "home"
    tracking = f"sqlite:///{home / 'mlflow' / 'comparison-test.db'}"
    summary = nightly(str(site), output_root=str(state_dir / "outputs"), tracking_uri=tracking)
    return {"summary": summary, "site": site, "tracking": tracking, "home": home}


def vadflow(run: dict, *args: str) -> Result:
    """`vadflow <args>` through the real CLI app, 100 columns wide so no header wraps."""
    from vadflow.flows.cli import app

    home = ["--tracking-uri", run["tracking"], "--home", str(run["home"])]
    result = CliRunner().invoke(app, [*args, *home], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return result


def printed_table(output: str) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the one Rich table in `output`."""
    header_lines = [line for line in output.splitlines() if line.startswith("┃")]
    assert len(header_lines) == 1, output  # one table, headers on one line
    headers = [cell.strip() for cell in header_lines[0].split("┃")[1:-1]]
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in output.splitlines()
        if line.startswith("│")
    ]
    return headers, rows


def test_all_three_families_train_and_log_to_one_experiment(comparison_run) -> None:
    summary = comparison_run["summary"]
    assert list(summary.families) == list(FAMILIES) and not summary.skipped
    client = MlflowClient(comparison_run["tracking"])
    experiments = set()
    for family in FAMILIES:
        run = client.get_run(summary.families[family].mlflow_run_id)
        assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        assert run.data.tags["family"] == family
        experiments.add(run.info.experiment_id)
        for metric in HEADLINE.values():
            assert 0.0 <= run.data.metrics[metric] <= 1.0, (family, metric)
    assert len(experiments) == 1


def test_compare_prints_one_table_with_slide_auc_froc_pixel_auroc_per_family(
    comparison_run,
) -> None:
    summary = comparison_run["summary"]
    result = vadflow(comparison_run, "compare", str(comparison_run["site"]))
    headers, rows = printed_table(result.output)
    assert headers == ["nightly", "family", *HEADLINE, "model"]  # no PRO: pathology logs none
    assert sorted(row[1] for row in rows) == sorted(FAMILIES)
    assert {row[0] for row in rows} == {summary.version}  # one night
    for row in rows:
        logged = summary.families[row[1]].metrics
        for header, metric in HEADLINE.items():
            value = float(row[headers.index(header)])
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(logged[metric], abs=5e-5), (row[1], metric)
    by_family = {row[1]: row for row in rows}
    # What tile labels buy: the supervised classifier ranks every tumour slide first.
    assert float(by_family["supervised_cnn"][headers.index("slide AUC")]) >= 0.9

    # The same table, every compared metric, logged to the nightly parent run.
    client = MlflowClient(comparison_run["tracking"])
    local = client.download_artifacts(
        summary.parent_run_id, "comparison/compare.csv", str(comparison_run["home"] / "cmp")
    )
    logged = pl.read_csv(local)
    assert sorted(logged["family"].to_list()) == sorted(FAMILIES)
    for metric in HEADLINE.values():
        assert logged[metric].null_count() == 0
        assert logged[metric].is_between(0.0, 1.0).all()
    assert "comparison/compare.png" in {
        a.path for a in client.list_artifacts(summary.parent_run_id, "comparison")
    }


def test_compare_prints_the_metrics_asked_for(comparison_run) -> None:
    result = vadflow(
        comparison_run,
        "compare",
        "cmp-path",
        "--no-log",
        "-m",
        "slide_f1_max",
        "-m",
        "slide_auroc_forest",
        "-m",
        "no_such_metric",
    )
    headers, rows = printed_table(result.output)
    assert headers == ["nightly", "family", "F1-max", "slide_auroc_forest", "model"]
    assert len(rows) == len(FAMILIES)
    assert "no run of cmp-path logged no_such_metric" in result.output
