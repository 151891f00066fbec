"""Where vadflow keeps its state, set before Prefect or MLflow are imported.

Everything lives under one project-local folder (default `./.vadflow`, or `$VADFLOW_HOME`):
Prefect's SQLite database (`prefect/`), the MLflow store (`mlflow/`) and the outputs
(`outputs/<site>/`). Nothing phones home.
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


def configure_state(home: str | Path | None = None) -> StatePaths:
    """Point Prefect at a local home and quiet telemetry; call before importing prefect."""
    root = Path(home or os.environ.get("VADFLOW_HOME") or ".vadflow").resolve()
    paths = StatePaths(root)
    for folder in (paths.prefect, paths.mlflow, paths.outputs):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ["VADFLOW_HOME"] = str(root)
    os.environ.setdefault("PREFECT_HOME", str(paths.prefect))
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    return paths
