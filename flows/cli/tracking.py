"""`vadflow compare SITE` and `vadflow tracking status|sync`: the MLflow side of the command line.

`compare` prints each family's slide AUC, FROC, pixel AUROC and PRO (or the metrics asked for)
across the site's nightly runs, with the model version and which one is champion, and logs the
table and a plot under `comparison/` of the newest nightly parent run. `tracking sync` replays
what was spooled while the tracking server was down; exit code 1 while anything is left in the
spool.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vadflow.flows.cli.options import HomeOption, TrackingOption, console
from vadflow.flows.cli.startup import fail

tracking_app = typer.Typer(
    help="MLflow tracking: replay logging spooled while the tracking server was down.",
    no_args_is_help=True,
)
SpoolOption = Annotated[
    Path | None, typer.Option("--spool", help="spool folder (default <home>/mlflow/spool)")
]


def compare_command(
    site: Annotated[str, typer.Argument(help="site name (or site folder) to compare runs of")],
    log: Annotated[
        bool, typer.Option("--log/--no-log", help="log table and plot to the parent run")
    ] = True,
    parent_run: Annotated[
        str | None,
        typer.Option("--parent-run", help="run to log to (default: the newest nightly run)"),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help="MLflow metric key to print (repeat for more; default: slide AUC, FROC, "
            "pixel AUROC, PRO); e.g. slide_f1_max, slide_sensitivity, slide_auroc_forest",
        ),
    ] = None,
    home: HomeOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Compare detector families across a site's nightly runs (metrics, versions, champion).

    Prints one row per family and night (on a site trained per category, one per category
    and their mean); the logged CSV and plot carry every compared metric.
    """
    from vadflow.flows.env import configure_state

    name = _site_name(site)
    state = configure_state(home)
    from mlflow.tracking import MlflowClient

    from vadflow.tasks.tracking.compare import (
        COMPARE_METRICS,
        HEADLINE_METRICS,
        METRIC_LABELS,
        compare_runs,
        latest_parent_run,
    )
    from vadflow.tasks.tracking.compare import log_comparison as log_to_run
    from vadflow.tasks.tracking.mlflow_runs import resolve_tracking_uri

    asked = metric or list(HEADLINE_METRICS)
    compared = list(dict.fromkeys([*COMPARE_METRICS, *asked]))  # what the CSV and plot carry
    uri = resolve_tracking_uri(tracking_uri, state.home)
    client = MlflowClient(uri, registry_uri=uri)
    try:
        frame = compare_runs(client, name, compared)
    except LookupError as exc:
        raise fail(str(exc)) from None
    if frame.height == 0:
        raise fail(f"site {name} has no family runs yet at {uri}")
    shown = [m for m in asked if frame[m].drop_nulls().len() > 0]
    if metric and (missing := [m for m in asked if m not in shown]):
        console.print(
            f"[yellow]no run of {name} logged {', '.join(missing)}; left out of the table[/]",
            soft_wrap=True,
        )
    # Fits 80 columns with the headline metrics: numbers never wrap, headers may.
    table = Table(title=f"{name}: detector families by night (newest first)")
    table.add_column("nightly", no_wrap=True)
    table.add_column("family", no_wrap=True)
    by_category = frame["category"].drop_nulls().len() > 0  # one model per category and family
    if by_category:
        table.add_column("category", no_wrap=True)
    for key in shown:
        table.add_column(METRIC_LABELS.get(key, key), justify="right", min_width=6)
    table.add_column("model", no_wrap=True)
    for row in frame.iter_rows(named=True):
        alias = "champion" if row["champion"] else ("challenger" if row["challenger"] else "")
        model = f"v{row['version']} {alias}".strip() if row["version"] else "-"
        category = [row["category"] or "-"] if by_category else []
        table.add_row(
            row["nightly"], row["family"], *category, *(_fmt(row[m]) for m in shown), model
        )
    console.print(table)
    if not log:
        return
    parent = parent_run or latest_parent_run(client, name)
    if parent is None:
        console.print("[yellow]no nightly parent run to log the comparison to[/]")
        return
    out_dir = state.outputs / name / "reports" / "comparison"
    paths = log_to_run(client, parent, frame, out_dir, name, compared)
    console.print(
        f"logged {', '.join(p.name for p in paths)} to run {parent} (artifacts: comparison/); "
        f"copies in {out_dir}",
        soft_wrap=True,
    )


@tracking_app.command("status")
def tracking_status_command(home: HomeOption = None, spool: SpoolOption = None) -> None:
    """Say how much logging is waiting in the spool for `vadflow tracking sync`."""
    from vadflow.flows.env import configure_state

    state = configure_state(home)
    from vadflow.tasks.tracking.mlflow_runs import default_spool_dir
    from vadflow.tasks.tracking.spool import pending_operations

    folder = spool or default_spool_dir(state.home)
    waiting = pending_operations(folder)
    if waiting:
        console.print(
            f"{waiting} operation(s) waiting in {folder}: run `vadflow tracking sync`",
            soft_wrap=True,
        )
    else:
        console.print(f"nothing waiting in {folder}", soft_wrap=True)


@tracking_app.command("sync")
def tracking_sync_command(
    home: HomeOption = None, tracking_uri: TrackingOption = None, spool: SpoolOption = None
) -> None:
    """Replay logging spooled while the tracking server was unreachable; safe to rerun."""
    from vadflow.flows.env import configure_state

    state = configure_state(home)
    from vadflow.tasks.tracking.mlflow_runs import default_spool_dir, resolve_tracking_uri
    from vadflow.tasks.tracking.spool import sync as replay

    uri = resolve_tracking_uri(tracking_uri, state.home)
    folder = spool or default_spool_dir(state.home)
    try:
        report = replay(folder, uri)
    except RuntimeError as exc:  # another sync holds the lock
        raise fail(str(exc), code=1) from None
    console.print(
        f"replayed {report.applied} operation(s) from {folder} to {uri}; "
        f"{report.skipped} already sent; {report.remaining} left",
        soft_wrap=True,
    )
    for local, server in report.runs.items():
        console.print(f"  run {local} is now {server}")
    for name in report.archived:
        console.print(f"  done: {name} (kept under {folder / 'synced'})")
    for error in report.errors:
        console.print(error, style="red", soft_wrap=True, markup=False)
    if not report.ok:
        raise typer.Exit(1)


def _site_name(site: str) -> str:
    """A site name as given, or the name in a site folder's configuration."""
    if Path(site).is_dir():
        from vadflow.flows.cli.startup import checked_site

        return checked_site(Path(site)).name
    return site


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"
