"""`vadflow score`, `vadflow evaluate` and `vadflow export`: use a trained model, redraw exports.

`score` runs the batch-scoring flow (`flows/batch_score.py`) without metrics: new slides need
no labels, and each is called at the threshold the model was calibrated with. `evaluate` runs it
with metrics on a labelled site (and, with `--model champion@<site>`, as a cross-site
evaluation). `export` redraws a scored run's exports from its `scored.json` (another colour
map, alpha or threshold) with plain functions: nothing is rescored and no Prefect run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vadflow.flows.cli.options import FamilyOption, HomeOption, ModelOption, console
from vadflow.flows.cli.progress import flow_output
from vadflow.flows.cli.results import (
    print_cross_site,
    print_evaluation,
    print_problems,
    print_scored_run,
    result_site,
    scored_record,
)
from vadflow.flows.cli.startup import checked_site, fail, prefect_api

if TYPE_CHECKING:
    from vadflow.flows.env import StatePaths
    from vadflow.tasks.records import BatchScoreSummary


def score_command(
    site_dir: Annotated[
        Path,
        typer.Argument(
            help="site folder, or any folder of slides (without a known layout every slide is "
            "scored, its label unknown)",
            exists=True,
        ),
    ],
    model: ModelOption = "champion",
    family: FamilyOption = None,
    home: HomeOption = None,
) -> None:
    """Score slides with an existing model, no training and no metrics; print each call."""
    if site_dir.is_file():
        raise fail(
            f"{site_dir} is a file: give the folder holding it (every slide in that folder is "
            "scored)"
        )
    checked_site(site_dir)  # before Prefect starts
    from vadflow.flows.env import configure_state
    from vadflow.tasks.exports.render import load_scored_run

    state = configure_state(home)
    result = run_batch_score(site_dir, model, family, state, metrics=False)
    print_problems(result)
    record = scored_record(result)
    if record is None:
        raise fail(f"no slide of {site_dir} could be scored", code=1)
    run = load_scored_run(record)
    print_scored_run(run)
    console.print(
        f"redraw (colour map, alpha, threshold) without rescoring: "
        f"vadflow export {run.heatmap_dir} --colour-map viridis --alpha 0.4",
        soft_wrap=True,
    )


def run_batch_score(
    site_dir: Path, model: str, family: Any, state: StatePaths, *, metrics: bool
) -> BatchScoreSummary:
    """The batch-scoring flow with a progress line per stage and Prefect's log in a file (named
    when the flow fails, and at exit); a model that cannot be resolved is one line, exit 1."""
    from vadflow.flows.batch_score import batch_score

    with flow_output(state.home, verbose=False, until_exit=True) as output:
        try:
            with prefect_api():
                return batch_score(
                    str(site_dir),
                    model=model,
                    family=family.value if family else None,
                    output_root=str(state.outputs),
                    metrics=metrics,
                )
        except (LookupError, ValueError, FileNotFoundError) as exc:  # model not resolvable
            raise fail(f"scoring failed: {exc} ({output.where})", code=1) from None


def evaluate_command(
    site_dir: Annotated[
        Path,
        typer.Argument(help="the site to score (its folder)", exists=True, file_okay=False),
    ],
    model: ModelOption = "champion",
    family: FamilyOption = None,
    home: HomeOption = None,
) -> None:
    """Score a site with an existing model, no training, and print its metrics.

    With `--model champion@<other site>` the champion's metrics at its home site are printed
    beside these, with the drop (home - away), and logged as a cross-site run in MLflow.
    """
    site = checked_site(site_dir)
    from vadflow.flows.env import configure_state

    state = configure_state(home)
    result = run_batch_score(site_dir, model, family, state, metrics=True)
    home_site = model.partition("@")[2] if model.startswith("champion@") else ""
    if (
        home_site
        and home_site != result_site(result)
        and print_cross_site(result, home_site, state)
    ):
        return
    print_evaluation(result, model, domain=site.domain, froc_itc_um=site.froc_itc_um)


def export_command(
    scored: Annotated[
        Path,
        typer.Argument(
            help="a scored run: its heatmap folder (holding scored.json), the scored.json "
            "itself, or a site's output folder (its newest run)"
        ),
    ],
    colour_map: Annotated[
        str, typer.Option("--colour-map", help="matplotlib colour map of the overlays")
    ] = "inferno",
    alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="heatmap opacity over the slide, 0 to 1")
    ] = 0.5,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="threshold for regions and predictions (default: the run's calibrated one); "
            "metrics in the report stay as computed",
        ),
    ] = None,
    all_candidates: Annotated[
        bool,
        typer.Option(
            "--all",
            help="write every lesion candidate to the GeoJSON and ASAP files, not only those "
            "above the model's calibrated threshold",
        ),
    ] = False,
    qupath_objects: Annotated[
        str,
        typer.Option(
            "--qupath-objects",
            help="QuPath object type of the predictions: detection (default) or annotation",
        ),
    ] = "detection",
) -> None:
    """Draw (or redraw) a scored run's overlays, GeoJSON, ASAP XML and report, without
    rescoring: a run exported before, or one run with `--no-export`. A family's heatmap folder
    on a site trained per category holds one run per category: each is drawn."""
    from vadflow.tasks.exports.render import (
        SCORED_RUN_FILE,
        ExportStyle,
        load_scored_run,
        render_exports,
    )

    per_category = (
        sorted(scored.glob(f"*/{SCORED_RUN_FILE}"))
        if scored.is_dir() and not (scored / SCORED_RUN_FILE).is_file()
        else []
    )
    try:
        runs = [load_scored_run(path) for path in per_category or [scored]]
        style = ExportStyle(colour_map=colour_map, alpha=alpha)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    for run in runs:
        try:
            rendered = render_exports(
                run, style, threshold, all_candidates=all_candidates, qupath_objects=qupath_objects
            )
        except (FileNotFoundError, ValueError) as exc:  # a slide or heatmap moved since scoring
            raise fail(f"cannot redraw {scored}: {exc}", code=1) from None
        print_scored_run(rendered)
