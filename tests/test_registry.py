"""The model registry: the champion gate on a local store, and a model round trip on a server."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from vadflow.tasks.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    EVAL_SET_TAG,
    champion_uri,
    champion_version,
    download_champion,
    evaluation_set_hash,
    promote,
    register_model,
    registered_model_name,
)

pytest_plugins = ["tests.mlflow_server"]

SET_A = "a" * 64
SET_B = "b" * 64


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """A local SQLite tracking + registry store (the embedded default)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


@pytest.fixture
def name(client: MlflowClient) -> str:
    """A fresh registered model per test."""
    model = f"site-{uuid.uuid4().hex[:8]}-ae_l2"
    client.create_registered_model(model)
    return model


def _version(client: MlflowClient, name: str, value: float | None) -> str:
    """A model version whose run logged slide_auroc = value (a stand-in for a real model)."""
    experiment = client.get_experiment_by_name("registry-test") or None
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("registry-test")
    )
    run = client.create_run(experiment_id)
    if value is not None:
        client.log_metric(run.info.run_id, "slide_auroc", value)
    created = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    return str(created.version)


def _gate(client, name, version, eval_set=SET_A, **overrides):
    settings = dict(
        metric="slide_auroc",
        margin=0.01,
        contracts_passed=True,
        diverged=False,
        eval_set_hash=eval_set,
    )
    return promote(client, name, version, **(settings | overrides))


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def test_first_healthy_version_becomes_champion(client, name) -> None:
    version = _version(client, name, 0.7)
    decision = _gate(client, name, version)
    assert decision.promoted, decision.reason
    assert decision.champion_version is None
    assert _alias(client, name, CHAMPION) == version
    assert _alias(client, name, CHALLENGER) == version
    tags = client.get_model_version(name, version).tags
    assert tags[EVAL_SET_TAG] == SET_A and DECISION_TAG in tags
    assert tags["promotion"].startswith("champion: no champion yet")


def test_better_challenger_is_promoted(client, name) -> None:
    first = _version(client, name, 0.70)
    _gate(client, name, first)
    second = _version(client, name, 0.80)
    decision = _gate(client, name, second)
    assert decision.promoted, decision.reason
    assert (decision.champion_version, decision.champion_value) == (first, 0.70)
    assert _alias(client, name, CHAMPION) == second


def test_worse_or_marginal_challenger_is_not_promoted(client, name) -> None:
    first = _version(client, name, 0.80)
    _gate(client, name, first)
    worse = _version(client, name, 0.75)
    decision = _gate(client, name, worse)
    assert not decision.promoted
    assert "does not beat" in decision.reason
    assert _alias(client, name, CHAMPION) == first
    assert _alias(client, name, CHALLENGER) == worse
    within_margin = _version(client, name, 0.805)  # better, but by less than the 0.01 margin
    assert not _gate(client, name, within_margin).promoted
    assert _alias(client, name, CHAMPION) == first


def test_diverged_or_failed_contracts_are_never_promoted(client, name) -> None:
    diverged_first = _version(client, name, 0.99)
    decision = _gate(client, name, diverged_first, diverged=True)
    assert not decision.promoted and "diverged" in decision.reason
    assert _alias(client, name, CHAMPION) is None  # not even with no champion to beat
    champion = _version(client, name, 0.6)
    assert _gate(client, name, champion).promoted
    much_better = _version(client, name, 0.99)
    assert not _gate(client, name, much_better, diverged=True).promoted
    contracts_failed = _version(client, name, 0.99)
    decision = _gate(client, name, contracts_failed, contracts_passed=False)
    assert not decision.promoted and "contracts" in decision.reason
    assert _alias(client, name, CHAMPION) == champion


def test_different_evaluation_sets_are_not_compared(client, name) -> None:
    first = _version(client, name, 0.6)
    _gate(client, name, first, eval_set=SET_A)
    other_set = _version(client, name, 0.95)
    decision = _gate(client, name, other_set, eval_set=SET_B)
    assert not decision.promoted
    assert "different evaluation set" in decision.reason
    assert _alias(client, name, CHAMPION) == first
    unknown_set = _version(client, name, 0.95)
    decision = _gate(client, name, unknown_set, eval_set=None)
    assert not decision.promoted and EVAL_SET_TAG in decision.reason


def test_lower_is_better_and_missing_metrics(client, name) -> None:
    first = _version(client, name, 0.30)
    _gate(client, name, first, higher_is_better=False)
    lower = _version(client, name, 0.20)
    assert _gate(client, name, lower, higher_is_better=False).promoted
    no_metric = _version(client, name, None)
    decision = _gate(client, name, no_metric, higher_is_better=False)
    assert not decision.promoted and "no finite" in decision.reason


def test_a_decision_is_made_once(client, name) -> None:
    first = _version(client, name, 0.7)
    _gate(client, name, first)
    second = _version(client, name, 0.9)
    decision = _gate(client, name, second)
    assert decision.promoted
    third = _version(client, name, 0.95)
    _gate(client, name, third)
    # Replaying the decision for `second` (e.g. from a spool) must not take the alias back.
    again = _gate(client, name, second)
    assert again == decision
    assert _alias(client, name, CHAMPION) == third


def test_evaluation_set_hash_tracks_slides_labels_and_settings(tmp_path: Path) -> None:
    annotation = tmp_path / "t1.xml"
    annotation.write_text("<ASAP_Annotations/>")
    slides = pl.DataFrame(
        {
            "slide_id": ["n1", "t1", "train1"],
            "sha256": ["1" * 64, "2" * 64, "3" * 64],
            "label": ["normal", "anomalous", "normal"],
            "split": ["test", "test", "train"],
            "annotation_uri": [None, str(annotation), None],
        }
    )
    base = evaluation_set_hash(slides, extra={"heatmap_downsample": 16})
    assert base == evaluation_set_hash(slides.reverse(), extra={"heatmap_downsample": 16})
    assert base == evaluation_set_hash(  # training slides do not matter
        slides.with_columns(
            sha256=pl.when(pl.col("split") == "train").then(pl.lit("x")).otherwise(pl.col("sha256"))
        ),
        extra={"heatmap_downsample": 16},
    )
    relabelled = slides.with_columns(label=pl.Series(["anomalous", "anomalous", "normal"]))
    assert evaluation_set_hash(relabelled, extra={"heatmap_downsample": 16}) != base
    assert evaluation_set_hash(slides, extra={"heatmap_downsample": 8}) != base
    annotation.write_text("<ASAP_Annotations><Annotation/></ASAP_Annotations>")
    assert evaluation_set_hash(slides, extra={"heatmap_downsample": 16}) != base


def test_register_needs_a_logged_model(client) -> None:
    experiment = client.create_experiment(f"no-model-{uuid.uuid4().hex[:6]}")
    run = client.create_run(experiment)
    with pytest.raises(LookupError, match="no logged model"):
        register_model(client, run.info.run_id, "site-x", "ae_l2")


@pytest.mark.slow
def test_registered_champion_round_trips_through_mlflow(mlflow_server, tiny_detector) -> None:
    """Logged, registered and promoted on a real server, the model loads through `models:/`
    and scores exactly as the detector object it came from."""
    from tests.mlflow_server import use_tracking_uri
    from vadflow.tasks.detectors.registry import load_detector
    from vadflow.tasks.tracking.mlflow_runs import experiment_id_by_name, start_run
    from vadflow.tasks.tracking.pyfunc import log_detector_model

    uri = mlflow_server.uri
    client = MlflowClient(uri, registry_uri=uri)
    site, family = f"rt-{uuid.uuid4().hex[:6]}", "ae_l2"
    experiment = experiment_id_by_name(client, f"vadflow/{site}")
    run_id = start_run(client, experiment, family, {"site": site, "family": family})
    example = np.load(tiny_detector.directory / "example_tiles.npy")
    log_detector_model(client, run_id, tiny_detector.directory, example)
    client.log_metric(run_id, "slide_auroc", 0.9)
    version = register_model(client, run_id, site, family)
    name = registered_model_name(site, family)
    assert name == f"{site}-ae_l2" and version == "1"
    decision = promote(
        client,
        name,
        version,
        metric="slide_auroc",
        contracts_passed=True,
        diverged=False,
        eval_set_hash=SET_A,
    )
    assert decision.promoted
    assert champion_version(client, site, family) == version

    tiles = tiny_detector.tiles[:6]
    expected = tiny_detector.scores(tiles)
    with use_tracking_uri(uri):
        for model_uri in (f"models:/{name}/{version}", champion_uri(site, family)):
            loaded = mlflow.pyfunc.load_model(model_uri)
            np.testing.assert_allclose(loaded.predict(tiles), expected, rtol=1e-6, atol=1e-7)
    # Scoring code that needs anomaly maps loads the detector itself from the champion.
    folder = download_champion(uri, site, family, Path(mlflow_server.root / "download"))
    again = load_detector(folder).score(tiles)
    np.testing.assert_allclose(again.tile_score.numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        again.anomaly_map.numpy(),
        tiny_detector.detector.score(tiles).anomaly_map.numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
