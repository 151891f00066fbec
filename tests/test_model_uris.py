"""Every documented `--model` form resolves (issue #23.4), against the site's embedded store
(what `--home` tracks into) and against a real `mlflow server` on 127.0.0.1.

mlflow's own `download_artifacts("models:/...")` asks the *global* registry; the embedded case
points `$MLFLOW_TRACKING_URI` at an empty decoy store to prove the site's store is asked.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from vadflow.tasks.tracking.registry import (
    CHAMPION,
    promote,
    register_model,
    registered_model_name,
)
from vadflow.tasks.tracking.resolve import PARTIAL, remove_partial_downloads, resolve_model

pytest_plugins = ["tests.mlflow_server"]

FAMILY = "ae_l2"


@dataclass(frozen=True)
class Logged:
    tracking_uri: str
    site: str
    run_id: str
    version: str
    model_id: str

    @property
    def name(self) -> str:
        return registered_model_name(self.site, FAMILY)


def _log_and_promote(tracking_uri: str, tiny_detector, artifact_root: Path | None) -> Logged:
    """A run with the tiny detector as its model, registered as <site>-ae_l2 v1, champion."""
    from vadflow.tasks.tracking.mlflow_runs import experiment_id_by_name, start_run
    from vadflow.tasks.tracking.pyfunc import log_detector_model

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    site = f"uri-{uuid.uuid4().hex[:6]}"
    experiment = experiment_id_by_name(client, f"vadflow/{site}", artifact_root)
    run_id = start_run(client, experiment, FAMILY, {"site": site, "family": FAMILY})
    example = np.load(tiny_detector.directory / "example_tiles.npy")
    model_uri = log_detector_model(client, run_id, tiny_detector.directory, example)
    client.log_metric(run_id, "slide_auroc", 0.9)
    version = register_model(client, run_id, site, FAMILY)
    name = registered_model_name(site, FAMILY)
    decision = promote(
        client, name, version, metric="slide_auroc", contracts_passed=True, diverged=False
    )
    assert decision.promoted, decision.reason
    return Logged(tracking_uri, site, run_id, version, model_uri.removeprefix("models:/"))


def _forms(logged: Logged) -> dict[str, str]:
    return {
        "version": f"models:/{logged.name}/{logged.version}",
        "alias": f"models:/{logged.name}@{CHAMPION}",
        "model_id": f"models:/{logged.model_id}",
        "run": f"runs:/{logged.run_id}/model",
        "champion": "champion",
    }


def _assert_is_the_detector(folder: str, tiny_detector) -> None:
    from vadflow.tasks.detectors.registry import load_detector

    path = Path(folder)
    assert json.loads((path / "config.json").read_text()) == json.loads(
        (tiny_detector.directory / "config.json").read_text()
    )
    tiles = tiny_detector.tiles[:4]
    np.testing.assert_allclose(
        load_detector(path).score(tiles).tile_score.numpy(),
        tiny_detector.scores(tiles),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, tiny_detector) -> Logged:
    """The store `--home` tracks into: `<home>/mlflow/mlflow.db`, artifacts beside it."""
    from vadflow.tasks.tracking.mlflow_runs import default_artifact_root, local_tracking_uri

    home = tmp_path_factory.mktemp("home")
    uri = local_tracking_uri(home / "mlflow")
    return _log_and_promote(uri, tiny_detector, default_artifact_root(uri, home))


@pytest.fixture
def decoy_global_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """mlflow's global tracking/registry URI at an empty store: resolving must not ask it."""
    decoy = f"sqlite:///{tmp_path / 'decoy.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", decoy)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", decoy)
    return decoy


@pytest.mark.parametrize("form", ["version", "alias", "model_id", "run", "champion"])
def test_every_model_form_resolves_in_the_sites_embedded_store(
    form: str, embedded: Logged, tiny_detector, decoy_global_store: str, tmp_path: Path
) -> None:
    uri = _forms(embedded)[form]
    folder = resolve_model(uri, embedded.site, FAMILY, embedded.tracking_uri, str(tmp_path))
    assert Path(folder).is_relative_to(tmp_path / "model-cache")
    _assert_is_the_detector(folder, tiny_detector)
    assert not list((tmp_path / "model-cache").glob(f"*{PARTIAL}*"))  # renamed when complete


@pytest.mark.slow
@pytest.mark.parametrize("form", ["version", "alias", "model_id", "run", "champion"])
def test_every_model_form_resolves_on_a_tracking_server(
    form: str, mlflow_server, tiny_detector, tmp_path: Path
) -> None:
    logged = _server_model(mlflow_server, tiny_detector)
    uri = _forms(logged)[form]
    folder = resolve_model(uri, logged.site, FAMILY, logged.tracking_uri, str(tmp_path))
    _assert_is_the_detector(folder, tiny_detector)


_SERVER_MODEL: dict[str, Logged] = {}


def _server_model(mlflow_server, tiny_detector) -> Logged:
    """One logged and promoted model on the session's server, shared by the parametrized test."""
    if mlflow_server.uri not in _SERVER_MODEL:
        _SERVER_MODEL[mlflow_server.uri] = _log_and_promote(mlflow_server.uri, tiny_detector, None)
    return _SERVER_MODEL[mlflow_server.uri]


def test_folders_resolve_as_they_are(embedded: Logged, tiny_detector, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_detector.directory), "s", FAMILY, "unused", str(tmp_path)) == (
        str(tiny_detector.directory)
    )
    # A downloaded MLflow model folder (MLmodel at its top) resolves to the detector inside.
    downloaded = resolve_model(
        _forms(embedded)["version"], embedded.site, FAMILY, embedded.tracking_uri, str(tmp_path)
    )
    mlflow_model = next(p for p in Path(downloaded).parents if (p / "MLmodel").is_file())
    again = resolve_model(str(mlflow_model), "s", FAMILY, "unused", str(tmp_path / "other"))
    assert again == downloaded
    with pytest.raises(ValueError, match="neither a saved detector"):
        resolve_model(str(tmp_path), "s", FAMILY, "unused", str(tmp_path))


def test_what_does_not_resolve_says_what_is_missing(embedded: Logged, tmp_path: Path) -> None:
    uri, site = embedded.tracking_uri, embedded.site
    with pytest.raises(LookupError, match="has no champion"):
        resolve_model("champion@nowhere", site, FAMILY, uri, str(tmp_path))
    with pytest.raises(LookupError, match="no alias 'staging'"):
        resolve_model(f"models:/{embedded.name}@staging", site, FAMILY, uri, str(tmp_path))
    with pytest.raises(LookupError, match="is not in"):
        resolve_model(f"models:/{embedded.name}/99", site, FAMILY, uri, str(tmp_path))
    with pytest.raises(LookupError, match="logged no model named 'other'"):
        resolve_model(f"runs:/{embedded.run_id}/other", site, FAMILY, uri, str(tmp_path))
    with pytest.raises(ValueError, match="neither a folder nor an MLflow model URI"):
        resolve_model("s3://bucket/model", site, FAMILY, uri, str(tmp_path))


def test_a_missing_champion_names_the_sites_own_champions(embedded: Logged, tmp_path) -> None:
    """Asked for another family's champion, the error lists the ones the site has; a site whose
    name merely starts with this one's (`<site>-b`) is not counted as this site's."""
    from vadflow.tasks.tracking.resolve import champions_of

    client = MlflowClient(embedded.tracking_uri, registry_uri=embedded.tracking_uri)
    version = register_model(client, embedded.run_id, f"{embedded.site}-b", FAMILY)
    other = registered_model_name(f"{embedded.site}-b", FAMILY)
    client.set_registered_model_alias(other, CHAMPION, str(version))
    assert champions_of(embedded.site, embedded.tracking_uri) == [embedded.name]
    with pytest.raises(LookupError) as missing:
        resolve_model("champion", embedded.site, "padim", embedded.tracking_uri, str(tmp_path))
    assert f"{embedded.site}'s champions: {embedded.name} (" in str(missing.value)
    assert "give --family" in str(missing.value)


def test_a_dead_process_partial_download_is_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f"m{PARTIAL}{dead}"
    ours = tmp_path / f"m{PARTIAL}{os.getpid()}"
    for folder in (stale, ours):
        (folder / "x").mkdir(parents=True)
    assert remove_partial_downloads(tmp_path) == [stale]
    assert not stale.exists() and ours.exists()
