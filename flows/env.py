"""Where vadflow keeps its state, set before Prefect or MLflow are imported.

Everything lives under one project-local folder (default `./.vadflow`, or `$VADFLOW_HOME`):
Prefect's SQLite database (`prefect/`), the MLflow store (`mlflow/`) and the outputs
(`outputs/<site>/`). Nothing phones home.

With no `PREFECT_API_URL`, Prefect starts a local API in a subprocess on first use and waits
`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` for it (Prefect's own default, 20 s, is
missed on a busy machine); vadflow waits `EPHEMERAL_STARTUP_TIMEOUT_S` unless that variable
is set, in which case the user's value wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}

# Prefect 3's setting (prefect/settings/models/server/ephemeral.py, startup_timeout_seconds).
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# The local API took 25-60 s to answer with four test runs sharing two cores; 20 s failed at
# random. Prefect counts only its own sleeps against this, so the wall time can be longer.
EPHEMERAL_STARTUP_TIMEOUT_S = 180
# What Prefect raises when its local API does not answer in time (prefect/server/api/server.py).
_TIMED_OUT = "attempting to connect to ephemeral Prefect API server"


@dataclass(frozen=True)
class StatePaths:
    home: Path

    @property
    def prefect(self) -> Path:
        return self.home / "prefect"

    @property
    def mlflow(self) -> Path:
        return self.home / "mlflow"

    @property
    def outputs(self) -> Path:
        return self.home / "outputs"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or (
            f"sqlite:///{(self.mlflow / 'mlflow.db').resolve()}"
        )

    @property
    def prefect_api_url(self) -> str | None:
        """The Prefect server in use (`$PREFECT_API_URL`), or None for the local API."""
        return os.environ.get("PREFECT_API_URL") or None


def quiet_environment() -> None:
    """Telemetry off and a patient local-API start; the user's own environment wins."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault(STARTUP_TIMEOUT_SETTING, str(EPHEMERAL_STARTUP_TIMEOUT_S))


def configure_state(home: str | Path | None = None) -> StatePaths:
    """Point Prefect at a local home and quiet telemetry; call before importing prefect."""
    root = Path(home or os.environ.get("VADFLOW_HOME") or ".vadflow").resolve()
    paths = StatePaths(root)
    for folder in (paths.prefect, paths.mlflow, paths.outputs):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ["VADFLOW_HOME"] = str(root)
    os.environ.setdefault("PREFECT_HOME", str(paths.prefect))
    quiet_environment()
    return paths


def api_start_failure(exc: BaseException) -> str | None:
    """One line saying what to do when `exc` (or its cause) is Prefect's local API failing to
    start in time; None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _TIMED_OUT in str(current):
            waited = os.environ.get(STARTUP_TIMEOUT_SETTING, "20")
            return (
                f"Prefect's local API did not start within {waited} s "
                f"({STARTUP_TIMEOUT_SETTING}): set it higher, e.g. "
                f"`export {STARTUP_TIMEOUT_SETTING}=600`, or run `prefect server start` "
                "in another shell and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
            )
        current = current.__cause__ or current.__context__
    return None
