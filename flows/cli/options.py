"""The options and choices the commands share, and the console they print to.

Every parameter is `Annotated[T, typer.Option(...)] = default`, so a command's defaults are plain
Python values: a command function called from Python gets `None` or `"easy"`, never typer's
`OptionInfo`. Choices are types (`Literal`, or an Enum built from the registry's folder names),
so `-h` lists them and a wrong one is refused while parsing, before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from vadflow.tasks.detectors.registry import family_names

console = Console()

Domain = Literal["pathology", "industrial"]
Mode = Literal["easy", "hard"]  # tasks/synth/pathology.py MODES
Category = Literal["fabric", "wood"]  # tasks/synth/industrial.py CATEGORIES
Device = Literal["auto", "cpu", "cuda"]  # tasks/detectors/base.py resolve_device
Score = Literal["residual", "latent", "combined"]  # tasks/detectors/components/latent_density.py
Size = Literal["tiny", "small", "medium"]  # tasks/benchmark/hard_site.py SIZES
Features = Literal["filters", "cnn", "both", "imagenet"]  # detectors/components/backbones.py

# The shipped families, read from folder names: no family (and no torch) is imported.
FamilyName = Enum("FamilyName", {name: name for name in family_names()}, type=str)


def family_values(families: Sequence[FamilyName] | None) -> list[str] | None:
    """Plain family names for the library (None when none were given)."""
    return [FamilyName(f).value for f in families] if families else None


HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="state folder for Prefect, MLflow and outputs (default ./.vadflow or $VADFLOW_HOME)",
    ),
]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="show Prefect's log lines on the terminal (default: a file under <home>/logs, "
        "named at the end)",
    ),
]
SitesOption = Annotated[
    Path | None,
    typer.Option(
        "--sites",
        help="folder of site files (default deployments/sites)",
        exists=True,
        file_okay=False,
    ),
]
TrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite under --home)",
    ),
]
SiteDirArgument = Annotated[
    Path,
    typer.Argument(
        help="site folder (with site.yaml, or a known layout)", exists=True, file_okay=False
    ),
]
FamilyOption = Annotated[
    FamilyName | None, typer.Option("--family", help="detector family (default: the site's first)")
]
FamiliesOption = Annotated[
    list[FamilyName] | None,
    typer.Option("--family", "-f", help="detector family; repeat for more"),
]
ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="a model folder, an MLflow model URI, 'champion' or 'champion@<site>' "
        "(another site's champion)",
    ),
]
