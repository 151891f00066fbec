"""The `vadflow` command line: make synthetic sites, run the nightly flow, run the demo."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vadflow.flows.commands.score import export as export_command
from vadflow.flows.commands.score import score as score_command
from vadflow.flows.commands.tracking import compare as compare_command
from vadflow.flows.commands.tracking import tracking_app
from vadflow.flows.commands.validate import validate as validate_command
from vadflow.flows.env import StatePaths, configure_state

app = typer.Typer(
    help="Unsupervised anomaly detection on whole slides and inspection images.\n\n"
    "Start with `vadflow demo`: it makes a small synthetic site, runs the nightly flow "
    "(tile, train, score, evaluate, log to MLflow) and prints what it found.",
    no_args_is_help=True,
    add_completion=False,
)
synth_app = typer.Typer(help="Generate synthetic sites in real formats (deterministic by seed).")
app.add_typer(synth_app, name="synth")

console = Console()
DEMO_EPOCHS = 8  # the demo site's loss flattens by then; `vadflow run` uses each family's default

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="state folder for Prefect, MLflow and outputs (default ./.vadflow or $VADFLOW_HOME)",
    ),
]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _check_synth_mode(mode: str) -> None:
    from vadflow.tasks.synth.pathology import MODES

    if mode not in MODES:
        console.print(f"[red]unknown --mode {mode!r}[/]: choose one of {', '.join(MODES)}")
        raise typer.Exit(2)


@synth_app.command("pathology")
def synth_pathology(
    out: Annotated[Path, typer.Argument(help="folder to create the site in")],
    name: str = typer.Option("site-a", help="site name (folder name under OUT)"),
    train_normal: int = typer.Option(4, help="normal training slides"),
    test_normal: int = typer.Option(3, help="normal test slides"),
    test_tumor: int = typer.Option(3, help="tumour test slides (ASAP XML + mask)"),
    train_tumor: int = typer.Option(
        0, help="tumour training slides (ASAP XML): labels for supervised_cnn and mil"
    ),
    width: int = typer.Option(4096, help="level-0 width in px"),
    height: int = typer.Option(3072, help="level-0 height in px"),
    mpp: float = typer.Option(0.25, help="level-0 microns per pixel (Camelyon16: ~0.243)"),
    seed: int = typer.Option(0),
    mode: str = typer.Option(
        "easy", help="easy: lesions/defects change colour; hard: they keep it (see README)"
    ),
) -> None:
    """Pyramidal JPEG TIFF slides with tissue, planted lesions and ASAP XML annotations."""
    from vadflow.tasks.synth.pathology import make_pathology_site

    _check_synth_mode(mode)
    total = train_normal + test_normal + test_tumor + train_tumor
    with _progress() as bar:
        job = bar.add_task(f"slides for {name}", total=total)
        site = make_pathology_site(
            out,
            name,
            n_train_normal=train_normal,
            n_test_normal=test_normal,
            n_test_tumor=test_tumor,
            n_train_tumor=train_tumor,
            width=width,
            height=height,
            mpp=mpp,
            seed=seed,
            mode=mode,
            progress=lambda done, _total: bar.update(job, completed=done),
        )
    console.print(f"pathology site written to [bold]{site}[/]")


@synth_app.command("industrial")
def synth_industrial(
    out: Annotated[Path, typer.Argument(help="folder to create the site in")],
    name: str = typer.Option("line-a", help="site name (folder name under OUT)"),
    category: str = typer.Option("fabric", help="MVTec-style category folder"),
    train: int = typer.Option(40, help="good training images"),
    test_good: int = typer.Option(10, help="good test images"),
    per_defect: int = typer.Option(6, help="test images per defect type"),
    image_size: int = typer.Option(128),
    seed: int = typer.Option(0),
    mode: str = typer.Option(
        "easy", help="easy: lesions/defects change colour; hard: they keep it (see README)"
    ),
) -> None:
    """MVTec AD-layout folders: train/good, test/<defect>, ground_truth masks."""
    from vadflow.tasks.synth.industrial import make_industrial_site

    _check_synth_mode(mode)
    with _progress() as bar:
        job = bar.add_task(f"images for {name}", total=None)
        site = make_industrial_site(
            out,
            name,
            category=category,
            n_train=train,
            n_test_good=test_good,
            n_test_per_defect=per_defect,
            image_size=image_size,
            seed=seed,
            mode=mode,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    console.print(f"industrial site written to [bold]{site}[/]")


@app.command()
def run(
    site_dir: Annotated[
        Path, typer.Argument(help="site folder (with site.yaml, or a known layout)")
    ],
    family: Annotated[
        list[str] | None, typer.Option("--family", "-f", help="detector family; repeat for more")
    ] = None,
    epochs: int | None = typer.Option(None, help="override the families' training epochs"),
    home: HomeOption = None,
) -> None:
    """Run the nightly flow on one site and print its results."""
    state = configure_state(home)
    summary = _run_flow(state, site_dir, family, epochs)
    print_summary(summary, state)


@app.command()
def demo(
    domain: str = typer.Option("pathology", help="pathology or industrial"),
    seed: int = typer.Option(0),
    home: HomeOption = None,
) -> None:
    """Make a small synthetic site, run the nightly flow on it, print the results."""
    state = configure_state(home)
    data = state.home / "data"
    if domain == "pathology":
        from vadflow.tasks.synth.pathology import make_pathology_site

        site_dir = data / "demo-pathology"
        if not (site_dir / "site.yaml").exists():
            make_pathology_site(data, "demo-pathology", seed=seed)
    elif domain == "industrial":
        from vadflow.tasks.synth.industrial import make_industrial_site

        site_dir = data / "demo-industrial"
        if not (site_dir / "site.yaml").exists():
            make_industrial_site(data, "demo-industrial", seed=seed)
    else:
        raise typer.BadParameter("domain must be 'pathology' or 'industrial'")
    started = time.monotonic()
    summary = _run_flow(state, site_dir, None, DEMO_EPOCHS)
    print_summary(summary, state)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s")


def _run_flow(
    state: StatePaths, site_dir: Path, families: list[str] | None, epochs: int | None
) -> dict[str, Any]:
    from vadflow.tasks.site import load_site

    site = load_site(site_dir)  # fail fast, before Prefect starts, on a bad site folder
    overrides = {f: {"epochs": epochs} for f in (families or site.families)} if epochs else None
    console.print(
        f"running the nightly flow on [bold]{site.name}[/] ({site.domain}); "
        "Prefect's local API takes ~25 s to start the first time"
    )
    from vadflow.flows.nightly import nightly

    with console.status("nightly flow running (progress is logged below)"):
        return nightly(
            str(site_dir),
            output_root=str(state.outputs),
            tracking_uri=state.tracking_uri,
            families=families,
            detector_overrides=overrides,
        )


def print_summary(summary: dict[str, Any], state: StatePaths) -> None:
    """Per-slide table and metrics for each family, then where everything is."""
    for family, result in summary["families"].items():
        table = Table(title=f"{summary['site']} / {family}: test slides")
        for column in ("slide", "label", "score", "predicted"):
            table.add_column(column, justify="right" if column == "score" else "left")
        for row in result["table"]:
            predicted = row["predicted"]
            shown = "-" if predicted is None else ("anomalous" if predicted else "normal")
            table.add_row(row["slide_id"], row["label"], f"{row['score']:.5f}", shown)
        console.print(table)
        metrics = result["metrics"]
        for key in (
            "slide_auroc",
            "pixel_auroc",
            "froc",
            "slide_sensitivity",
            "slide_specificity",
            "threshold",
        ):
            value = metrics.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                console.print(f"  {key:<18} {value:.4f}")
        if result.get("diverged"):
            console.print(f"  [red]training diverged[/]: {family} is never promoted")
        if result.get("promotion"):
            console.print(f"  champion gate: {result['promotion'].get('reason', '')}")
        if result.get("spooled"):
            console.print(
                "  [yellow]MLflow unreachable[/]: logged to the spool; "
                "replay with `vadflow tracking sync`"
            )
        if result.get("report"):
            console.print(f"  report: {result['report']}", soft_wrap=True)
    for family, reason in summary.get("skipped", {}).items():
        console.print(f"[yellow]skipped[/] {family}: {reason}")
    for item in summary.get("quarantined", []):
        console.print(f"[yellow]quarantined[/] {item['slide_id']}: {item['reason']}")
    for slide_id in summary.get("no_tissue", []):
        console.print(f"[yellow]no tissue[/] {slide_id}")
    mlflow_db = state.mlflow / "mlflow.db"
    console.print(
        "\n".join(
            [
                "",
                f"outputs (manifests, masks, heatmaps, reports): {summary['outputs']}",
                f"heatmap overlays (PNG):  {summary['outputs']}/exports/<family>/",
                f"MLflow store:            {summary['tracking_uri']}",
                f"  open its UI:           mlflow ui --backend-store-uri sqlite:///{mlflow_db}",
                f"Prefect state:           {state.prefect}",
                f"  open its UI:           PREFECT_HOME={state.prefect} prefect server start",
            ]
        ),
        soft_wrap=True,
    )


@app.command()
def evaluate(
    site_dir: Annotated[Path, typer.Argument(help="the site to score (its folder)")],
    model: str = typer.Option(
        "champion",
        help="a model folder, an MLflow model URI, 'champion' or 'champion@<site>' "
        "(another site's champion: cross-site evaluation)",
    ),
    family: str | None = typer.Option(None, help="detector family (default: the site's first)"),
    home: HomeOption = None,
) -> None:
    """Score a site with an existing model, no training, and print its metrics.

    With `--model champion@<other site>` the champion's metrics at its home site are printed
    beside these, with the drop (home - away), and logged as a cross-site run in MLflow.
    """
    state = configure_state(home)
    from vadflow.flows.batch_score import batch_score

    result = batch_score(str(site_dir), model=model, family=family, output_root=str(state.outputs))
    home_site = model.partition("@")[2] if model.startswith("champion@") else ""
    if home_site and home_site != result["site"] and _print_cross_site(result, home_site, state):
        for item in result.get("quarantined", []):
            console.print(f"[yellow]quarantined[/] {item['slide_id']}: {item['reason']}")
        return
    table = Table(title=f"{result['site']} scored by {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        if isinstance(value, float) and not math.isnan(value):
            table.add_row(key, f"{value:.4f}")
    console.print(table)
    for item in result.get("quarantined", []):
        console.print(f"[yellow]quarantined[/] {item['slide_id']}: {item['reason']}")


def _print_cross_site(result: dict[str, Any], home_site: str, state: StatePaths) -> bool:
    """Home, away and drop per metric, logged to MLflow; False (with a warning) when the home
    run cannot be read, so the caller prints the away metrics alone."""
    import json

    from mlflow.exceptions import MlflowException

    from vadflow.tasks.tracking.cross_site import report_cross_site
    from vadflow.tasks.tracking.mlflow_runs import (
        default_spool_dir,
        experiment_name,
        resolve_tracking_uri,
    )

    away = result["site"]
    family = json.loads((Path(result["model_dir"]) / "config.json").read_text())["family"]
    try:
        report = report_cross_site(
            resolve_tracking_uri(None, state.home),
            str(default_spool_dir(state.home)),
            away_site=away,
            home_site=home_site,
            family=family,
            away_metrics=result["metrics"],
            model=result["model"],
        )
    except (LookupError, MlflowException, OSError) as exc:  # the scores stand regardless
        console.print(
            f"[yellow]cross-site: cannot read {home_site}'s home metrics ({exc}); "
            "showing this site's metrics alone[/]",
            soft_wrap=True,
        )
        return False
    table = Table(
        title=f"{away} scored by {home_site}'s champion ({family} v{report.home.version})",
        caption="drop = home - away (positive: worse away)",
    )
    table.add_column("metric", no_wrap=True)
    table.add_column(f"home ({home_site})", justify="right", no_wrap=True)
    table.add_column(f"away ({away})", justify="right", no_wrap=True)
    table.add_column("drop", justify="right", no_wrap=True)
    for row in report.drops:
        home_value = "-" if row.home is None else f"{row.home:.4f}"
        drop = "-" if row.drop is None else f"{row.drop:+.4f}"
        table.add_row(row.metric, home_value, f"{row.away:.4f}", drop)
    console.print(table)
    where = "spooled for `vadflow tracking sync`" if report.spooled else "logged"
    console.print(
        f"{where}: MLflow run {report.run} (kind cross-site) in experiment {experiment_name(away)}",
        soft_wrap=True,
    )
    return True


sites_app = typer.Typer(help="Site files: deployments/sites/<site>.yaml, one per hospital or line.")
app.add_typer(sites_app, name="sites")
SitesOption = Annotated[
    Path | None, typer.Option("--sites", help="folder of site files (default deployments/sites)")
]


@sites_app.command("check")
def sites_check(sites: SitesOption = None) -> None:
    """Validate every site file; exit 1 naming each bad file and field."""
    from vadflow.deployments.sites import SITES_DIR, check_site_files

    good, errors = check_site_files(sites or SITES_DIR)
    for site in good:
        console.print(
            f"[green]ok[/]    {site.name}: {site.domain}, {', '.join(site.families)}, "
            f"'{site.schedule.cron}' {site.schedule.timezone}, pool {site.work_pool.name}"
        )
    for error in errors:
        console.print(f"[red]error[/] {error}", soft_wrap=True)
    if errors:
        raise typer.Exit(1)


@app.command()
def deploy(
    sites: SitesOption = None,
    only: Annotated[list[str] | None, typer.Option("--site", help="deploy only these")] = None,
    write_prefect_yaml: bool = typer.Option(
        False, help="also write prefect.yaml (for `prefect deploy --all`) from the site files"
    ),
) -> None:
    """Register one Prefect deployment per site and job kind against the configured API."""
    import os

    configure_state(None)
    from vadflow.deployments.sites import SITES_DIR, check_site_files

    good, errors = check_site_files(sites or SITES_DIR)
    if errors:
        for error in errors:
            console.print(f"[red]error[/] {error}", soft_wrap=True)
        raise typer.Exit(1)
    if write_prefect_yaml:
        from vadflow.deployments.deploy import REPO_ROOT
        from vadflow.deployments.prefect_yaml import write_prefect_yaml

        console.print(f"wrote {write_prefect_yaml(good, REPO_ROOT / 'prefect.yaml')}")
    if not os.environ.get("PREFECT_API_URL"):
        console.print(
            "[yellow]PREFECT_API_URL is not set[/]: deploying into the local state folder; "
            "runs need a server and a worker (`prefect server start`, `prefect worker start "
            "--pool vadflow-process`) pointed at the same place"
        )
    from vadflow.deployments.deploy import deploy_site

    for site in good:
        if only and site.name not in only:
            continue
        for deployed in deploy_site(site):
            console.print(f"deployed {deployed.name} ({deployed.job}) id {deployed.deployment_id}")


@app.command()
def batch(
    site: str = typer.Option(..., "--site", help="site name (deployments/sites/<site>.yaml)"),
    pool: str = typer.Option(..., "--pool", help="work pool to run on, e.g. a GPU pool"),
    model: str = typer.Option("champion", help="'champion', an MLflow model URI or a folder"),
    family: str | None = typer.Option(None, help="detector family (default: the site's first)"),
    sites: SitesOption = None,
) -> None:
    """Submit a one-off batch scoring run of a site on a work pool (e.g. cloud GPUs)."""
    configure_state(None)
    from prefect.deployments import run_deployment

    from vadflow.deployments.deploy import deploy_site
    from vadflow.deployments.sites import SITES_DIR, PoolSpec, load_site_file

    site_file = load_site_file((sites or SITES_DIR) / f"{site}.yaml")
    one_off = site_file.model_copy(
        update={"jobs": ["batch-score"], "work_pool": PoolSpec(name=pool)}
    )
    deployed = deploy_site(one_off, name=f"{site}-on-{pool}")[0]
    run = run_deployment(
        deployed.name,
        parameters={
            "site": site_file.site_config().model_dump(mode="json"),
            "model": model,
            "family": family,
        },
        timeout=0,
    )
    console.print(f"submitted flow run {run.name} ({run.id}) of {deployed.name} on pool {pool}")


@app.command("benchmark-detectors")
def benchmark_detectors_command(
    family: Annotated[
        list[str] | None,
        typer.Option("--family", help="only these families (default: every registered one)"),
    ] = None,
    size: str = typer.Option("small", help="site size: tiny, small or medium"),
    epochs: int = typer.Option(3, help="training epochs, the same for every family"),
    own_budget: bool = typer.Option(
        False, help="train each family at its own default epochs instead of --epochs"
    ),
    seed: int = typer.Option(0, help="seed of the site and of every family"),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto"),
    score: str = typer.Option(
        "residual", help="families with a latent space: residual, latent or combined"
    ),
    markdown: Path | None = typer.Option(None, help="also write the table as Markdown here"),
) -> None:
    """Train every family on one hard synthetic site, same budget; print the honest table."""
    from vadflow.flows.commands.benchmark import benchmark_detectors, format_table

    try:
        budget = None if own_budget else epochs
        rows = benchmark_detectors(family, size, budget, seed, device=device, score=score)
    except (KeyError, ValueError) as exc:
        console.print(f"[red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(2) from exc
    if markdown is not None:
        markdown.write_text(format_table(rows) + "\n")
        console.print(f"wrote {markdown}")


app.command("validate")(validate_command)
app.command("score")(score_command)
app.command("export")(export_command)
app.command("compare")(compare_command)
app.add_typer(tracking_app, name="tracking")


if __name__ == "__main__":
    app()
