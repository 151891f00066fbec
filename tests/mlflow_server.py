"""Real tracking servers for tests: `mlflow server` (SQLite backend) and moto's S3, on 127.0.0.1.

Test modules load these fixtures with `pytest_plugins = ["tests.mlflow_server"]`:

- `mlflow_server`: one server for the whole session (artifacts in a local folder);
- `moto_s3`: an S3 endpoint (moto's threaded server) with an empty bucket;
- `tiny_detector`: a fitted `ae_l2` detector saved to a folder, with the tiles it scores.

Tests that stop a server build their own `MlflowServer` so the shared one stays up. Servers run
with `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false` (the job runner costs ~2.6 GB) and one worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HOST = "127.0.0.1"
S3_BUCKET = "vadflow-test"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` as a subprocess in its own process group; stop and start it again on
    the same port and database to simulate an outage."""

    def __init__(
        self,
        root: Path,
        artifacts_destination: str | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "mlflow.db"
        self.artifacts_destination = artifacts_destination or str(self.root / "artifacts")
        self.env = dict(env or {})
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 180.0) -> MlflowServer:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
        }
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_DISABLE_TELEMETRY="true",
            **self.env,
        )
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db.resolve()}",
            "--artifacts-destination", self.artifacts_destination,
            "--host", HOST,
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self._log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{self._log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and its uvicorn worker (the process group this object started)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None
        deadline = time.monotonic() + 20
        while self._port_open() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _port_open(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((HOST, self.port)) == 0

    def _log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    bucket: str

    def env(self) -> dict[str, str]:
        """What a process needs to use this endpoint: MLflow's S3 endpoint and fake creds."""
        return {"MLFLOW_S3_ENDPOINT_URL": self.url, **FAKE_AWS}

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, **_boto_creds())
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": FAKE_AWS["AWS_DEFAULT_REGION"],
    }


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's global tracking URI (for `mlflow.pyfunc.load_model("models:/...")`), unset after."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI, which it had set


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Endpoint]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    try:
        endpoint = S3Endpoint(f"http://{HOST}:{port}", S3_BUCKET)
        boto3.client("s3", endpoint_url=endpoint.url, **_boto_creds()).create_bucket(
            Bucket=S3_BUCKET
        )
        yield endpoint
    finally:
        server.stop()


@dataclass(frozen=True)
class TinyDetector:
    detector: object
    directory: Path
    tiles: np.ndarray  # (N, 32, 32, 3) uint8

    def scores(self, tiles: np.ndarray | None = None) -> np.ndarray:
        batch = self.tiles if tiles is None else tiles
        return self.detector.score(batch).tile_score.numpy()


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory: pytest.TempPathFactory) -> TinyDetector:
    """An `ae_l2` detector fitted for one epoch on random 32 px tiles, saved to a folder."""
    from vadflow.tasks.detectors.registry import create_detector

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    detector = create_detector("ae_l2", tile_size=32, epochs=1, base_channels=8)
    detector.fit(tiles[:16], tiles[16:])
    directory = detector.save(tmp_path_factory.mktemp("tiny-detector") / "ae_l2")
    np.save(directory / "example_tiles.npy", tiles[:2])
    return TinyDetector(detector, directory, tiles)
