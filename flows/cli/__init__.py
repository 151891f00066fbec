"""The `vadflow` command line: `app` is the console script (pyproject.toml).

One module per command group, each command a thin wrapper over a library function:

- `synth`: `vadflow synth pathology|industrial`
- `run`: `vadflow run`, `vadflow demo`
- `scoring`: `vadflow score`, `vadflow evaluate`, `vadflow export`
- `tracking`: `vadflow compare`, `vadflow tracking status|sync`
- `validate`: `vadflow validate`
- `deploy`: `vadflow sites check`, `vadflow deploy`, `vadflow batch`
- `benchmark`: `vadflow benchmark-detectors`

`results` prints what the flows return; `options` holds the shared options and choices;
`startup` checks input and starts Prefect. A command never calls another command: each calls
the library (tests/test_cli.py checks it). Importing this package imports no torch, MLflow or
Prefect, so `-h`, `--version` and a wrong argument answer in a fraction of a second.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_exceptions
from typer.core import TyperGroup

import vadflow
from vadflow.flows.cli.benchmark import benchmark_detectors_command
from vadflow.flows.cli.deploy import batch_command, deploy_command, sites_app
from vadflow.flows.cli.run import demo_command, run_command
from vadflow.flows.cli.scoring import evaluate_command, export_command, score_command
from vadflow.flows.cli.synth import synth_app
from vadflow.flows.cli.tracking import compare_command, tracking_app
from vadflow.flows.cli.validate import validate_command

CONTEXT = {"help_option_names": ["-h", "--help"]}


class OneLineErrors(TyperGroup):
    """The root group: a usage error (unknown option, bad choice, missing folder) is one line
    on stderr and exit 2, instead of a usage block and a boxed message."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click_exceptions.NoArgsIsHelpError as exc:  # `vadflow synth`: its help
            if not standalone_mode:
                raise
            exc.show()
            sys.exit(0)
        except click_exceptions.ClickException as exc:
            if not standalone_mode:
                raise
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "vadflow"
            message = exc.format_message().replace("Value error, ", "")
            hint = f" (see `{where} -h`)" if isinstance(exc, click_exceptions.UsageError) else ""
            typer.echo(f"{where}: error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return result
        # Without standalone mode a command's Exit comes back as its code, success as None.
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Unsupervised anomaly detection on whole slides and inspection images.\n\n"
    "Start with `vadflow demo`: it makes a small synthetic site, runs the nightly flow "
    "(tile, train, score, evaluate, log to MLflow) and prints what it found.",
    no_args_is_help=True,
    add_completion=False,
    context_settings=CONTEXT,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vadflow {vadflow.__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Unsupervised anomaly detection on whole slides and inspection images."""


app.add_typer(synth_app, name="synth")
app.command("run")(run_command)
app.command("demo")(demo_command)
app.command("evaluate")(evaluate_command)
app.command("score")(score_command)
app.command("export")(export_command)
app.command("validate")(validate_command)
app.command("compare")(compare_command)
app.add_typer(tracking_app, name="tracking")
app.add_typer(sites_app, name="sites")
app.command("deploy")(deploy_command)
app.command("batch")(batch_command)
app.command("benchmark-detectors")(benchmark_detectors_command)

__all__ = ["app"]
