"""`vadflow score` and `vadflow export`: use a trained model on new slides, redraw the exports.

`score` runs the batch-scoring flow (`flows/batch_score.py`) without metrics: new slides need
no labels, and each is called at the threshold the model was calibrated with. `export` redraws
a scored run's exports from its `scored.json` (another colour map, alpha or threshold) with
plain functions: nothing is rescored and no Prefect run is started.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vadflow.flows.env import configure_state

console = Console()

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="state folder for Prefect, MLflow and outputs (default ./.vadflow or $VADFLOW_HOME)",
    ),
]


def score(
    site_dir: Annotated[
        Path,
        typer.Argument(
            help="site folder, or any folder of slides (without a known layout every slide is "
            "scored, its label unknown)"
        ),
    ],
    model: str = typer.Option(
        "champion",
        help="a model folder, an MLflow model URI, 'champion' or 'champion@<site>' "
        "(another site's champion)",
    ),
    family: str | None = typer.Option(None, help="detector family (default: the site's first)"),
    home: HomeOption = None,
) -> None:
    """Score slides with an existing model, no training and no metrics; print each call."""
    if site_dir.is_file():
        console.print(
            f"[red]{site_dir} is a file[/]: give the folder holding it (every slide in that "
            "folder is scored)"
        )
        raise typer.Exit(2)
    state = configure_state(home)
    from vadflow.tasks.exports.render import load_scored_run
    from vadflow.tasks.site import load_site

    try:
        load_site(site_dir)  # fail fast, before Prefect starts, on a bad site folder
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]cannot read site {site_dir}:[/] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    from vadflow.flows.batch_score import batch_score

    try:
        result = batch_score(
            str(site_dir),
            model=model,
            family=family,
            output_root=str(state.outputs),
            metrics=False,
        )
    except (LookupError, ValueError, FileNotFoundError) as exc:  # model cannot be resolved
        console.print(f"[red]scoring failed:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    for item in result.get("quarantined", []):
        console.print(f"[yellow]quarantined[/] {item['slide_id']}: {item['reason']}")
    for slide_id in result.get("no_tissue", []):
        console.print(f"[yellow]no tissue[/] {slide_id}: nothing to score")
    if result["record"] is None:
        console.print(f"[red]no slide of {site_dir} could be scored[/]")
        raise typer.Exit(1)
    run = load_scored_run(result["record"])
    print_scored_run(run)
    console.print(
        f"redraw (colour map, alpha, threshold) without rescoring: "
        f"vadflow export {run.heatmap_dir} --colour-map viridis --alpha 0.4",
        soft_wrap=True,
    )


def export(
    scored: Annotated[
        Path,
        typer.Argument(
            help="a scored run: its heatmap folder (holding scored.json), the scored.json "
            "itself, or a site's output folder (its newest run)"
        ),
    ],
    colour_map: str = typer.Option(
        "inferno", "--colour-map", help="matplotlib colour map of the overlays"
    ),
    alpha: float = typer.Option(0.5, help="heatmap opacity over the slide, 0 to 1"),
    threshold: float | None = typer.Option(
        None,
        help="threshold for regions and predictions (default: the run's calibrated one); "
        "metrics in the report stay as computed",
    ),
) -> None:
    """Redraw a scored run's overlays, GeoJSON, ASAP XML and report, without rescoring."""
    from vadflow.tasks.exports.render import ExportStyle, load_scored_run, render_exports

    try:
        run = load_scored_run(scored)
        style = ExportStyle(colour_map=colour_map, alpha=alpha)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(2) from exc
    try:
        rendered = render_exports(run, style, threshold)
    except (FileNotFoundError, ValueError) as exc:  # a slide or heatmap moved since scoring
        console.print(f"[red]cannot redraw {scored}:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    print_scored_run(rendered)


def print_scored_run(run) -> None:
    """Per-slide table of a rendered run (score, call, candidates, files), then the threshold
    and where everything is."""
    exported = run.exported
    root = Path(os.path.commonpath([run.heatmap_dir, run.exports_dir, run.report_dir]))

    def where(path: str) -> str:
        return os.path.relpath(path, root) if path else "-"

    labelled = any(s.label != "unknown" for s in exported)
    table = Table(title=f"{run.site} scored by {run.model or run.name}")
    columns = ["slide", *(["label"] if labelled else []), "score", "prediction", "candidates"]
    for column in columns:  # kept whole; the paths fold when the terminal is narrow
        justify = "right" if column in ("score", "candidates") else "left"
        table.add_column(column, justify=justify, no_wrap=True)
    for column in ("heatmap", "overlay", "geojson"):
        table.add_column(column, overflow="fold")
    for s in exported:
        call = "-" if s.predicted is None else ("anomalous" if s.predicted else "normal")
        table.add_row(
            s.slide_id,
            *([s.label] if labelled else []),
            "n/a" if math.isnan(s.score) else f"{s.score:.5g}",
            call,
            "-" if s.candidates is None else str(s.candidates),
            where(s.heatmap_tiff),
            where(s.overlay),
            where(s.candidates_geojson),
        )
    console.print(table)
    if math.isfinite(run.threshold):
        console.print(f"threshold {run.threshold:.5g} ({run.threshold_source})", soft_wrap=True)
    else:
        console.print("[yellow]no calibrated threshold[/]: slides are ranked, not called")
    console.print(
        "\n".join(
            [
                f"files under {root}",
                f"  heatmaps (pyramidal TIFF + .npy): {where(str(run.heatmap_dir))}",
                f"  overlays, GeoJSON, ASAP XML:      {where(run.exports_dir)}",
                f"  report:                           {where(str(run.report))}",
            ]
        ),
        soft_wrap=True,
    )
