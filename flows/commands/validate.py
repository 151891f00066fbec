"""`vadflow validate SITE`: run every data contract on a site's existing outputs.

Read-only on the outputs: nothing is quarantined or rewritten; the report goes to
`<home>/outputs/<site>/reports/contracts/validate-<time>/`. Exit code 1 when a contract fails,
2 when there is nothing to validate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vadflow.flows.env import configure_state

console = Console()


def validate(
    site_dir: Annotated[
        Path, typer.Argument(help="site folder (with site.yaml, or a known layout)")
    ],
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="state folder for Prefect, MLflow and outputs (default ./.vadflow or "
            "$VADFLOW_HOME)",
        ),
    ] = None,
) -> None:
    """Run every data contract on a site's existing outputs and say what broke."""
    state = configure_state(home)
    from vadflow.tasks.site import SiteLayout, load_site
    from vadflow.tasks.validation import validate_outputs

    try:
        site = load_site(site_dir)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]cannot read site {site_dir}:[/] {exc}")
        raise typer.Exit(2) from exc
    root = SiteLayout(state.outputs, site.name).root
    console.print(f"validating the outputs of [bold]{site.name}[/] under {root}")
    try:
        outcome = validate_outputs(root, site)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc

    table = Table(title=f"data contracts: {site.name}")
    for column in ("check", "rows", "expectations", "failed", "outcome"):
        table.add_column(column, justify="right" if column in ("rows", "expectations") else "left")
    for stage in outcome.stages:
        result = stage.result
        status = "[green]passed[/]" if result.success else "[red]FAILED[/]"
        table.add_row(
            stage.label, str(result.rows), str(result.evaluated), str(len(result.failures)), status
        )
    console.print(table)
    for stage in outcome.stages:
        if not stage.result.success:
            console.print(stage.result.message(), markup=False, highlight=False)
    for stage in outcome.stages:
        for note in stage.result.notes:
            console.print(f"[yellow]note[/] {stage.label}: {note}")
    for note in outcome.skipped:
        console.print(f"[yellow]not checked[/] {note}")
    console.print(f"report: {outcome.report_dir / 'index.html'}", soft_wrap=True)
    if not outcome.passed:
        raise typer.Exit(1)
