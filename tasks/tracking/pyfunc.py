"""The MLflow pyfunc wrapper around a detector's own `load` / `score`, and how it is logged.

The model folder holds the detector's saved folder (`config.json` + `weights.pt`) as a pyfunc
artifact; loading it calls `load_detector`, which reads the weights with `weights_only=True`, so
nothing is unpickled: the model's code is `detector_model.py` ("models from code"), which
builds this wrapper from the installed package.

Logging goes through `MlflowClient` calls (create a logged model, upload its folder, link it to
the run), not through mlflow's global tracking URI and active run, so it is thread-safe and the
same code replays a spooled model after an outage.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model
from mlflow.tracking import MlflowClient

MODEL_NAME = "model"  # the run's model: `runs:/<run_id>/model`
OP_KEY_TAG = "vadflow.op_key"  # idempotency key of the logging call that made it
MODEL_CODE = Path(__file__).with_name("detector_model.py")  # stored with each model


class DetectorModel(mlflow.pyfunc.PythonModel):
    """Input: uint8 tiles (B, H, W, 3). Output: one anomaly score per tile (B,).

    `model_input` is hinted `np.ndarray`, a hint MLflow accepts without trying to infer a schema
    from it (the input example gives the signature).
    """

    def load_context(self, context) -> None:
        from vadflow.tasks.detectors.registry import load_detector

        self.detector = load_detector(Path(context.artifacts["detector"]))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        tiles = np.asarray(model_input, dtype=np.uint8)  # (B, H, W, 3)
        return self.detector.score(tiles).tile_score.numpy()  # (B,)


def save_detector_model(
    path: Path, detector_dir: Path, example: np.ndarray | None, mlflow_model: Model | None = None
) -> Path:
    """Write an MLflow model folder for the saved detector at `detector_dir`."""
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(MODEL_CODE),
        artifacts={"detector": str(detector_dir)},
        input_example=example,
        pip_requirements=["vadflow"],
        mlflow_model=mlflow_model,
    )
    return path


def log_detector_model(
    client: MlflowClient,
    run_id: str,
    detector_dir: Path,
    example: np.ndarray | None,
    *,
    name: str = MODEL_NAME,
    op_key: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log the detector as the run's pyfunc model; returns its `models:/<model_id>` URI.

    With `op_key`, a model this call already logged for the run is reused, not logged twice
    (a replay after an outage may repeat a call whose answer was lost).
    """
    run = client.get_run(run_id)
    experiment = run.info.experiment_id
    if op_key:
        for found in find_logged_models(client, run_id, name, experiment):
            if found.tags.get(OP_KEY_TAG) == op_key:
                if found.status == LoggedModelStatus.READY:
                    return f"models:/{found.model_id}"
                return _upload(client, found, run_id, detector_dir, example)
    all_tags = {**(tags or {}), **({OP_KEY_TAG: op_key} if op_key else {})}
    logged = client.create_logged_model(
        experiment,
        name=name,
        source_run_id=run_id,
        tags=all_tags or None,
        params=dict(run.data.params) or None,
        model_type="vadflow-detector",
    )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return _upload(client, logged, run_id, detector_dir, example)


def find_logged_models(
    client: MlflowClient, run_id: str, name: str = MODEL_NAME, experiment: str | None = None
) -> list:
    """The logged models named `name` that `run_id` produced, newest first."""
    experiment = experiment or client.get_run(run_id).info.experiment_id
    found, token = [], None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment], filter_string=f"name = '{name}'", page_token=token
        )
        found.extend(m for m in page if m.source_run_id == run_id)
        token = page.token
        if not token:
            break
    return sorted(found, key=lambda m: m.creation_timestamp, reverse=True)


def _upload(client: MlflowClient, logged, run_id: str, detector_dir: Path, example) -> str:
    meta = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        run_id=run_id,
        model_id=logged.model_id,
    )
    with tempfile.TemporaryDirectory(prefix="vadflow-model-") as tmp:
        local = save_detector_model(Path(tmp) / "model", Path(detector_dir), example, meta)
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"
