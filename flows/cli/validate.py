"""`vadflow validate SITE`: run every data contract on a site's existing outputs.

Read-only on the outputs: nothing is quarantined or rewritten; the report goes to
`<home>/outputs/<site>/reports/contracts/validate-<time>/`. Exit code 1 when a contract fails,
2 when there is nothing to validate.
"""

from __future__ import annotations

import typer
from rich.table import Table

from vadflow.flows.cli.options import HomeOption, SiteDirArgument, console
from vadflow.flows.cli.startup import checked_site, fail
from vadflow.flows.env import configure_state


def validate_command(site_dir: SiteDirArgument, home: HomeOption = None) -> None:
    """Run every data contract on a site's existing outputs and say what broke."""
    site = checked_site(site_dir)
    state = configure_state(home)
    from vadflow.tasks.site import SiteLayout
    from vadflow.tasks.validation import validate_outputs

    root = SiteLayout(state.outputs, site.name).root
    console.print(f"validating the outputs of [bold]{site.name}[/] under {root}", soft_wrap=True)
    try:
        outcome = validate_outputs(root, site)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None

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
