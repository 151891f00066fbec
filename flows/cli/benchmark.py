"""`vadflow benchmark-detectors`: the honest results table (the work is `tasks/benchmark/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vadflow.flows.cli.options import (
    Device,
    Domain,
    FamiliesOption,
    Features,
    Score,
    Size,
    console,
    family_values,
)
from vadflow.flows.cli.startup import fail


def benchmark_detectors_command(
    family: FamiliesOption = None,
    domain: Annotated[
        Domain,
        typer.Option(
            help="pathology: a hard Camelyon16-shaped site; industrial: a hard MVTec AD-shaped "
            "line (fabric, wood), one model per family and category"
        ),
    ] = "pathology",
    size: Annotated[Size, typer.Option(help="size of the hard synthetic site")] = "small",
    epochs: Annotated[
        int, typer.Option(min=1, help="training epochs, the same for every family")
    ] = 3,
    own_budget: Annotated[
        bool, typer.Option(help="train each family at its own default epochs instead of --epochs")
    ] = False,
    seed: Annotated[int, typer.Option(help="seed of the site and of every family")] = 0,
    device: Annotated[Device, typer.Option(help="where to train and score")] = "auto",
    score: Annotated[
        Score, typer.Option(help="how the families with a latent space score")
    ] = "residual",
    features: Annotated[
        Features | None,
        typer.Option(help="patch features of patch_knn and padim (default: their own, filters)"),
    ] = None,
    contamination: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.9,
            help="share of the normal training slides replaced by unlabelled tumour slides",
        ),
    ] = 0.0,
    robust: Annotated[
        bool,
        typer.Option(
            help="robust modes: the feature families leave out the patches farthest from every "
            "other training slide's; the trained families trim their highest-loss tiles"
        ),
    ] = False,
    markdown: Annotated[
        Path | None, typer.Option(help="also write the table as Markdown here")
    ] = None,
) -> None:
    """Train every family on one hard synthetic site, same budget; print the honest table."""
    from vadflow.tasks.benchmark import (
        benchmark_detectors,
        benchmark_industrial,
        format_industrial_table,
        format_table,
    )

    if domain == "industrial" and (contamination > 0 or robust):
        raise fail(
            "--contamination and --robust are measured on the pathology site only; "
            "leave them out with --domain industrial"
        )
    budget = None if own_budget else epochs
    shared = {"device": device, "score": score, "features": features}
    try:
        if domain == "industrial":
            rows = benchmark_industrial(family_values(family), size, budget, seed, **shared)
        else:
            rows = benchmark_detectors(
                family_values(family),
                size,
                budget,
                seed,
                contamination=contamination,
                robust=robust,
                **shared,
            )
    except (KeyError, ValueError) as exc:
        raise fail(str(exc)) from None
    if markdown is not None:
        table = format_industrial_table(rows) if domain == "industrial" else format_table(rows)
        markdown.write_text(table + "\n")
        console.print(f"wrote {markdown}", soft_wrap=True)
