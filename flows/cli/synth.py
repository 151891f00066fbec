"""`vadflow synth pathology|industrial`: synthetic sites in real formats, deterministic by seed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vadflow.flows.cli.options import Category, Mode, console
from vadflow.flows.cli.startup import fail

synth_app = typer.Typer(
    help="Generate synthetic sites in real formats (deterministic by seed).",
    no_args_is_help=True,
)

OutArgument = Annotated[Path, typer.Argument(help="folder to create the site in")]
ModeOption = Annotated[
    Mode,
    typer.Option(help="easy: lesions/defects change colour; hard: they keep it (see README)"),
]
SeedOption = Annotated[int, typer.Option(help="random seed: the same seed writes the same files")]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@synth_app.command("pathology")
def synth_pathology_command(
    out: OutArgument,
    name: Annotated[str, typer.Option(help="site name (folder name under OUT)")] = "site-a",
    train_normal: Annotated[int, typer.Option(help="normal training slides")] = 4,
    test_normal: Annotated[int, typer.Option(help="normal test slides")] = 3,
    test_tumor: Annotated[int, typer.Option(help="tumour test slides (ASAP XML + mask)")] = 3,
    train_tumor: Annotated[
        int,
        typer.Option(help="tumour training slides (ASAP XML): labels for supervised_cnn and mil"),
    ] = 0,
    width: Annotated[int, typer.Option(help="level-0 width in px")] = 4096,
    height: Annotated[int, typer.Option(help="level-0 height in px")] = 3072,
    mpp: Annotated[
        float, typer.Option(help="level-0 microns per pixel (Camelyon16: ~0.243)")
    ] = 0.25,
    seed: SeedOption = 0,
    mode: ModeOption = "easy",
) -> None:
    """Pyramidal JPEG TIFF slides with tissue, planted lesions and ASAP XML annotations."""
    from vadflow.tasks.synth.pathology import make_pathology_site

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
    console.print(f"pathology site written to [bold]{site}[/]", soft_wrap=True)


@synth_app.command("industrial")
def synth_industrial_command(
    out: OutArgument,
    name: Annotated[str, typer.Option(help="site name (folder name under OUT)")] = "line-a",
    category: Annotated[Category, typer.Option(help="MVTec-style category folder")] = "fabric",
    train: Annotated[int, typer.Option(help="good training images")] = 40,
    test_good: Annotated[int, typer.Option(help="good test images")] = 10,
    per_defect: Annotated[int, typer.Option(help="test images per defect type")] = 6,
    image_size: Annotated[int, typer.Option(help="image edge in px")] = 128,
    seed: SeedOption = 0,
    mode: ModeOption = "easy",
) -> None:
    """MVTec AD-layout folders: train/good, test/<defect>, ground_truth masks."""
    from vadflow.tasks.synth.industrial import make_industrial_site

    with _progress() as bar:
        job = bar.add_task(f"images for {name}", total=None)
        try:
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
        except ValueError as exc:  # e.g. an image size the generator cannot draw
            raise fail(str(exc)) from None
    console.print(f"industrial site written to [bold]{site}[/]", soft_wrap=True)
