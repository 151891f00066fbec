"""Publishing a contracts report where people look: its Markdown as a Prefect artifact, its
folder as MLflow artifacts. Plain functions: Prefect's ``create_markdown_artifact`` comes in as
a callback, so this module runs (and is tested) without a flow."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vadflow.tasks.validation.report import report_markdown

# (markdown=..., key=..., description=...): prefect.artifacts.create_markdown_artifact fits.
MarkdownArtifact = Callable[..., Any]


def publish_markdown(
    report_dir: str | Path,
    markdown_artifact: MarkdownArtifact,
    key: str = "data-contracts",
) -> str:
    """Hand the report's Markdown to ``markdown_artifact`` (Prefect's
    ``create_markdown_artifact``, callable only inside a flow or task). Returns the Markdown."""
    markdown = report_markdown(report_dir)
    key = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-") or "data-contracts"
    markdown_artifact(
        markdown=markdown, key=key, description=f"data contracts, {Path(report_dir).name}"
    )
    return markdown


def log_report_to_mlflow(
    report_dir: str | Path,
    run_id: str,
    tracking_uri: str | None = None,
    artifact_path: str = "data_contracts",
) -> None:
    """Log the report folder as artifacts of an MLflow run (under ``artifact_path``)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).log_artifacts(run_id, str(report_dir), artifact_path)


def publish_report(
    report_dir: str | Path,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    markdown_artifact: MarkdownArtifact | None = None,
    key: str = "data-contracts",
    artifact_path: str = "data_contracts",
) -> str:
    """Both of the above, each when asked for: MLflow artifacts given ``run_id``, a markdown
    artifact given ``markdown_artifact``. Returns the report's Markdown."""
    if run_id is not None:
        log_report_to_mlflow(report_dir, run_id, tracking_uri, artifact_path)
    if markdown_artifact is not None:
        return publish_markdown(report_dir, markdown_artifact, key)
    return report_markdown(report_dir)
