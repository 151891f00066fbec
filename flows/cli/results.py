"""Printing what the flows return: the only module that reads their result records.

`nightly` returns a `NightlySummary` (site, a `FamilyResult` per family with metrics and a
per-slide table, outputs, tracking URI); `batch_score` returns a `BatchScoreSummary` (site,
model, metrics, record, quarantined). The commands hand those here whole.

Every metric is shown. One that is NaN or missing is printed as `n/a` with the reason it could
not be computed, and industrial runs say "image" where pathology says "slide".
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from vadflow.flows.cli.options import console

if TYPE_CHECKING:
    from vadflow.flows.env import StatePaths
    from vadflow.tasks.exports.render import ScoredRun
    from vadflow.tasks.records import BatchScoreSummary, FamilyResult, NightlySummary


@dataclass(frozen=True)
class Nouns:
    """How a domain names its items: pathology has slides and tumours, industry images and
    defects."""

    item: str
    items: str
    anomalous: str

    @classmethod
    def of(cls, domain: str) -> Nouns:
        if domain == "industrial":
            return cls("image", "images", "defective")
        return cls("slide", "slides", "tumour")


@dataclass(frozen=True)
class MetricLine:
    """One metric as printed: its key, a label, and its value or why there is none."""

    key: str
    label: str
    value: float | None  # None: n/a
    reason: str = ""

    def shown(self) -> str:
        if self.value is None:
            return f"n/a ({self.reason})" if self.reason else "n/a"
        return f"{self.value:.4f}"


# Counts are said in words (`test slides: 6, 3 tumour`), not as metrics.
COUNTS = ("n_test_slides", "n_test_anomalous", "n_categories")


def metric_lines(
    metrics: Mapping[str, float], domain: str, froc_itc_um: float | None = None
) -> list[MetricLine]:
    """Every metric of one evaluation, in a fixed order, each with a value or a reason.

    The headline metrics of the domain (slide/image AUROC, F1-max, pixel AUROC, FROC for
    pathology, PRO for industrial, sensitivity, specificity, threshold) are always listed, so
    one that could not be computed shows up as `n/a` instead of vanishing; any other metric in
    `metrics` follows under its own key.
    """
    nouns = Nouns.of(domain)
    n_test = metrics.get("n_test_slides")
    n_anomalous = metrics.get("n_test_anomalous")
    threshold = metrics.get("threshold")
    calibrated = threshold is not None and math.isfinite(threshold)
    has_masks = _finite(metrics.get("pixel_auroc"))

    def both_classes() -> str:
        if n_test is not None and n_anomalous is not None:
            if n_anomalous == 0:
                return (
                    f"needs {nouns.anomalous} and normal test {nouns.items} "
                    f"(no {nouns.anomalous} among {n_test:.0f})"
                )
            if n_anomalous == n_test:
                return (
                    f"needs normal and {nouns.anomalous} test {nouns.items} "
                    f"(all {n_test:.0f} {nouns.anomalous})"
                )
            return "not computed by this run"
        return f"needs normal and {nouns.anomalous} test {nouns.items} with labels"

    no_masks = f"no ground-truth masks (no annotated lesion in the test {nouns.items})"
    if domain == "industrial":
        no_masks = f"no ground-truth masks for the defective test {nouns.items}"
    wanted: list[tuple[str, str, str]] = [
        ("slide_auroc", f"{nouns.item} AUROC", both_classes()),
        (
            "slide_auroc_forest",
            f"{nouns.item} AUROC (forest)",
            f"needs at least 2 normal and 2 {nouns.anomalous} test {nouns.items}",
        ),
        ("slide_f1_max", f"{nouns.item} F1-max", both_classes()),
        ("pixel_auroc", "pixel AUROC", no_masks),
        (
            "scored_share",
            "scored share of pixels" if domain == "industrial" else "scored share of tissue",
            "not measured (no heatmap or no tissue mask)",
        ),
    ]
    if domain == "industrial":
        wanted.append(("pro", "PRO", no_masks))
    else:
        itc = f" ({froc_itc_um:g} um)" if froc_itc_um is not None else ""
        froc_reason = f"no annotated lesion at or above froc_itc_um{itc}" if has_masks else no_masks
        wanted.append(("froc", "FROC", froc_reason))
    no_threshold = (
        f"no held-out normal {nouns.items} scored (val split): no threshold to call them at"
    )
    if "n_categories" in metrics:  # a mean over categories: each model has its own threshold
        no_threshold = "one per category's model (see each category's report)"
    call_reason = both_classes() if calibrated else no_threshold
    wanted += [
        ("slide_sensitivity", "sensitivity", call_reason),
        ("slide_specificity", "specificity", call_reason),
        ("threshold", "threshold", no_threshold),
    ]
    lines = [
        MetricLine(key, label, _value(metrics.get(key)), "" if _finite(metrics.get(key)) else why)
        for key, label, why in wanted
    ]
    listed = {key for key, _, _ in wanted} | set(COUNTS)
    for key, value in metrics.items():
        if key not in listed:
            lines.append(
                MetricLine(key, key, _value(value), "" if _finite(value) else "not computed")
            )
    return lines


def count_line(metrics: Mapping[str, float], domain: str) -> str:
    """`test slides: 6, 3 tumour` (or images / defective); empty without the counts."""
    nouns = Nouns.of(domain)
    n_test, n_anomalous = metrics.get("n_test_slides"), metrics.get("n_test_anomalous")
    if n_test is None:
        return ""
    text = f"test {nouns.items}: {n_test:.0f}"
    return text + (f", {n_anomalous:.0f} {nouns.anomalous}" if n_anomalous is not None else "")


def print_summary(
    summary: NightlySummary,
    state: StatePaths,
    *,
    domain: str,
    froc_itc_um: float | None = None,
) -> None:
    """A nightly run: per family its test table and every metric, then where everything is."""
    nouns = Nouns.of(domain)
    for family, result in summary.families.items():
        table = Table(title=f"{summary.site} / {family}: test {nouns.items}")
        for column in (nouns.item, "label", "score", "predicted"):
            table.add_column(column, justify="right" if column == "score" else "left")
        for row in result.table:
            predicted = row.predicted
            shown = "-" if predicted is None else ("anomalous" if predicted else "normal")
            score = row.score
            score_text = "n/a" if score is None or math.isnan(score) else f"{score:.5f}"
            table.add_row(row.slide_id, row.label, score_text, shown)
        console.print(table)
        metrics = result.metrics
        if result.categories:
            print_categories(f"{summary.site} / {family}", result, domain, froc_itc_um)
            console.print(f"  mean over {len(result.categories)} categories:")
        if counts := count_line(metrics, domain):
            console.print(f"  {counts}")
        for line in metric_lines(metrics, domain, froc_itc_um):
            console.print(f"  {line.label:<22} {line.shown()}", highlight=False, markup=False)
        if result.diverged:
            console.print(f"  [red]training diverged[/]: {family} is never promoted")
        if result.promotion is not None:
            console.print(f"  champion gate: {result.promotion.reason}")
        if result.spooled:
            console.print(
                "  [yellow]MLflow unreachable[/]: logged to the spool; "
                "replay with `vadflow tracking sync`"
            )
        if result.report:
            console.print(f"  report: {result.report}", soft_wrap=True)
    for family, reason in summary.skipped.items():
        console.print(f"[yellow]skipped[/] {family}: {reason}")
    print_problems(summary)
    print_gaps(summary, domain)
    overlays = f"heatmap overlays (PNG):  {summary.outputs}/exports/<family>/"
    if not summary.exported:
        overlays = (
            f"exports skipped (--no-export): `vadflow export {summary.outputs}/heatmaps/"
            "<family>-<version>` draws them"
        )
    console.print(
        "\n".join(
            [
                "",
                f"outputs (manifests, masks, heatmaps, reports): {summary.outputs}",
                overlays,
                *backend_lines(state, summary.tracking_uri or state.tracking_uri),
            ]
        ),
        soft_wrap=True,
        highlight=False,
    )


def print_categories(
    title: str, result: FamilyResult, domain: str, froc_itc_um: float | None = None
) -> None:
    """One row per category (its own model) and their mean: the headline metrics, as the MVTec
    AD protocol reports them; a metric a category could not compute is `n/a`."""
    keys = [
        line.key
        for line in metric_lines(result.metrics, domain, froc_itc_um)
        if line.key in CATEGORY_COLUMNS
    ]
    table = Table(title=f"{title}: one model per category")
    table.add_column("category")
    for key in keys:
        table.add_column(CATEGORY_COLUMNS[key], justify="right")
    table.add_column("champion gate")
    rows = [(name, c.metrics, c.promotion) for name, c in result.categories.items()]
    for name, metrics, promotion in [*rows, ("mean", result.metrics, None)]:
        values = [_value(metrics.get(k)) for k in keys]
        gate = "-" if promotion is None else ("promoted" if promotion.promoted else "kept")
        table.add_row(name, *("n/a" if v is None else f"{v:.4f}" for v in values), gate)
    console.print(table)


# The per-category table's columns (every metric is still printed below it, as the mean).
CATEGORY_COLUMNS = {
    "slide_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pro": "PRO",
    "slide_f1_max": "F1-max",
    "froc": "FROC",
    "scored_share": "scored",
}


def print_gaps(result: NightlySummary | BatchScoreSummary, domain: str) -> None:
    """What the site's labels left out of the metrics: unlabelled test slides, anomalous ones
    without an annotation (count and names)."""
    for line in result.gaps.lines(Nouns.of(domain).items):
        console.print(f"[yellow]label gap[/] {line}", soft_wrap=True, highlight=False)


def backend_lines(state: StatePaths, tracking_uri: str) -> list[str]:
    """Where the MLflow and Prefect backends in use are, and how to open their UIs."""
    if tracking_uri.startswith(("http://", "https://")):
        mlflow = [
            f"MLflow server:           {tracking_uri}",
            f"  open its UI:           {tracking_uri}",
        ]
    else:
        mlflow = [
            f"MLflow store:            {tracking_uri}",
            f"  open its UI:           mlflow ui --backend-store-uri {tracking_uri}",
        ]
    api = state.prefect_api_url
    if api:
        prefect = [
            f"Prefect API:             {api}",
            f"  open its UI:           {api.removesuffix('/').removesuffix('/api')}",
        ]
    else:
        home = os.environ.get("PREFECT_HOME") or str(state.prefect)
        prefect = [
            f"Prefect state:           {home}",
            f"  open its UI:           PREFECT_HOME={home} prefect server start",
        ]
    return mlflow + prefect


def print_problems(result: NightlySummary | BatchScoreSummary) -> None:
    """Slides set aside by a run: quarantined ones with their reason, and those without tissue."""
    for item in result.quarantined:
        console.print(f"[yellow]quarantined[/] {item.slide_id}: {item.reason}", soft_wrap=True)
    for slide_id in result.no_tissue:
        console.print(f"[yellow]no tissue[/] {slide_id}: nothing to score")


def result_site(result: BatchScoreSummary) -> str:
    """The site a batch-scoring result is about."""
    return result.site


def scored_record(result: BatchScoreSummary) -> str | None:
    """The `scored.json` of a batch-scoring result; None when no slide could be scored."""
    return result.record


def print_evaluation(
    result: BatchScoreSummary, model: str, *, domain: str, froc_itc_um: float | None = None
) -> None:
    """A site scored by an existing model: every metric by key, value or n/a and why."""
    table = Table(title=f"{result.site} scored by {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    metrics = result.metrics
    for line in metric_lines(metrics, domain, froc_itc_um):
        table.add_row(line.key, line.shown())
    console.print(table)
    if counts := count_line(metrics, domain):
        console.print(counts)
    print_problems(result)
    print_gaps(result, domain)


def print_cross_site(result: BatchScoreSummary, home_site: str, state: StatePaths) -> bool:
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

    away = result.site
    family = json.loads((Path(result.model_dir) / "config.json").read_text())["family"]
    try:
        report = report_cross_site(
            resolve_tracking_uri(None, state.home),
            str(default_spool_dir(state.home)),
            away_site=away,
            home_site=home_site,
            family=family,
            away_metrics=result.metrics,
            model=result.model,
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
    print_problems(result)
    return True


def print_scored_run(run: ScoredRun) -> None:
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


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _value(value: Any) -> float | None:
    return float(value) if _finite(value) else None
