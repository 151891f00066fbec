"""ROC, FROC and PRO curves as PNG files, for reports and MLflow.

Figures are built with matplotlib's object API on the Agg canvas, never pyplot, so plotting
needs no display and keeps no global state between Prefect tasks running in threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from vadflow.tasks.evaluation.froc import FrocResult
from vadflow.tasks.evaluation.metrics import image_auroc, roc_points
from vadflow.tasks.evaluation.pro import ProCurve, area_to

if TYPE_CHECKING:
    from vadflow.tasks.evaluation.evaluate import Evaluation

_SIZE_IN = (5.0, 4.5)
_DPI = 120


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def plot_roc(labels: ArrayLike, scores: ArrayLike, out_png: str | Path, title: str = "ROC") -> Path:
    """ROC curve of scores against binary labels (True = anomalous), AUROC in the legend.

    With one class only, the figure says so instead of drawing a curve.
    """
    y = np.asarray(labels).astype(bool).ravel()
    fig = Figure(figsize=_SIZE_IN, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    if 0 < y.sum() < y.size:
        fpr, tpr = roc_points(y, scores)
        auc = image_auroc(y, scores)
        ax.plot(fpr, tpr, color="C0", linewidth=2, label=f"AUROC = {auc:.3f}")
    else:
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="false-positive rate (1 - specificity)",
        ylabel="true-positive rate (sensitivity)",
        title=f"{title}\n{int(y.sum())} anomalous, {int((~y).sum())} normal",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, out_png)


def plot_froc(result: FrocResult, out_png: str | Path, title: str = "FROC") -> Path:
    """FROC curve (sensitivity against average false positives per slide, log x axis).

    The six reading points are marked and the score (their mean sensitivity) is in the legend.
    """
    xs, ys = result.curve()
    fig = Figure(figsize=_SIZE_IN, layout="constrained")
    ax = fig.add_subplot()
    rates = np.asarray(result.fp_rates, dtype=np.float64)
    left, right = rates.min() / 2, max(rates.max() * 1.5, float(xs.max()) * 1.1)
    if np.isfinite(result.score):
        # Log axis: the (0, 0) start point sits at the left edge instead of at -infinity.
        shown = np.where(xs > 0, xs, left)
        ax.plot(shown, ys, color="C0", linewidth=2, marker=".", label="FROC curve")
        ax.plot(
            rates,
            result.sensitivities,
            "o",
            color="C3",
            label=f"at 1/4..8 FPs: score = {result.score:.3f}",
        )
        # Beyond the last point the curve stays at its final sensitivity.
        ax.hlines(ys[-1], xs[-1] if xs[-1] > 0 else left, right, color="C0", linewidth=2)
    else:
        ax.text(0.5, 0.5, "undefined: no lesions", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set(
        xlim=(left, right),
        ylim=(0, 1.02),
        xlabel="average false positives per slide",
        ylabel="lesion sensitivity",
        title=f"{title}\n{result.n_lesions} lesions, {result.n_itc} ITCs ignored, "
        f"{result.n_slides} slides",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left")
    return _save(fig, out_png)


def plot_pro(curve: ProCurve | None, out_png: str | Path, title: str = "PRO") -> Path:
    """PRO curve (mean per-region overlap against false-positive rate), limit 0.3 shaded."""
    fig = Figure(figsize=_SIZE_IN, layout="constrained")
    ax = fig.add_subplot()
    limit = curve.max_fpr if curve is not None and curve.max_fpr is not None else 0.3
    if curve is not None:
        score = area_to(curve.fpr, curve.pro, limit) / limit
        ax.plot(curve.fpr, curve.pro, color="C0", linewidth=2, label=f"PRO@{limit:g} = {score:.3f}")
        ax.axvspan(0, limit, color="C0", alpha=0.08)
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "undefined: no region or no normal pixel", ha="center", va="center")
    ax.set(
        xlim=(0, min(1.0, 2 * limit)),
        ylim=(0, 1.02),
        xlabel="false-positive rate (normal pixels)",
        ylabel="per-region overlap",
        title=title,
    )
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def evaluation_plots(evaluation: Evaluation, folder: Path, title: str) -> dict[str, str]:
    """The curves an evaluation supports, as PNGs under `folder`: ROC when the test slides hold
    both classes, FROC when there are lesions, PRO when pixel masks were evaluated."""
    table = evaluation.table.filter(pl.col("label") != "unknown")
    labels = (table["label"] == "anomalous").to_numpy()
    plots: dict[str, str] = {}
    if 0 < labels.sum() < len(labels):
        plots["ROC"] = str(plot_roc(labels, table["score"].to_numpy(), folder / "roc.png", title))
    if evaluation.froc_result is not None and evaluation.froc_result.n_lesions:
        plots["FROC"] = str(plot_froc(evaluation.froc_result, folder / "froc.png", title))
    if evaluation.pro is not None:
        plots["PRO"] = str(plot_pro(evaluation.pro, folder / "pro.png", title))
    return plots
