"""The validate stage: data contracts at the pipeline's stage boundaries. The suites and the
great-expectations runner are in ``vadflow.data_contracts``; this package decides what a run
does with their results and keeps the record. One module per job:

- ``stage``: one check, strict (a failure stops the run) or quarantine (the failing slides are
  set aside and the rest go on): ``check_stage``, ``validate_stage``, ``StageValidation``;
- ``frames``: the frames the contracts read, built from the files the stages leave;
- ``boundaries``: the checks at each boundary of the nightly flow: ``check_manifests``,
  ``check_scores``, ``check_metrics``, ``BoundaryCheck``;
- ``quarantine``: the slides set aside, their files, the slide manifest's status;
- ``report``: the per-run report folder (index.html, summary.md from ``templates/``);
- ``publish``: the report as a Prefect markdown artifact and as MLflow artifacts;
- ``outputs``: every contract on a site's existing outputs (``vadflow validate``).
"""

from vadflow.tasks.validation.boundaries import (
    BoundaryCheck,
    check_manifests,
    check_metrics,
    check_scores,
    declared_score_range,
    family_of_run,
)
from vadflow.tasks.validation.frames import (
    TILE_SCORES_SCHEMA,
    read_frames,
    slide_scores_frame,
    tile_grids,
)
from vadflow.tasks.validation.outputs import OutputsValidation, validate_outputs
from vadflow.tasks.validation.publish import (
    MarkdownArtifact,
    log_report_to_mlflow,
    publish_markdown,
    publish_report,
)
from vadflow.tasks.validation.quarantine import (
    QuarantinedSlide,
    mark_quarantined,
    merge_quarantined,
    quarantine_slides,
)
from vadflow.tasks.validation.report import (
    load_report,
    report_folder,
    report_markdown,
    write_stage_report,
)
from vadflow.tasks.validation.stage import (
    MODES,
    STRICT_HINT,
    VALIDATORS,
    Mode,
    StageValidation,
    check_stage,
    validate_stage,
)

__all__ = [
    "MODES",
    "STRICT_HINT",
    "TILE_SCORES_SCHEMA",
    "VALIDATORS",
    "BoundaryCheck",
    "MarkdownArtifact",
    "Mode",
    "OutputsValidation",
    "QuarantinedSlide",
    "StageValidation",
    "check_manifests",
    "check_metrics",
    "check_scores",
    "check_stage",
    "declared_score_range",
    "family_of_run",
    "load_report",
    "log_report_to_mlflow",
    "mark_quarantined",
    "merge_quarantined",
    "publish_markdown",
    "publish_report",
    "quarantine_slides",
    "read_frames",
    "report_folder",
    "report_markdown",
    "slide_scores_frame",
    "tile_grids",
    "validate_outputs",
    "validate_stage",
    "write_stage_report",
]
