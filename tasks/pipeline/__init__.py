"""One thin Prefect task per stage: each calls its stage and returns the stage's record.

- ingest: `discover_task`, `register_task`, `tile_site_task` (tasks/slides/, tasks/tiling/)
- validate: `validate_manifests_task`, `validate_scores_task`, `validate_metrics_task`
  (tasks/validation)
- train: `train_task` (tasks/training/train.py)
- score: `score_task`, `score_site_task` (on the site's Dask cluster) (tasks/scoring/run.py)
- evaluate: `evaluate_task` (tasks/evaluation/scored_run.py)
- export: `export_task` (tasks/exports/publish.py)
- track: `start_tracking_task`, `open_family_run_task`, `end_family_run_task`, `track_task`,
  `finish_tracking_task` (tasks/tracking/nightly.py),
  `resolve_model_task` (tasks/tracking/resolve.py)

Tasks take and return paths and the records of `tasks/records.py`, never arrays; call
`task.fn(...)` to run one without Prefect. Each imports its stage in its body, so importing a
flow loads no torch, MLflow or great-expectations, and reports how far it got through
`vadflow.tasks.progress` (what `vadflow run` draws).
"""

from vadflow.tasks.pipeline.evaluate import evaluate_task
from vadflow.tasks.pipeline.export import export_task
from vadflow.tasks.pipeline.ingest import discover_task, register_task, tile_site_task
from vadflow.tasks.pipeline.score import score_site_task, score_task
from vadflow.tasks.pipeline.track import (
    end_family_run_task,
    finish_tracking_task,
    open_family_run_task,
    resolve_model_task,
    start_tracking_task,
    track_task,
)
from vadflow.tasks.pipeline.train import train_task
from vadflow.tasks.pipeline.validate import (
    validate_manifests_task,
    validate_metrics_task,
    validate_scores_task,
)

__all__ = [
    "discover_task",
    "end_family_run_task",
    "evaluate_task",
    "export_task",
    "finish_tracking_task",
    "open_family_run_task",
    "register_task",
    "resolve_model_task",
    "score_site_task",
    "score_task",
    "start_tracking_task",
    "tile_site_task",
    "track_task",
    "train_task",
    "validate_manifests_task",
    "validate_metrics_task",
    "validate_scores_task",
]
