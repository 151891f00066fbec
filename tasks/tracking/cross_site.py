"""Cross-site evaluation in MLflow: a champion's metrics at home beside another site's.

`vadflow evaluate SITE_B --model champion@A` scores B with A's champion. Its home metrics are
what A's training run logged when that version was evaluated at A; this module reads them, puts
B's metrics beside them and logs a run of kind `cross-site` in B's experiment with B's metrics
under their own names, A's as `home/<metric>` and the difference as `drop/<metric>` (home - away),
so the dashboard answers "does A's model transfer to B?". `vadflow compare` lists only family
runs, so these runs do not mix with B's own nightly models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from vadflow.tasks.evaluation.cross_site import MetricDrop, metric_drops
from vadflow.tasks.tracking.mlflow_runs import TAG_RUN_KIND, experiment_name, run_tags
from vadflow.tasks.tracking.registry import champion_version, registered_model_name
from vadflow.tasks.tracking.spool import TrackingSession

CROSS_SITE_KIND = "cross-site"
TAG_HOME_SITE = "vadflow.home_site"
TAG_HOME_RUN = "vadflow.home_run"
TAG_MODEL_VERSION = "vadflow.model_version"


@dataclass(frozen=True)
class HomeRun:
    """The champion of (site, family) and the metrics its training run logged at home."""

    site: str
    family: str
    version: str
    run_id: str
    metrics: dict[str, float]


def champion_home_run(client: MlflowClient, site: str, family: str) -> HomeRun:
    """Read the champion version of `<site>-<family>` and its source run's metrics."""
    version = champion_version(client, site, family)
    name = registered_model_name(site, family)
    if version is None:
        raise LookupError(
            f"{name} has no champion at {client.tracking_uri}: run the nightly flow on site "
            f"{site} first"
        )
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        raise LookupError(f"{name} version {version} names no training run; its home is unknown")
    metrics = dict(client.get_run(run_id).data.metrics)
    return HomeRun(site, family, version, run_id, metrics)


@dataclass(frozen=True)
class CrossSiteReport:
    home: HomeRun
    away_site: str
    drops: list[MetricDrop] = field(default_factory=list)
    run: str | None = None  # the cross-site MLflow run (a local-... reference when spooled)
    spooled: bool = False


def report_cross_site(
    tracking_uri: str,
    spool_dir: str,
    *,
    away_site: str,
    home_site: str,
    family: str,
    away_metrics: Mapping[str, Any],
    model: str,
) -> CrossSiteReport:
    """Home metrics of the champion, the drop of each away metric, logged as a cross-site run.

    Reading the home run needs the tracking server; logging falls back to the spool (replayed
    by `vadflow tracking sync`) like every other vadflow run.
    """
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    home = champion_home_run(client, home_site, family)
    drops = metric_drops(home.metrics, away_metrics)
    tags = run_tags(
        away_site,
        family=family,
        extra={
            TAG_RUN_KIND: CROSS_SITE_KIND,
            TAG_HOME_SITE: home_site,
            TAG_HOME_RUN: home.run_id,
            TAG_MODEL_VERSION: home.version,
        },
    )
    with TrackingSession(tracking_uri, spool_dir) as session:
        run = session.start_run(
            experiment_name(away_site), f"{CROSS_SITE_KIND} {home_site}-{family}", tags
        )
        session.log_params(
            run,
            {"model": model, "home_site": home_site, "family": family, "version": home.version},
        )
        values: dict[str, float] = {}
        for row in drops:
            values[row.metric] = row.away
            if row.home is not None:
                values[f"home/{row.metric}"] = row.home
            if row.drop is not None:
                values[f"drop/{row.metric}"] = row.drop
        session.log_metrics(run, values)
        session.end_run(run)
        spooled = session.spooled > 0
    return CrossSiteReport(home, away_site, drops, run, spooled)
