"""`vadflow sites check`, `vadflow deploy` and `vadflow batch`: operating sites with Prefect.

`sites check` only reads site files: it needs no state and writes nothing. `deploy` and `batch`
talk to the Prefect API in `$PREFECT_API_URL`; only without one do they use (and create) the
local state folder, and they validate the site files before that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vadflow.flows.cli.options import FamilyOption, HomeOption, SitesOption, console
from vadflow.flows.cli.startup import fail, prefect_api

if TYPE_CHECKING:
    from vadflow.deployments.sites import SiteFile

sites_app = typer.Typer(
    help="Site files: deployments/sites/<site>.yaml, one per hospital or line.",
    no_args_is_help=True,
)


@sites_app.command("check")
def sites_check_command(sites: SitesOption = None) -> None:
    """Validate every site file; exit 1 naming each bad file and field."""
    good = _site_files(sites, exit_code=1)
    for site in good:
        console.print(
            f"[green]ok[/]    {site.name}: {site.domain}, {', '.join(site.families)}, "
            f"'{site.schedule.cron}' {site.schedule.timezone}, pool {site.work_pool.name}",
            soft_wrap=True,
        )


def deploy_command(
    sites: SitesOption = None,
    only: Annotated[list[str] | None, typer.Option("--site", help="deploy only these")] = None,
    write_prefect_yaml: Annotated[
        bool,
        typer.Option(
            help="also write prefect.yaml (for `prefect deploy --all`) from the site files"
        ),
    ] = False,
    home: HomeOption = None,
) -> None:
    """Register one Prefect deployment per site and job kind against the configured API."""
    good = _site_files(sites, exit_code=1)
    if only and (unknown := sorted(set(only) - {site.name for site in good})):
        raise fail(
            f"no site file for --site {', '.join(unknown)}; known: "
            f"{', '.join(site.name for site in good)}"
        )
    if write_prefect_yaml:
        from vadflow.deployments.deploy import REPO_ROOT
        from vadflow.deployments.prefect_yaml import write_prefect_yaml as write_yaml

        console.print(f"wrote {write_yaml(good, REPO_ROOT / 'prefect.yaml')}", soft_wrap=True)
    _prefect_state(home)
    from vadflow.deployments.deploy import deploy_site

    with prefect_api():
        for site in good:
            if only and site.name not in only:
                continue
            for deployed in deploy_site(site):
                console.print(
                    f"deployed {deployed.name} ({deployed.job}) id {deployed.deployment_id}"
                )


def batch_command(
    site: Annotated[str, typer.Option("--site", help="site name (deployments/sites/<site>.yaml)")],
    pool: Annotated[str, typer.Option("--pool", help="work pool to run on, e.g. a GPU pool")],
    model: Annotated[
        str, typer.Option(help="'champion', an MLflow model URI or a folder")
    ] = "champion",
    family: FamilyOption = None,
    sites: SitesOption = None,
    home: HomeOption = None,
) -> None:
    """Submit a one-off batch scoring run of a site on a work pool (e.g. cloud GPUs)."""
    from vadflow.deployments.sites import SITES_DIR, PoolSpec, SiteFileError, load_site_file

    path = (sites or SITES_DIR) / f"{site}.yaml"
    if not path.is_file():
        raise fail(f"no site file {path}: give --site the name of a file in {path.parent}")
    try:
        site_file = load_site_file(path)
    except SiteFileError as exc:
        raise fail(str(exc), code=1) from None
    _prefect_state(home)
    from prefect.deployments import run_deployment

    from vadflow.deployments.deploy import deploy_site

    one_off = site_file.model_copy(
        update={"jobs": ["batch-score"], "work_pool": PoolSpec(name=pool)}
    )
    with prefect_api():
        deployed = deploy_site(one_off, name=f"{site}-on-{pool}")[0]
        run = run_deployment(
            deployed.name,
            parameters={
                "site": site_file.site_config().model_dump(mode="json"),
                "model": model,
                "family": family.value if family else None,
            },
            timeout=0,
        )
    console.print(f"submitted flow run {run.name} ({run.id}) of {deployed.name} on pool {pool}")


def _site_files(folder: Path | None, *, exit_code: int) -> list[SiteFile]:
    """The valid site files in `folder`; every invalid one printed, then exit `exit_code`."""
    from vadflow.deployments.sites import SITES_DIR, check_site_files

    good, errors = check_site_files(folder or SITES_DIR)
    for error in errors:
        console.print(f"[red]error[/] {error}", soft_wrap=True, highlight=False)
    if errors:
        raise typer.Exit(exit_code)
    return good


def _prefect_state(home: Path | None) -> None:
    """The configured Prefect API when there is one; else the local state folder, said so."""
    from vadflow.flows.env import configure_state, quiet_environment

    quiet_environment()
    if os.environ.get("PREFECT_API_URL"):
        return
    state = configure_state(home)
    console.print(
        f"[yellow]PREFECT_API_URL is not set[/]: deploying into the local state folder "
        f"{state.prefect}; runs need a server and a worker (`prefect server start`, "
        "`prefect worker start --pool vadflow-process`) pointed at the same place",
        soft_wrap=True,
    )
