"""One family at a time on the benchmark site: configure, fit, score and evaluate; the whole run.

Every family is configured by `family_settings`, the one path from settings to a detector
config that the nightly flow and the CLI use too.
"""

from __future__ import annotations

import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vadflow.tasks.benchmark.hard_site import SiteSize, build_hard_site
from vadflow.tasks.benchmark.tiles import BenchmarkData, load_benchmark_tiles, tile_auroc

if TYPE_CHECKING:
    from vadflow.tasks.site import SiteConfig

# Synthetic lesions are at most ~1 mm across on these small slides; Camelyon16's 275 um ITC rule
# would ignore most of them, so FROC here counts lesions from 10 um up (as the demo site does).
FROC_ITC_UM = 10.0
SCORES = ("residual", "latent", "combined")  # tasks/detectors/components/latent_density.py


@dataclass(frozen=True)
class BenchmarkRow:
    """One family's line of the results table; metrics are NaN when undefined or failed."""

    family: str
    tile_auroc: float
    slide_auc: float
    froc: float
    pixel_auroc: float
    seconds: float
    direction: str  # "ok", "inverted", "failed" (error says why) or "skipped" (needs labels)
    error: str = ""
    slide_auc_max: float = float("nan")  # slide AUC of the heatmap maximum, for comparison
    tile_auroc_qc: float = float("nan")  # tile AUROC over the tiles that passed artefact QC
    pro: float = float("nan")  # MVTec AU-PRO to FPR 0.3 (industrial sites)
    category: str = ""  # an industrial site's category the row's model is trained on


def score_and_evaluate(detector: Any, data: BenchmarkData, out_dir: Path) -> dict[str, float]:
    """Score every val and test slide into heatmaps and evaluate them as a nightly run does.

    Returns the pipeline's metrics (slide_auroc, froc, pixel_auroc, ...) plus tile_auroc from
    the same tile scores, and tile_auroc_qc over the tiles that passed artefact QC. The slide
    AUC is on the site's slide score (`auto`: the tail score of `tasks/scoring/tail.py` for the
    unsupervised families, the heatmap maximum for the labelled ones); `slide_auroc_max` is the
    maximum's beside it.
    """
    import polars as pl

    from vadflow.tasks.evaluation.evaluate import CandidateRule, evaluate_site
    from vadflow.tasks.scoring.heatmap import score_slide
    from vadflow.tasks.scoring.tail import TailSettings

    site = data.site
    scores, tile_scores, tile_files = {}, [], {}
    for row in data.slides.sort("slide_id").to_dicts():
        scored = score_slide(
            detector,
            row,
            data.manifests[row["slide_id"]],
            out_dir,
            site.tiling.heatmap_downsample,
        )
        scores[row["slide_id"]] = (scored.slide_score, scored.heatmap)
        tile_files[row["slide_id"]] = scored.tile_scores
        if row["split"] == "test":
            tile_scores.append(pl.read_parquet(scored.tile_scores))
    evaluation = evaluate_site(
        data.slides,
        scores,
        site.tiling.heatmap_downsample,
        site.target_fpr,
        site.domain,
        itc_um=FROC_ITC_UM,
        slide_score=site.aggregation.slide_score,
        labelled=getattr(detector, "supervision", "none") != "none",
        tile_scores=tile_files,
        tail=TailSettings.of_site(site),
        candidate_rule=CandidateRule(keep_artefacts=site.qc.keep_artefacts),
        masks_dir=data.masks_dir or None,
    )
    metrics = dict(evaluation.metrics)
    metrics.setdefault("slide_auroc_max", metrics.get("slide_auroc", float("nan")))
    by_tile = dict(pl.concat(tile_scores).select("tile_id", "score").iter_rows())
    test_ids = pl.concat([data.manifests[s] for s in data.test.slide_names])["tile_id"]
    ordered = np.array([by_tile[t] for t in test_ids], dtype=np.float64)
    if not np.isfinite(ordered).all():
        raise FloatingPointError(f"{int((~np.isfinite(ordered)).sum())} NaN tile scores")
    return {
        **metrics,
        "tile_auroc": tile_auroc(data.test, ordered),
        "tile_auroc_qc": tile_auroc(data.test, ordered, qc_passed=True),
    }


def benchmark_families() -> list[str]:
    """Every registered family: the unsupervised ones first, then the labelled baselines."""
    from vadflow.tasks.detectors.registry import available_families, detector_class

    def labelled(family: str) -> bool:
        return getattr(detector_class(family), "supervision", "none") != "none"

    return sorted(available_families(), key=labelled)


def checked_families(
    families: Sequence[str] | None, epochs_budget: int | None, score: str
) -> list[str]:
    """The families a benchmark runs (all registered ones when None), its budget and score
    checked before anything is built: UnknownFamilyError (a KeyError) names the valid families,
    ValueError a bad budget or score."""
    from vadflow.tasks.detectors.registry import check_family

    chosen = [check_family(f) for f in families] if families else benchmark_families()
    if epochs_budget is not None and epochs_budget < 1:
        raise ValueError(f"epochs_budget must be >= 1, got {epochs_budget}")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    return chosen


# `--robust` for the trained families: the trimmed loss leaves out this share of each batch's
# highest-loss tiles (`TrainingConfig.robust_trim_fraction`), the share robust mode drops in
# the feature families (their `contamination` default).
ROBUST_TRIM_FRACTION = 0.1


def benchmark_settings(
    family: str,
    *,
    epochs: int | None,
    tile_size: int,
    seed: int,
    device: str,
    score: str = "residual",
    features: str | None = None,
    robust: bool = False,
    site: SiteConfig | None = None,
) -> dict[str, Any]:
    """The same budget for every family, as `family_settings` builds it: the fields it has.

    `tile_size` is the site's (a shared setting); `epochs`, `seed`, `device` and `score` are the
    command's flags. `epochs` None keeps each family's own default epochs. `score` reaches the
    families with a latent space (their `score` field: residual, latent or combined); the others
    have no such field and ignore it; so does `features` (None: each family's default) reach
    the feature families only (patch_knn, padim: filters, cnn, both or imagenet). `site` is the
    benchmark site (None: none): its domain's defaults and its `detectors.<family>`
    entry sit between the two, as in a nightly run.
    """
    from vadflow.tasks.detectors.settings import family_settings

    flags = {"epochs": epochs, "seed": seed, "device": device, "score": score}
    return family_settings(
        family,
        shared={"tile_size": tile_size},
        domain=site.domain if site is not None else None,
        site=site.detectors.get(family) if site is not None else None,
        flags={
            **flags,
            "features": features,
            "robust": True if robust else None,
            "robust_trim_fraction": ROBUST_TRIM_FRACTION if robust else None,
        },
    )


def configured_detector(family: str, **shared: Any) -> Any:
    """A fresh detector of `family` with those of `shared` its config has (families differ in
    fields: `epochs` means nothing to padim); the throughput benchmark builds them this way."""
    from vadflow.tasks.detectors.registry import create_detector
    from vadflow.tasks.detectors.settings import family_settings

    return create_detector(family, **family_settings(family, shared=shared))


def fit_family(detector: Any, supervision: str, data: BenchmarkData) -> None:
    """Fit on what the family learns from: the benchmark's normal tiles, or the labelled tiles
    or slide bags the nightly flow's train stage reads (NoTrainingLabels, a LookupError, when
    the site has none)."""
    from vadflow.tasks.training.train import training_set

    if supervision == "none":
        detector.fit(data.train, data.val, slides=data.train_tile_slides)
    else:
        training_set(supervision, data.site, data.slides_path, data.tile_paths).fit(detector, None)


def run_family(
    family: str,
    data: BenchmarkData,
    *,
    epochs: int | None,
    tile_size: int,
    seed: int,
    device: str,
    score: str = "residual",
    features: str | None = None,
    robust: bool = False,
) -> BenchmarkRow:
    """Fit one family, score and evaluate the slides; failures and missing labels become a row."""
    from vadflow.tasks.detectors.registry import create_detector, detector_class

    started = time.perf_counter()
    nan = float("nan")
    supervision = getattr(detector_class(family), "supervision", "none")
    budget = benchmark_settings(
        family,
        epochs=epochs,
        tile_size=tile_size,
        seed=seed,
        device=device,
        score=score,
        features=features,
        robust=robust,
        site=data.site,
    )
    # A row names the variant the family took: "fanogan (latent)", "patch_knn (imagenet)".
    asked = {"score": None if score == "residual" else score, "features": features}
    variant = [v for k, v in asked.items() if v is not None and budget.get(k) == v]
    if robust and (budget.get("robust") or budget.get("robust_trim_fraction")):
        variant.append("robust")
    family_label = f"{family} ({', '.join(variant)})" if variant else family
    try:
        detector = create_detector(family, **budget)
        fit_family(detector, supervision, data)
        with (
            tempfile.TemporaryDirectory(prefix=f"vadflow-{family}-") as scratch,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            metrics = score_and_evaluate(detector, data, Path(scratch))
    except LookupError as exc:
        return BenchmarkRow(family_label, nan, nan, nan, nan, 0.0, "skipped", str(exc))
    except Exception as exc:  # one broken family must not hide the others' results
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        return BenchmarkRow(
            family=family_label,
            tile_auroc=nan,
            slide_auc=nan,
            froc=nan,
            pixel_auroc=nan,
            seconds=time.perf_counter() - started,
            direction="failed",
            error=f"{type(exc).__name__}: {exc} ({where})",
        )
    tile = metrics["tile_auroc"]
    return BenchmarkRow(
        family_label,
        tile,
        metrics.get("slide_auroc", nan),
        metrics.get("froc", nan),
        metrics.get("pixel_auroc", nan),
        time.perf_counter() - started,
        "inverted" if tile < 0.5 else "ok",
        slide_auc_max=metrics.get("slide_auroc_max", nan),
        tile_auroc_qc=metrics.get("tile_auroc_qc", nan),
        pro=metrics.get("pro", nan),
    )


def benchmark_detectors(
    families: Sequence[str] | None = None,
    size: str | SiteSize = "small",
    epochs_budget: int | None = 3,
    seed: int = 0,
    *,
    tile_size: int = 64,
    device: str = "auto",
    score: str = "residual",
    features: str | None = None,
    contamination: float = 0.0,
    robust: bool = False,
    out_dir: Path | None = None,
    show: bool = True,
) -> list[BenchmarkRow]:
    """Train every family (or `families`) on one hard synthetic site with the same budget.

    `epochs_budget` None trains each family at its own default epochs (its configured budget)
    instead of one shared number. `score` picks how the families with a latent space score
    (residual, latent, combined); `features` which patch features the feature families compare
    (filters, cnn, both, imagenet; None: their default). `contamination` replaces that share of
    the normal training slides by unlabelled tumour slides (`contaminated_training`); `robust`
    turns on the robust modes: patch_knn's and padim's (the patches farthest from every other
    training slide's left out of the memory bank or the Gaussian) and the trained families'
    trimmed loss (ROBUST_TRIM_FRACTION).

    Returns one row per family and, with `show`, prints the table. A labelled family on a site
    without the labels it needs gets a "skipped" row. The site is written under `out_dir` (a
    temporary folder, removed afterwards, when None).
    """
    from vadflow.tasks.benchmark.table import format_table, print_table

    chosen = checked_families(families, epochs_budget, score)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vadflow-benchmark-") as scratch:
        root = Path(out_dir) if out_dir is not None else Path(scratch)
        site = build_hard_site(root, size, seed)
        data = load_benchmark_tiles(site, tile_size, root / "work", contamination)
        if show and data.contaminated:
            print(
                f"benchmark: {len(data.contaminated)} of {len(data.train_slides)} training "
                f"slides are unlabelled tumour slides: {', '.join(data.contaminated)}",
                flush=True,
            )
        for family in chosen:
            if show:
                print(f"benchmark: {family} ({len(rows) + 1}/{len(chosen)})", flush=True)
            row = run_family(
                family,
                data,
                epochs=epochs_budget,
                tile_size=tile_size,
                seed=seed,
                device=device,
                score=score,
                features=features,
                robust=robust,
            )
            rows.append(row)
            if show:  # each result as it lands: the slow families take tens of minutes on CPU
                print(format_table([row]).splitlines()[-1], flush=True)
    if show:
        print_table(rows, data, size=size, epochs=epochs_budget)
    return rows
