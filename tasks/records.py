"""The small typed records the stages hand each other, and the flows' summaries.

Every stage boundary passes one of these: paths to what a stage wrote and the figures it
computed, never pixels or tensors, so a Prefect task result stays cheap to hash and keep.

    ingest    -> SlideManifest (register), Ingested (discover ... validate, with LabelGaps),
                 CategoryGroup (an industrial site's categories, each trained on its own)
    train     -> TrainedModel, or SkippedFamily (a labelled family without labels)
    score     -> SlideScore (one per slide)
    evaluate  -> Evaluated (metrics, per-slide SlideResult rows, plots, report folder)
    export    -> Exported
    track     -> TrackingTarget in, TrackedFamily (with its PromotionDecision) out
    flows     -> NightlySummary (a FamilyResult per family, per category where the site has
                 several), BatchScoreSummary

This module is a floor: it imports no stage module at run time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from vadflow.tasks.detectors.base import FitReport
    from vadflow.tasks.tiling.grid import TilingResult
    from vadflow.tasks.validation import BoundaryCheck

Candidate = tuple[float, float, float]  # a lesion candidate (x, y, p): level-0 px, probability


# --- ingest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quarantined:
    """A slide left out of a run, and why (unreadable, failed tiling, a broken contract)."""

    slide_id: str
    reason: str


@dataclass(frozen=True)
class SlideManifest:
    """The registered slide manifest (`slides.parquet`) and the slides it quarantined."""

    path: str
    slides: int
    quarantined: tuple[Quarantined, ...] = ()


@dataclass(frozen=True)
class LabelGaps:
    """What the layout could not say, or said twice: test slides with no label; anomalous
    slides with no annotation (their lesions cannot be located, so pixel metrics and FROC leave
    them out); ids renamed because they differed from another only in case; and test slides
    that are byte copies of a training or validation slide (`<test> = <train>`)."""

    unlabelled_test: tuple[str, ...] = ()
    anomalous_without_annotation: tuple[str, ...] = ()
    renamed_for_case: tuple[str, ...] = ()
    train_test_copies: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any(
            (
                self.unlabelled_test,
                self.anomalous_without_annotation,
                self.renamed_for_case,
                self.train_test_copies,
            )
        )

    def lines(self, noun: str = "slides") -> list[str]:
        """One line per gap, with the count and the names (at most ten named)."""
        out = []
        for ids, what in (
            (self.unlabelled_test, f"test {noun} without a label (no metric counts them)"),
            (
                self.anomalous_without_annotation,
                f"anomalous {noun} without an annotation (left out of pixel metrics and FROC)",
            ),
            (
                self.renamed_for_case,
                f"{noun} renamed: their ids differed from another only in case",
            ),
            (
                self.train_test_copies,
                f"test {noun} that are byte copies of a training {noun[:-1]} (leakage)",
            ),
        ):
            if ids:
                named = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
                out.append(f"{len(ids)} {what}: {named}")
        return out


@dataclass(frozen=True)
class Ingested:
    """What discover, register, mask + tile and the manifest contracts leave for training and
    scoring: the slide manifest, the slides that tiled and passed, and those that failed."""

    slides_path: str
    tiling: tuple[TilingResult, ...]  # slides that tiled and passed the contracts
    failed: tuple[TilingResult, ...]  # slides whose tiling failed, with reasons
    checked: BoundaryCheck
    gaps: LabelGaps = LabelGaps()  # what discovery could not label or locate

    @property
    def slides(self) -> pl.DataFrame:
        """The slide manifest as it stands now (contracts may have quarantined slides)."""
        return pl.read_parquet(self.slides_path)

    @property
    def tile_paths(self) -> list[str]:
        return [t.manifest for t in self.tiling]

    def scorable(self, splits: tuple[str, ...]) -> list[dict[str, Any]]:
        """Slide rows with tiles, in the given splits."""
        tiled = {t.slide_id for t in self.tiling if t.tiles > 0}
        return [
            r
            for r in self.slides.filter(pl.col("status") == "ok").to_dicts()
            if r["slide_id"] in tiled and r["split"] in splits
        ]

    def manifest_of(self, slide_id: str) -> str:
        """The tile manifest of one tiled slide."""
        return next(t.manifest for t in self.tiling if t.slide_id == slide_id)

    @property
    def quarantined(self) -> tuple[Quarantined, ...]:
        """Slides quarantined at registration or by a contract, then those that failed tiling."""
        frozen = self.slides.filter(pl.col("status") == "quarantined")
        listed = [Quarantined(r["slide_id"], r["reason"]) for r in frozen.iter_rows(named=True)]
        seen = {q.slide_id for q in listed}  # a failed tiling is quarantined in the manifest
        listed += [
            Quarantined(t.slide_id, t.reason or "tiling failed")
            for t in self.failed
            if t.slide_id not in seen
        ]
        return tuple(listed)

    @property
    def no_tissue(self) -> tuple[str, ...]:
        return tuple(t.slide_id for t in self.tiling if t.status == "no_tissue")

    @property
    def contracts_quarantined(self) -> bool:
        """Whether the manifest contracts set any slide aside (the champion gate reads it)."""
        return bool(self.checked.quarantined)


@dataclass(frozen=True)
class CategoryGroup:
    """The slides one model is trained on and scores: a whole site (`name` None), or one
    category of an industrial site with several (the MVTec AD protocol: one model per
    category, trained on that category's `train/good` only)."""

    name: str | None
    slide_ids: tuple[str, ...]  # every usable slide of the group, any split
    tile_paths: tuple[str, ...]  # their tile manifests

    def label(self, family: str) -> str:
        """The run's name: `ae_l2`, or `ae_l2/bottle` for one category."""
        return family if self.name is None else f"{family}/{self.name}"


# --- train -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochLoss:
    """One epoch's losses, as the trainer reported them."""

    epoch: int
    train_loss: float
    val_loss: float


@dataclass(frozen=True)
class TrainedModel:
    """A trained family's model folder and how it was trained (also its `fit_report.json`).

    `report` is the detector's fit report (for a diverged run, the history up to the failure;
    None when it diverged before one was kept). A diverged model is scored and logged so the
    failure is visible, and never promoted."""

    family: str
    model_dir: str
    supervision: str  # none | tile | slide
    train_tiles: int
    val_tiles: int
    config: dict[str, Any]  # the detector's config dataclass, as saved in config.json
    report: FitReport | None
    curves: tuple[EpochLoss, ...]
    diverged: bool = False
    train_slides: int | None = None  # slide-supervised families: bags trained on
    train_tumour_tiles: int | None = None  # tile-supervised families

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedFamily:
    """A family that could not train on this site (a labelled family without the labels)."""

    family: str
    reason: str


# --- score -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideScore:
    """Where a slide's scores went, and its slide-level score: the max of the heatmap, or, once
    scored with a tail-calibrated model, its tail score (`tasks/scoring/tail.py`)."""

    slide_id: str
    tiles: int
    slide_score: float
    heatmap: str  # .heatmap.tif (write_heatmap_tiff), float32, NaN where no tile was scored
    tile_scores: str  # .parquet: tile_id, score
    heatmap_downsample: int


# --- evaluate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideResult:
    """One test slide's row of an evaluation: its score and the call at the threshold."""

    slide_id: str
    split: str
    label: str  # normal / anomalous / unknown
    category: str
    score: float
    predicted: bool | None  # score > threshold; None without a calibrated threshold


@dataclass(frozen=True)
class Evaluated:
    """One scored run's evaluation: metrics, the per-slide table, plots, where its report is.

    `candidates` are the lesion candidates evaluation computed (FROC's inputs), handed to the
    exports so the files people open hold exactly what was scored."""

    name: str  # the family, or the run name (e.g. "batch-ae_l2")
    metrics: dict[str, float]
    froc_points: dict[str, float]
    threshold: float
    value_range: tuple[float, float]
    table: tuple[SlideResult, ...]
    report_dir: str
    plots: dict[str, str] = field(default_factory=dict)  # "ROC"/"FROC"/"PRO" -> PNG
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    # The slide score the threshold is on, per evaluated slide (val held out, and test): the
    # exports call slides with these (`aggregation.slide_score`), not the heatmap maximum.
    slide_scores: dict[str, float] = field(default_factory=dict)

    @property
    def all_metrics(self) -> dict[str, float]:
        """Metrics and FROC operating points together, as logged and checked."""
        return {**self.metrics, **self.froc_points}


# --- export ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """What a scored run's exports wrote: overlays, the report and the `scored.json` record
    (None when nothing was scored, so nothing was exported)."""

    name: str
    exports_dir: str
    report: str
    overlays: tuple[str, ...] = ()
    scored_run: str | None = None


# --- track -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run is tracked: the MLflow URI, the spool folder for when it is down, and the
    artifact root of a local store (None: the server decides)."""

    tracking_uri: str
    spool_dir: str
    artifact_root: str | None = None


@dataclass(frozen=True)
class PromotionDecision:
    """What the champion gate decided for one model version, and why."""

    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    value: float | None
    champion_version: str | None  # the champion before this decision, if there was one
    champion_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrackedFamily:
    """What tracking logged for one family: the run reference (`local-...` if spooled), the
    model URI (None if spooled), the champion gate's decision (None if spooled or not asked
    for), and whether anything went to the spool (then `vadflow tracking sync` sends it)."""

    run_id: str
    model_uri: str | None
    decision: PromotionDecision | None
    spooled: bool


# --- the flows' summaries ----------------------------------------------------------------


@dataclass(frozen=True)
class CategoryResult:
    """One category's model within a family's night (industrial sites with several)."""

    category: str
    metrics: dict[str, float]
    report: str  # report.html ("" when exports were skipped)
    model_dir: str
    diverged: bool
    promotion: PromotionDecision | None
    spooled: bool
    mlflow_run_id: str


@dataclass(frozen=True)
class FamilyResult:
    """One family's night: metrics, per-slide rows, where its files are, what tracking did.

    On a site with several categories `categories` holds each category's model and metrics,
    and `metrics` is their mean (the MVTec AD protocol's headline), plus `n_categories`."""

    family: str
    metrics: dict[str, float]
    table: tuple[SlideResult, ...]
    exports_dir: str  # overlays, lesion files
    report: str  # report.html
    model_dir: str
    diverged: bool
    promotion: PromotionDecision | None  # None when tracking was spooled
    spooled: bool
    mlflow_run_id: str
    categories: dict[str, CategoryResult] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        trained: TrainedModel,
        evaluated: Evaluated,
        exported: Exported,
        tracked: TrackedFamily,
    ) -> FamilyResult:
        """A trained family's result from its train, evaluate, export and track records."""
        return cls(
            family=trained.family,
            metrics=evaluated.metrics,
            table=evaluated.table,
            exports_dir=exported.exports_dir,
            report=exported.report,
            model_dir=trained.model_dir,
            diverged=trained.diverged,
            promotion=tracked.decision,
            spooled=tracked.spooled,
            mlflow_run_id=tracked.run_id,
        )

    @classmethod
    def of_categories(
        cls,
        family: str,
        parts: dict[str, tuple[TrainedModel, Evaluated, Exported, TrackedFamily]],
        exports_dir: str,
        model_dir: str,
    ) -> FamilyResult:
        """A family trained per category: each category's result, and their mean metrics."""
        categories = {
            name: CategoryResult(
                category=name,
                metrics=evaluated.metrics,
                report=exported.report,
                model_dir=trained.model_dir,
                diverged=trained.diverged,
                promotion=tracked.decision,
                spooled=tracked.spooled,
                mlflow_run_id=tracked.run_id,
            )
            for name, (trained, evaluated, exported, tracked) in parts.items()
        }
        table = tuple(row for _, evaluated, _, _ in parts.values() for row in evaluated.table)
        return cls(
            family=family,
            metrics=mean_metrics({n: c.metrics for n, c in categories.items()}),
            table=table,
            exports_dir=exports_dir,
            report="",
            model_dir=model_dir,
            diverged=any(c.diverged for c in categories.values()),
            promotion=None,  # each category's model has its own gate: see `categories`
            spooled=any(c.spooled for c in categories.values()),
            mlflow_run_id="",
            categories=categories,
        )


# Counts add up over categories; every other metric is averaged (the MVTec AD convention),
# but thresholds: each category's model has its own, and their mean would call nothing.
SUMMED_METRICS = frozenset({"n_test_slides", "n_test_anomalous"})
PER_MODEL_METRICS = frozenset({"threshold", "model_threshold"})


def mean_metrics(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the categories that computed it (NaN ones left out), counts
    summed, thresholds left out, and `n_categories`; a metric no category computed is NaN."""
    keys = [
        k
        for k in dict.fromkeys(k for m in per_category.values() for k in m)
        if k not in PER_MODEL_METRICS
    ]
    out: dict[str, float] = {}
    for key in keys:
        values = [m[key] for m in per_category.values() if key in m]
        finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
        if key in SUMMED_METRICS:
            out[key] = float(sum(finite))
        else:
            out[key] = float(sum(finite) / len(finite)) if finite else math.nan
    out["n_categories"] = float(len(per_category))
    return out


@dataclass(frozen=True)
class NightlySummary:
    """What the nightly flow returns: a FamilyResult per trained family, and the run's context."""

    site: str
    version: str
    families: dict[str, FamilyResult]
    skipped: dict[str, str]  # family -> why it did not train
    outputs: str  # the site's output folder
    quarantined: tuple[Quarantined, ...]
    no_tissue: tuple[str, ...]
    contracts_report: str
    tracking_uri: str
    parent_run_id: str
    gaps: LabelGaps = LabelGaps()  # test slides without a label, tumours without annotation
    exported: bool = True  # False: `--no-export`; `vadflow export` draws them later


@dataclass(frozen=True)
class BatchScoreSummary:
    """What the batch-scoring flow returns: the model used, what it scored and, with metrics,
    the evaluation; `record` is the run's `scored.json` (None when no slide was scored)."""

    site: str
    model: str
    model_dir: str
    scores: tuple[SlideScore, ...]
    metrics: dict[str, float]
    table: tuple[SlideResult, ...]
    exports: tuple[str, ...]  # overlay PNGs
    record: str | None
    quarantined: tuple[Quarantined, ...]
    no_tissue: tuple[str, ...]
    gaps: LabelGaps = LabelGaps()
