"""`vadflow run SITE` and `vadflow demo`: the nightly flow on one site, and on a synthetic one.

Both check their input first (family names while parsing, the site folder with `load_site`),
then start Prefect; the demo makes its site with the synth library, never through the synth
commands. While the flow runs, one progress line per stage is shown and Prefect's log goes to
a file named at the end (`flows/cli/progress.py`), or to the terminal with `--verbose`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vadflow.flows.cli.options import (
    Domain,
    FamiliesOption,
    HomeOption,
    SiteDirArgument,
    VerboseOption,
    console,
    family_values,
)
from vadflow.flows.cli.progress import flow_output
from vadflow.flows.cli.results import print_summary
from vadflow.flows.cli.startup import checked_site, prefect_api

DEMO_EPOCHS = 8  # the demo site's loss flattens by then; `vadflow run` uses each family's default


def run_command(
    site_dir: SiteDirArgument,
    family: FamiliesOption = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="training epochs of every family (default: each its own)"),
    ] = None,
    home: HomeOption = None,
    export: Annotated[
        bool,
        typer.Option(
            "--export/--no-export",
            help="draw overlays and lesion files after scoring (--no-export: `vadflow export` "
            "draws them later)",
        ),
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="redo everything: rehash and re-register every slide, recheck the manifests, "
            "retrain every family and rescore every slide (default: only what changed)",
        ),
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Run the nightly flow on one site and print its results."""
    run_nightly(
        site_dir,
        family_values(family),
        epochs,
        home,
        export=export,
        force=force,
        verbose=verbose,
    )


def demo_command(
    domain: Annotated[Domain, typer.Option(help="which kind of synthetic site")] = "pathology",
    seed: Annotated[int, typer.Option(help="seed of the synthetic site")] = 0,
    home: HomeOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Make a small synthetic site, run the nightly flow on it, print the results."""
    from vadflow.flows.env import configure_state

    state = configure_state(home)
    data = state.home / "data"
    name = f"demo-{domain}"
    site_dir = data / name
    if not (site_dir / "site.yaml").exists():
        console.print(f"making the synthetic {domain} site {site_dir}", soft_wrap=True)
        if domain == "pathology":
            from vadflow.tasks.synth.pathology import make_pathology_site

            make_pathology_site(data, name, seed=seed)
        else:
            from vadflow.tasks.synth.industrial import make_industrial_site

            make_industrial_site(data, name, seed=seed)
    started = time.monotonic()
    run_nightly(site_dir, None, DEMO_EPOCHS, home, verbose=verbose)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s")


def run_nightly(
    site_dir: Path,
    families: list[str] | None,
    epochs: int | None,
    home: Path | None,
    *,
    export: bool = True,
    force: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Check the site, run the nightly flow on it with a progress line per stage, print the
    summary and where Prefect's log went; returns the summary."""
    site = checked_site(site_dir)  # before Prefect starts: a bad site costs milliseconds
    from vadflow.flows.env import configure_state

    state = configure_state(home)
    console.print(
        f"running the nightly flow on [bold]{site.name}[/] ({site.domain})", soft_wrap=True
    )
    from vadflow.flows.nightly import nightly

    # Command-line flags reach every family that has the field (tasks/detectors/settings.py).
    flags = {"flags": {"epochs": epochs}} if epochs else {}
    # The log stays in its file until the process ends: Prefect logs its local API's
    # shutdown at exit, after the summary.
    with flow_output(state.home, verbose=verbose, until_exit=True) as output:
        try:
            with prefect_api():
                summary = nightly(
                    str(site_dir),
                    output_root=str(state.outputs),
                    tracking_uri=state.tracking_uri,
                    families=families,
                    export=export,
                    force=force,
                    **flags,
                )
        except BaseException:
            if output.log_file is not None:  # the details are in the log
                console.print(f"the run failed; {output.where}", soft_wrap=True, highlight=False)
            raise
    print_summary(summary, state, domain=site.domain, froc_itc_um=site.froc_itc_um)
    if output.log_file is not None:
        console.print(
            f"Prefect's log:           {output.log_file}", soft_wrap=True, highlight=False
        )
    return summary
