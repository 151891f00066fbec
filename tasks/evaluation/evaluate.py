"""Turn slide heatmaps into predictions and metrics against whatever ground truth exists.

The decision threshold is calibrated on held-out normal (`val`) slides only, at the site's
target false-positive rate, so it never depends on test labels. Pathology sites get the
Camelyon16 metrics (slide AUC, official FROC); industrial sites the MVTec AD set (image AUROC,
pixel AUROC, PRO, F1-max). A random forest on heatmap features (Wang et al. 2016) is scored
out-of-fold when the test set holds at least two slides of each class.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from vadflow.tasks.evaluation.camelyon import DILATION_UM, ITC_MAJOR_AXIS_UM, evaluation_mask
from vadflow.tasks.evaluation.froc import FrocResult, froc
from vadflow.tasks.evaluation.metrics import f1_max, image_auroc, pixel_auroc, threshold_at_fpr
from vadflow.tasks.evaluation.pro import ProCurve, pro_curve, pro_score
from vadflow.tasks.scoring.aggregate import (
    candidate_spacing,
    cross_validated_forest,
    feature_table,
    lesion_candidates,
)
from vadflow.tasks.scoring.heatmap import load_heatmap
from vadflow.tasks.scoring.tail import (
    MIN_TAIL_NORMAL_SLIDES,
    SLIDE_SCORES,
    TailReference,
    TailSettings,
    slide_tail_scores,
)
from vadflow.tasks.slides.ground_truth import ground_truth_mask
from vadflow.tasks.tiling.qc import QC_DIR

log = logging.getLogger(__name__)
FROC_DOWNSAMPLE = 32  # the official evaluation mask is at level 5 (32x)


@dataclass(frozen=True)
class CandidateRule:
    """How lesion candidates are picked from a heatmap (the site's `candidates:` setting):
    one per `suppress_um` neighbourhood, the `max_per_slide` strongest, all above the floor."""

    suppress_um: float = 100.0
    max_per_slide: int | None = 100
    keep_artefacts: bool = False  # the site's `qc.keep_artefacts`: candidates under QC count

    def pick(
        self,
        heatmap: np.ndarray,
        downsample: int,
        floor: float,
        mpp: float | None,
        artefacts: np.ndarray | None = None,
    ) -> list[tuple[float, float, float]]:
        """Candidates (x, y, p) of one heatmap; unscored cells count as the floor. Cells under
        `artefacts` (the slide's QC mask, any size) give none unless `keep_artefacts`."""
        return lesion_candidates(
            np.nan_to_num(heatmap, nan=floor),
            downsample,
            floor,
            min_distance=candidate_spacing(self.suppress_um, mpp, downsample),
            max_candidates=self.max_per_slide,
            exclude=None if self.keep_artefacts else artefacts,
        )


@dataclass
class Evaluation:
    """Per-slide table (slide_id, split, label, score, predicted) and summary metrics."""

    table: pl.DataFrame
    metrics: dict[str, float]
    threshold: float
    froc_points: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    froc_result: FrocResult | None = None
    pro: ProCurve | None = None
    value_range: tuple[float, float] = (0.0, 1.0)
    slide_score: str = "max"  # the slide score `score` and `threshold` are on
    slide_scores: dict[str, float] = field(default_factory=dict)  # val (held out) and test
    tail_reference: TailReference | None = None  # normal val tiles, when slide_score is tail


def slide_threshold(val_scores: list[float], target_fpr: float) -> float:
    """Threshold on slide scores from held-out normal slides; NaN when there are none."""
    finite = [s for s in val_scores if np.isfinite(s)]
    if not finite:
        log.warning("no held-out normal slides scored: predictions have no calibrated threshold")
        return float("nan")
    return float(threshold_at_fpr(np.asarray(finite), target_fpr))


def heatmap_value_range(heatmaps: list[np.ndarray]) -> tuple[float, float]:
    """One scale for a whole run, from held-out normal heatmaps: median to maximum."""
    values = np.concatenate([h[np.isfinite(h)] for h in heatmaps] or [np.zeros(1)])
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(np.median(values)), float(values.max())
    return lo, hi if hi > lo else lo + 1.0


def evaluate_site(
    slides: pl.DataFrame,
    scores: dict[str, tuple[float, str]],
    heatmap_downsample: int,
    target_fpr: float,
    domain: str,
    itc_um: float = ITC_MAJOR_AXIS_UM,
    model_threshold: float | None = None,
    candidate_rule: CandidateRule | None = None,
    masks_dir: str | Path | None = None,
    slide_score: str = "max",
    tile_scores: Mapping[str, str | Path | pl.DataFrame] | None = None,
    tail: TailSettings | None = None,
    labelled: bool = False,
) -> Evaluation:
    """Metrics over the test slides of one model.

    `scores` maps slide_id -> (slide score, heatmap file: `load_heatmap`), for val and test slides.
    `slide_score` picks what the threshold and the slide metrics are on: `auto` (`tail` from
    two held-out normal slides up, else `max`; `max` for a `labelled` model, one that learned
    from lesion labels: its tile scores are a classifier's, with no outliers on normal tissue
    to count past), `max` (the heatmap
    maximum in `scores`), `tail` (`tasks.scoring.tail`: needs `tile_scores`, slide_id -> its
    `<slide>.tiles.parquet` or frame, and `tail` settings) or `forest` (the cross-validated
    forest, where labels allow; else `max`). Whenever it is not `max`, `slide_auroc_max`
    gives the maximum's slide AUC beside it.
    `scored_share` is the share of the test slides' pixels that got a score: of image pixels
    (industrial), of tissue (pathology: the tissue masks `masks_dir/<slide>.png`). Pixel
    metrics count every pixel the ground truth speaks for: an unscored one at the lowest score
    of the run, never dropped (industrial: every pixel; pathology: tissue, what was scored,
    and every lesion pixel). Lesion candidates follow `candidate_rule`.
    `threshold` is recalibrated on this site's val slides; `model_threshold`, the one the model
    was calibrated with at its own site, adds the calls it makes here (`model_sensitivity`,
    `model_specificity`): what a model moved to another site without recalibration would do.
    """
    if slide_score not in SLIDE_SCORES:
        raise ValueError(f"unknown slide_score {slide_score!r}; choose one of {SLIDE_SCORES}")
    rows = slides.filter(pl.col("slide_id").is_in(list(scores)))
    val_ids = rows.filter(pl.col("split") == "val")["slide_id"].to_list()
    value_range = heatmap_value_range([load_heatmap(scores[s][1]) for s in val_ids])
    test = rows.filter(pl.col("split") == "test").sort("slide_id")
    maxima = {s: float(scores[s][0]) for s in rows["slide_id"]}
    if slide_score == "auto" and labelled:
        slide_score = "max"
    chosen, used, reference = _chosen_slide_scores(
        slide_score, rows, scores, maxima, tile_scores, tail, value_range
    )
    threshold = slide_threshold([chosen[s] for s in val_ids], target_fpr)
    table = test.select("slide_id", "split", "label", "category").with_columns(
        pl.Series("score", [chosen[s] for s in test["slide_id"]], dtype=pl.Float64)
    )
    table = table.with_columns(
        predicted=pl.when(pl.lit(bool(np.isfinite(threshold))))
        .then(pl.col("score") > threshold)
        .otherwise(None)
    )
    known = table.filter(pl.col("label") != "unknown")
    labels = (known["label"] == "anomalous").to_numpy()
    metrics: dict[str, float] = {
        "n_test_slides": float(test.height),
        "n_test_anomalous": float(labels.sum()),
        "threshold": threshold,
    }
    if known.height:
        metrics["slide_auroc"] = image_auroc(labels, known["score"].to_numpy())
        if used != "max":
            metrics["slide_auroc_max"] = image_auroc(
                labels, np.array([maxima[s] for s in known["slide_id"]])
            )
        metrics["slide_f1_max"] = f1_max(labels, known["score"].to_numpy())[0]
        if np.isfinite(threshold):
            predicted = known["score"].to_numpy() > threshold
            metrics["slide_sensitivity"] = _rate(predicted[labels])
            metrics["slide_specificity"] = _rate(~predicted[~labels])
        if model_threshold is not None and np.isfinite(model_threshold):
            # The model's threshold is on the slide score scoring gave it (`scores`), which
            # for a tail-calibrated model is against the model's own normal reference.
            predicted = np.array([scores[s][0] for s in known["slide_id"]]) > model_threshold
            metrics["model_threshold"] = float(model_threshold)
            metrics["model_sensitivity"] = _rate(predicted[labels])
            metrics["model_specificity"] = _rate(~predicted[~labels])

    evaluation = Evaluation(
        table,
        metrics,
        threshold,
        value_range=value_range,
        slide_score=used,
        slide_scores=dict(chosen),
        tail_reference=reference,
    )
    heatmaps = {r["slide_id"]: load_heatmap(scores[r["slide_id"]][1]) for r in test.to_dicts()}
    tissue = {} if domain == "industrial" else _tissue_masks(test, masks_dir)
    artefacts = {} if domain == "industrial" else _tissue_masks(test, masks_dir, QC_DIR)
    metrics["scored_share"] = _scored_share(test, heatmaps, heatmap_downsample, tissue)
    labelled = test.filter(pl.col("label") != "unknown")
    # Ground truth declared missing (an anomalous slide without its annotation, a defective
    # image without its mask) is unknown, not "no lesion": the slide keeps its slide-level
    # label, but pixel metrics, PRO and FROC leave it out instead of counting its lesion as
    # normal tissue.
    located = labelled.filter(
        (pl.col("label") == "normal") | pl.col("annotation_uri").is_not_null()
    )
    metrics["n_pixel_slides"] = float(located.height)
    metrics["n_ground_truth_missing"] = float(labelled.height - located.height)
    heatmaps = {s: heatmaps[s] for s in labelled["slide_id"]}
    rule = candidate_rule or CandidateRule()
    _pixel_metrics(
        evaluation,
        located,
        {s: heatmaps[s] for s in located["slide_id"]},
        heatmap_downsample,
        domain,
        itc_um,
        rule,
        tissue,
        artefacts,
    )
    _forest_metrics(evaluation, labelled, heatmaps)
    return evaluation


def _chosen_slide_scores(
    kind: str,
    rows: pl.DataFrame,
    scores: Mapping[str, tuple[float, str]],
    maxima: dict[str, float],
    tile_scores: Mapping[str, str | Path | pl.DataFrame] | None,
    tail: TailSettings | None,
    value_range: tuple[float, float],
) -> tuple[dict[str, float], str, TailReference | None]:
    """Every slide's score of `kind`, the kind actually used (`max` where `kind` cannot be
    computed: no normal tiles for `tail`, too few labelled slides for `forest`), and the tail
    reference when there is one. `auto` is `tail` with tile scores and at least
    MIN_TAIL_NORMAL_SLIDES held-out normal slides, else `max`."""
    if kind == "auto":
        n_normal = rows.filter(pl.col("split") == "val").height
        enough = tile_scores is not None and n_normal >= MIN_TAIL_NORMAL_SLIDES
        kind = "tail" if enough else "max"
    if kind == "tail":
        if tile_scores is None:
            raise ValueError(
                "slide_score 'tail' needs the tile scores of every slide (tile_scores: "
                "slide_id -> <slide>.tiles.parquet); pass them or choose slide_score 'max'"
            )
        missing = [s for s in rows["slide_id"] if s not in tile_scores]
        if missing:
            raise ValueError(f"no tile scores for slides {missing[:5]} ({len(missing)} in all)")
        frames = {
            s: f if isinstance(f, pl.DataFrame) else pl.read_parquet(f)
            for s, f in tile_scores.items()
            if s in maxima
        }
        normal_ids = rows.filter(pl.col("split") == "val")["slide_id"].to_list()
        tail_scores, reference = slide_tail_scores(frames, normal_ids, tail)
        if reference is None:
            log.warning("no held-out normal tiles: slide scores fall back to the heatmap maximum")
            return maxima, "max", None
        return tail_scores, "tail", reference
    if kind == "forest":
        forest = _forest_slide_scores(rows, scores, value_range)
        if forest is None:
            log.warning("too few labelled test slides for the forest: slide scores are maxima")
            return maxima, "max", None
        return forest, "forest", None
    return maxima, "max", None


def _forest_slide_scores(
    rows: pl.DataFrame, scores: Mapping[str, tuple[float, str]], value_range: tuple[float, float]
) -> dict[str, float] | None:
    """Forest P(tumour) per slide: out-of-fold for labelled test slides, from the forest
    fitted on all of them for the rest (val slides, unlabelled ones); None below 2 + 2."""
    labelled = rows.filter((pl.col("split") == "test") & (pl.col("label") != "unknown"))
    labels = {r["slide_id"]: r["label"] == "anomalous" for r in labelled.to_dicts()}
    if min(sum(labels.values()), len(labels) - sum(labels.values())) < 2:
        return None
    heatmaps = {s: load_heatmap(scores[s][1]) for s in rows["slide_id"]}
    features = feature_table(heatmaps, (0.5, 0.9), value_range=value_range)
    inside = features.filter(pl.col("slide_id").is_in(list(labels)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forest = cross_validated_forest(inside, labels)
        rest = features.filter(~pl.col("slide_id").is_in(list(labels)))
        out = dict(zip(forest.slide_ids, map(float, forest.oof_probability), strict=True))
        if rest.height:
            out |= dict(zip(rest["slide_id"], map(float, forest.predict(rest)), strict=True))
    return out


def _tissue_masks(
    test: pl.DataFrame, masks_dir: str | Path | None, subfolder: str = ""
) -> dict[str, np.ndarray]:
    """The tissue masks tiling saved for the test slides (those found), as booleans; with
    `subfolder` "qc", the artefact QC masks (any QC label counts)."""
    if masks_dir is None:
        return {}
    out = {}
    for slide_id in test["slide_id"]:
        path = Path(masks_dir) / subfolder / f"{slide_id}.png"
        if path.is_file():
            out[slide_id] = np.asarray(Image.open(path).convert("L")) > 0
    return out


def _on_grid(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """`mask` sampled at the centres of a rows x cols grid laid over the same image."""
    r = np.minimum(((np.arange(rows) + 0.5) * mask.shape[0] / rows).astype(int), mask.shape[0] - 1)
    c = np.minimum(((np.arange(cols) + 0.5) * mask.shape[1] / cols).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(r, c)]


def _scored_share(
    test: pl.DataFrame,
    heatmaps: dict[str, np.ndarray],
    downsample: int,
    tissue: dict[str, np.ndarray],
) -> float:
    """Scored pixels over all pixels of the test slides (over tissue where a mask is given),
    counted at the resolution of the tissue mask or, without one, of the heatmap."""
    scored = total = 0
    for row in test.iter_rows(named=True):
        heatmap = heatmaps[row["slide_id"]]
        finite = np.isfinite(heatmap)
        mask = tissue.get(row["slide_id"])
        if mask is None:
            # Heatmap cells cover ceil(size / ds) cells; the last row and column may reach past
            # the image, so each counts the image pixels it covers.
            rows = np.minimum(downsample, row["height"] - np.arange(finite.shape[0]) * downsample)
            cols = np.minimum(downsample, row["width"] - np.arange(finite.shape[1]) * downsample)
            area = np.outer(rows, cols)
            scored += int(area[finite].sum())
            total += int(area.sum())
        else:
            covered = _on_grid(finite, *mask.shape)
            scored += int((covered & mask).sum())
            total += int(mask.sum())
    return scored / total if total else float("nan")


def _pixel_metrics(
    evaluation: Evaluation,
    annotated: pl.DataFrame,
    heatmaps: dict[str, np.ndarray],
    downsample: int,
    domain: str,
    itc_um: float,
    rule: CandidateRule,
    tissue: dict[str, np.ndarray],
    artefacts: dict[str, np.ndarray] | None = None,
) -> None:
    truths, maps, valid = [], [], []
    lesion_masks, candidates = {}, {}
    floor = evaluation.value_range[0]
    lowest = _lowest(heatmaps.values())
    for row in annotated.iter_rows(named=True):
        heatmap = heatmaps[row["slide_id"]]
        truth = ground_truth_mask(row["annotation_uri"], row["width"], row["height"], downsample)
        truth = truth[: heatmap.shape[0], : heatmap.shape[1]] > 0.5
        truths.append(truth)
        # An unscored pixel is the lowest score of the run: a missed defect counts as missed.
        maps.append(np.where(np.isfinite(heatmap), heatmap, lowest))
        if domain == "industrial":
            valid.append(np.ones(heatmap.shape, dtype=bool))  # every image pixel
        else:  # glass is no question the ground truth answers; tissue and lesions are
            counted = np.isfinite(heatmap) | truth
            if (mask := tissue.get(row["slide_id"])) is not None:
                counted |= _on_grid(mask, *heatmap.shape)
            valid.append(counted)
        if domain == "pathology":
            coarse = ground_truth_mask(
                row["annotation_uri"], row["width"], row["height"], FROC_DOWNSAMPLE
            )
            lesion_masks[row["slide_id"]] = evaluation_mask(
                coarse >= 0.5, FROC_DOWNSAMPLE, row["mpp"], dilation_um=DILATION_UM, itc_um=itc_um
            )
            qc = (artefacts or {}).get(row["slide_id"])
            candidates[row["slide_id"]] = rule.pick(heatmap, downsample, floor, row["mpp"], qc)
    if not any(t.any() for t in truths):
        return
    metrics = evaluation.metrics
    metrics["pixel_auroc"] = pixel_auroc(truths, maps, valid)
    if domain == "industrial":
        metrics["pro"] = pro_score(truths, maps, valid)
        evaluation.pro = pro_curve(truths, maps, valid)
        return
    normals = annotated.filter(pl.col("label") == "normal")["slide_id"].to_list()
    result = froc(candidates, lesion_masks, normals)
    evaluation.candidates = candidates
    evaluation.froc_result = result
    if result.n_lesions == 0:
        log.warning("every annotated lesion is an isolated tumour cell: FROC is undefined")
        return
    metrics["froc"] = float(result.score)
    evaluation.froc_points = {
        f"sens_at_{str(fp).replace('.', '_')}_fp": float(s) for fp, s in result.points().items()
    }


def _lowest(heatmaps) -> np.float32:
    """Just below the lowest score of any heatmap (0 when none has one)."""
    lows = [np.nanmin(h) for h in heatmaps if np.isfinite(h).any()]
    low = np.float32(min(lows)) if lows else np.float32(0.0)
    return np.nextafter(low, np.float32(-np.inf))


def _forest_metrics(
    evaluation: Evaluation, annotated: pl.DataFrame, heatmaps: dict[str, np.ndarray]
) -> None:
    """Out-of-fold slide AUC of a random forest on heatmap features, when labels allow it."""
    labels = {r["slide_id"]: r["label"] == "anomalous" for r in annotated.to_dicts()}
    positives = sum(labels.values())
    if positives < 2 or len(labels) - positives < 2:
        return
    features = feature_table(heatmaps, (0.5, 0.9), value_range=evaluation.value_range)
    forest = cross_validated_forest(features, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluation.metrics["slide_auroc_forest"] = image_auroc(
            np.array([labels[s] for s in features["slide_id"]]), forest.oof_probability
        )


def _rate(flags: np.ndarray) -> float:
    return float(flags.mean()) if flags.size else float("nan")
