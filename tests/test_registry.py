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
    # slide_auroc stands in for a lower-is-better metric here, so no floor on it.
    first = _version(client, name, 0.30)
    _gate(client, name, first, higher_is_better=False, floor={})
    lower = _version(client, name, 0.20)
    assert _gate(client, name, lower, higher_is_better=False, floor={}).promoted
    no_metric = _version(client, name, None)
    decision = _gate(client, name, no_metric, higher_is_better=False, floor={})
    assert not decision.promoted and "no finite" in decision.reason


def _unlabelled_version(
    client: MlflowClient, name: str, stats: dict[str, float], tags: dict[str, str] | None = None
) -> str:
    """A version whose run has no slide AUROC (no labels), only normal-validation statistics."""
    version = _version(client, name, None)
    run_id = client.get_model_version(name, version).run_id
    for key, value in stats.items():
        client.log_metric(run_id, key, value)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    return version


def test_a_first_model_below_the_floor_is_registered_but_not_champion(client, name) -> None:
    from vadflow.tasks.tracking.mlflow_runs import DEFAULT_FLOOR

    assert DEFAULT_FLOOR == {"slide_auroc": 0.6}
    zero = _version(client, name, 0.0)  # night one of issue #23: AUROC 0.0 became champion
    decision = _gate(client, name, zero)
    assert not decision.promoted
    assert "promotion floor" in decision.reason and "slide_auroc 0.0000 < 0.6" in decision.reason
    assert _alias(client, name, CHAMPION) is None
    assert _alias(client, name, CHALLENGER) == zero  # registered and visible, not served
    tags = client.get_model_version(name, zero).tags
    assert tags["promotion"].startswith("not promoted: below the promotion floor")
    # A site's own floor: 0.55 clears 0.5 but not the default 0.6.
    assert not _gate(client, name, _version(client, name, 0.55)).promoted
    decision = _gate(client, name, _version(client, name, 0.55), floor={"slide_auroc": 0.5})
    assert decision.promoted, decision.reason


def test_the_floor_holds_with_a_champion_to_beat(client, name) -> None:
    weak_champion = _version(client, name, 0.40)
    assert _gate(client, name, weak_champion, floor={}).promoted  # e.g. an older, floorless gate
    better_but_low = _version(client, name, 0.55)  # beats it by the margin, still below 0.6
    decision = _gate(client, name, better_but_low)
    assert not decision.promoted and "promotion floor" in decision.reason
    assert _alias(client, name, CHAMPION) == weak_champion
    assert _gate(client, name, _version(client, name, 0.65)).promoted


def test_without_labels_the_floor_is_the_normal_validation_statistics(client, name) -> None:
    from vadflow.tasks.tracking.mlflow_runs import NORMAL_MAX, NORMAL_MEDIAN, NORMAL_THRESHOLD

    healthy = {NORMAL_THRESHOLD: 0.8, NORMAL_MEDIAN: 0.2, NORMAL_MAX: 1.0}
    missing = _unlabelled_version(client, name, {})
    decision = _gate(client, name, missing)
    assert not decision.promoted and "no normal-validation statistics" in decision.reason
    collapsed = _unlabelled_version(
        client, name, {NORMAL_THRESHOLD: 0.5, NORMAL_MEDIAN: 0.5, NORMAL_MAX: 0.5}
    )
    decision = _gate(client, name, collapsed)
    assert not decision.promoted and "out of bounds" in decision.reason
    inverted = _unlabelled_version(client, name, healthy, tags={"inverted": "true"})
    decision = _gate(client, name, inverted)
    assert not decision.promoted and "inverted" in decision.reason
    assert _alias(client, name, CHAMPION) is None
    good = _unlabelled_version(client, name, healthy)
    decision = _gate(client, name, good)
    assert decision.promoted, decision.reason
    assert _alias(client, name, CHAMPION) == good


def test_an_inverted_run_is_never_promoted_even_with_labels(client, name) -> None:
    version = _version(client, name, 0.9)
    client.set_tag(client.get_model_version(name, version).run_id, "inverted", "true")
    decision = _gate(client, name, version)
    assert not decision.promoted and "inverted" in decision.reason


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
