"""The results table: Markdown for the README and issue notes, a rich table for the terminal."""

from __future__ import annotations

import math
from collections.abc import Sequence

from vadflow.tasks.benchmark.families import BenchmarkRow
from vadflow.tasks.benchmark.hard_site import SiteSize
from vadflow.tasks.benchmark.tiles import TILE_POSITIVE, BenchmarkData


def _cell(value: float) -> str:
    """A metric as the tables print it: three decimals, or n/a when undefined."""
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def format_table(rows: Sequence[BenchmarkRow]) -> str:
    """The results as a Markdown table (for the README and issue notes)."""
    lines = [
        "| family | tile AUROC | tile AUROC (QC passed) | slide AUC | slide AUC (max) | FROC "
        "| pixel AUROC | seconds | direction |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        direction = f"{row.direction}: {row.error}" if row.error else row.direction
        lines.append(
            f"| {row.family} | {_cell(row.tile_auroc)} | {_cell(row.tile_auroc_qc)} | "
            f"{_cell(row.slide_auc)} | "
            f"{_cell(row.slide_auc_max)} | {_cell(row.froc)} | "
            f"{_cell(row.pixel_auroc)} | {row.seconds:.1f} | {direction} |"
        )
    return "\n".join(lines)


def print_table(
    rows: Sequence[BenchmarkRow],
    data: BenchmarkData,
    *,
    size: str | SiteSize,
    epochs: int | None,
) -> None:
    """The table on the terminal, titled with the site's size, tile counts and the budget."""
    from rich.console import Console
    from rich.table import Table

    test = data.test
    positives = int((test.label_fraction >= TILE_POSITIVE).sum())
    negatives = int((test.label_fraction == 0).sum())
    title = (
        f"hard synthetic site ({size if isinstance(size, str) else 'custom'}): "
        f"{len(data.train)} train / {len(data.val)} val normal tiles, test {positives} lesion "
        f"+ {negatives} normal tiles on {len(test.slide_names)} slides; "
        + (f"{epochs} epochs each" if epochs is not None else "each family's own epochs")
    )
    table = Table(title=title)
    columns = (
        "family",
        "tile AUROC",
        "tile AUROC (QC passed)",
        "slide AUC",
        "slide AUC (max)",
        "FROC",
        "pixel AUROC",
        "seconds",
        "direction",
    )
    for column in columns:
        # Family names never wrap or cut ("supervised_cnn (combined)"); the rest may wrap.
        table.add_column(
            column,
            justify="left" if column in ("family", "direction") else "right",
            no_wrap=column == "family",
        )
    for row in rows:
        metrics = (
            row.tile_auroc,
            row.tile_auroc_qc,
            row.slide_auc,
            row.slide_auc_max,
            row.froc,
            row.pixel_auroc,
        )
        cells = [_cell(v) for v in metrics]
        if row.direction == "inverted":
            direction = "[red]inverted[/]"
        elif row.direction == "failed":
            direction = f"[red]failed[/] {row.error}"
        elif row.direction == "skipped":
            direction = f"skipped: {row.error}"
        else:
            direction = "ok"
        table.add_row(row.family, *cells, f"{row.seconds:.1f}", direction)
    Console().print(table)


def _industrial_cells(row: BenchmarkRow) -> list[str]:
    """family, category, image AUROC (max), image AUROC (site score), pixel AUROC, AU-PRO,
    seconds: an industrial row's cells before its direction."""
    metrics = (row.slide_auc_max, row.slide_auc, row.pixel_auroc, row.pro)
    return [row.family, row.category, *map(_cell, metrics), f"{row.seconds:.1f}"]


INDUSTRIAL_COLUMNS = (
    "family",
    "category",
    "image AUROC",
    "image AUROC (site score)",
    "pixel AUROC",
    "AU-PRO",
    "seconds",
    "direction",
)


def format_industrial_table(rows: Sequence[BenchmarkRow]) -> str:
    """An industrial benchmark's rows (one per family and category) as a Markdown table; image
    AUROC is on the anomaly map's maximum (MVTec AD), the site score's beside it."""
    lines = [
        "| " + " | ".join(INDUSTRIAL_COLUMNS) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        direction = f"{row.direction}: {row.error}" if row.error else row.direction
        lines.append("| " + " | ".join([*_industrial_cells(row), direction]) + " |")
    return "\n".join(lines)


def print_industrial_table(
    rows: Sequence[BenchmarkRow], *, size: str | object, epochs: int | None
) -> None:
    """The industrial table on the terminal, titled with the line's size and the budget."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"hard industrial line ({size if isinstance(size, str) else 'custom'}), one model per "
        "family and category; "
        + (f"{epochs} epochs each" if epochs is not None else "each family's own epochs")
    )
    table = Table(title=title)
    for column in INDUSTRIAL_COLUMNS:
        table.add_column(
            column,
            justify="left" if column in ("family", "category", "direction") else "right",
            no_wrap=column == "family",
        )
    for row in rows:
        if row.direction in ("inverted", "failed"):
            direction = f"[red]{row.direction}[/] {row.error}".rstrip()
        elif row.direction == "skipped":
            direction = f"skipped: {row.error}"
        else:
            direction = "ok"
        table.add_row(*_industrial_cells(row), direction)
    Console().print(table)
