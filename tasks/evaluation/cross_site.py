"""Cross-site evaluation: how much a model loses when it leaves the site it was trained at.

A model trained at one hospital lost about 20 % AUC at another in Camelyon16. Two views:

- `transfer` (no Prefect, no MLflow): train a family on site A's normal tiles and measure tile
  AUROC at A and at B, with a stain normalisation or without, so the effect of normalisation
  or augmentation on the drop can be measured on the same detector and seed
  (tests/test_cross_site.py).
- `metric_drops`: the pipeline's view, used by `vadflow evaluate SITE_B --model champion@A`:
  the champion's metrics at home (as its training run logged them) against the same metrics
  measured at B, and the drop of each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vadflow.tasks.evaluation.metrics import image_auroc
from vadflow.tasks.normalise.stain import make_normaliser
from vadflow.tasks.site import load_site
from vadflow.tasks.slides.discover import discover
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.slides.tiles import load_tiles
from vadflow.tasks.tiling.grid import tile_slide

INTERIOR_FRACTION = 0.9
LESION_FRACTION = 0.25  # a test tile is a lesion tile from here; partly covered ones are left out
TARGET_FPR = 0.05  # the home threshold: this quantile of home's held-out normal tile scores
# Metrics that describe the evaluation set or are recalibrated per site: listed, no drop.
NO_DROP_PREFIXES = ("n_", "threshold")


@dataclass(frozen=True)
class SiteTiles:
    """Normal training tiles and labelled test tiles of one site, as uint8 arrays."""

    train: np.ndarray  # (N, H, W, 3)
    test: np.ndarray  # (M, H, W, 3)
    test_labels: np.ndarray  # (M,) bool: lesion covers at least LESION_FRACTION of the tile


def site_tiles(site_dir: Path, work_dir: Path, max_train: int = 2000) -> SiteTiles:
    """Tile a site's slides and read its normal training tiles and labelled test tiles."""
    site = load_site(site_dir)
    frames, uris = [], {}
    for source in discover(site.source, site.domain, 0.0):
        row = register_slide(source, site.name, site.domain, site.mpp_override)
        if row["status"] != "ok":
            continue
        result = tile_slide(row, site.tiling, site.domain, work_dir / "tiles", work_dir / "masks")
        frame = pl.read_parquet(result.manifest).with_columns(pl.lit(row["label"]).alias("label"))
        frames.append(frame)
        uris[row["slide_id"]] = row["uri"]
    if not frames:
        raise ValueError(f"site {site.name} at {site_dir}: no readable slides to tile")
    # Interior tiles only: tissue edges against glass dominate a residual score otherwise.
    tiles = pl.concat(frames).filter(pl.col("tissue_fraction") >= INTERIOR_FRACTION)
    train = tiles.filter((pl.col("split") == "train") & (pl.col("label") == "normal"))
    train = train.sample(n=min(max_train, train.height), seed=0)
    test = tiles.filter(
        (pl.col("split") == "test")
        & ((pl.col("label_fraction") >= LESION_FRACTION) | (pl.col("label_fraction") == 0))
    )
    return SiteTiles(
        load_tiles(train.drop("label"), uris),
        load_tiles(test.drop("label"), uris),
        (test["label_fraction"] >= LESION_FRACTION).to_numpy(),
    )


@dataclass(frozen=True)
class TransferResult:
    """Tile AUROC at home and away, and how often normal tiles pass the home threshold."""

    normalisation: str
    auroc_home: float  # trained and tested at site A
    auroc_away: float  # trained at A, tested at B
    fpr_home: float  # share of A's normal test tiles above the threshold calibrated at A
    fpr_away: float  # the same for B's normal test tiles: what a deployment at B would see

    @property
    def drop(self) -> float:
        return self.auroc_home - self.auroc_away


def transfer(
    home: SiteTiles,
    away: SiteTiles,
    family: str,
    normalisation: str,
    overrides: dict[str, Any] | None = None,
) -> TransferResult:
    """Train `family` at home (normalised to home's own reference), score home and away.

    A tenth of home's training tiles is held out: the detector validates on it and the
    threshold is its (1 - TARGET_FPR) quantile, as the pipeline calibrates on held-out normals.
    """
    from vadflow.tasks.detectors.registry import create_detector

    normaliser = make_normaliser(normalisation).fit(home.train)
    detector = create_detector(family, **(overrides or {}))
    train = normaliser.transform(home.train)
    split = max(1, len(train) // 10)
    detector.fit(train[split:], train[:split])
    held_out = detector.score(train[:split]).tile_score.numpy()
    threshold = float(np.quantile(held_out, 1.0 - TARGET_FPR))

    def measure(tiles: SiteTiles) -> tuple[float, float]:
        scores = detector.score(normaliser.transform(tiles.test)).tile_score.numpy()
        normal = scores[~tiles.test_labels]
        return image_auroc(tiles.test_labels, scores), float((normal > threshold).mean())

    (auroc_home, fpr_home), (auroc_away, fpr_away) = measure(home), measure(away)
    return TransferResult(normalisation, auroc_home, auroc_away, fpr_home, fpr_away)


@dataclass(frozen=True)
class MetricDrop:
    """One metric of a model at its home site and at another site."""

    metric: str
    home: float | None  # None: the home run did not log it
    away: float

    @property
    def drop(self) -> float | None:
        """home - away: positive when the model is worse away (for higher-is-better metrics).
        None without a home value, and for counts and the per-site threshold."""
        if self.home is None or self.metric.startswith(NO_DROP_PREFIXES):
            return None
        return self.home - self.away


def metric_drops(home: Mapping[str, Any], away: Mapping[str, Any]) -> list[MetricDrop]:
    """Every finite numeric metric measured away, with its home value where home logged it."""
    rows = []
    for key, value in away.items():
        if not _finite(value):
            continue
        base = home.get(key)
        rows.append(MetricDrop(key, float(base) if _finite(base) else None, float(value)))
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
