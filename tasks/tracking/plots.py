"""Small PNG plots logged with runs: slide ROC, FROC points, and the cross-run comparison.

Drawn with matplotlib's object API (`Figure`), not pyplot, so tasks on several threads can draw
at once without sharing pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure


def comparison_plot(frame: pl.DataFrame, metrics: Sequence[str], path: Path, title: str) -> Path:
    """One panel per metric; one line per family over the nightly runs; stars on champions."""
    shown = [m for m in metrics if m in frame.columns and frame[m].drop_nulls().len() > 0]
    panels = max(1, len(shown))
    fig = Figure(figsize=(4.5 * panels, 3.6), dpi=100)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ordered = frame.sort("started") if "started" in frame.columns else frame
    nights = list(dict.fromkeys(ordered["nightly"].to_list())) if frame.height else []
    position = {night: i for i, night in enumerate(nights)}
    for ax, metric in zip(axes, shown or ["(no metrics yet)"], strict=False):
        for family in sorted(set(ordered["family"].to_list())) if shown else []:
            rows = ordered.filter(pl.col("family") == family).drop_nulls(metric)
            xs = [position[n] for n in rows["nightly"].to_list()]
            ax.plot(xs, rows[metric].to_list(), marker="o", label=family)
            champs = rows.filter(pl.col("champion")) if "champion" in rows.columns else rows[:0]
            if champs.height:
                ax.scatter(
                    [position[n] for n in champs["nightly"].to_list()],
                    champs[metric].to_list(),
                    marker="*",
                    s=160,
                    color="gold",
                    edgecolors="black",
                    zorder=3,
                )
        ax.set_title(metric)
        ax.set_xticks(range(len(nights)), nights, rotation=30, ha="right", fontsize=7)
        if shown:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _num(value: Any) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False
