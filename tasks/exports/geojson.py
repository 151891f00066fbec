"""Model predictions as QuPath GeoJSON (File > Import objects): what the model found, never
ground truth.

A FeatureCollection whose coordinates are level-0 pixels with the origin at the top-left of
the full-resolution image, which is what QuPath reads and writes. Each feature carries
QuPath's own properties: ``objectType`` (``detection`` by default, so predictions stay apart
from a pathologist's annotations and are not edited by accident; ``annotation`` where a lab
wants to edit them), a ``classification`` of class ``Anomaly`` with its RGB colour, and
``measurements`` (name -> number, QuPath 0.4+) with the calibrated ``anomaly_probability``
beside the ``raw_score``. A model without a calibrated probability writes no
``anomaly_probability`` (JSON has no NaN) and says so in each object's name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vadflow.tasks.exports.probability import ProbabilityScale
from vadflow.tasks.scoring.aggregate import Candidate, Region, heatmap_regions

ANOMALY_CLASS = "Anomaly"  # a class of our own: never QuPath's "Tumor", which is ground truth
ANOMALY_RGB = (255, 140, 0)  # orange: apart from QuPath's red Tumor and the green outlines
OBJECT_TYPES = ("detection", "annotation")
NO_SCALE = ProbabilityScale(None, math.nan)


def check_object_type(object_type: str) -> str:
    """``object_type`` when QuPath objects of that type are written; ValueError otherwise."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(
            f"QuPath object type {object_type!r} is not one of {', '.join(OBJECT_TYPES)}"
        )
    return object_type


def _properties(
    name: str, object_type: str, raw: float, scale: ProbabilityScale, extra: dict[str, float]
) -> dict[str, Any]:
    probability = scale.probability_of(raw)
    measurements: dict[str, float] = {}
    if probability is None:
        name += " (no calibrated probability: the model has no tail reference)"
    else:
        measurements["anomaly_probability"] = probability
    measurements["raw_score"] = float(raw)
    measurements.update(extra)
    return {
        "objectType": check_object_type(object_type),
        "name": name,
        "classification": {"name": ANOMALY_CLASS, "color": list(ANOMALY_RGB)},
        "isLocked": False,
        "measurements": measurements,
    }


def _ring(ring: np.ndarray) -> list[list[float]]:
    ring = np.asarray(ring, dtype=np.float64)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])  # GeoJSON rings are closed
    return [[float(x), float(y)] for x, y in ring]


def _feature(geometry: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def candidates_geojson(
    candidates: Sequence[Candidate],
    scale: ProbabilityScale = NO_SCALE,
    object_type: str = "detection",
) -> dict[str, Any]:
    """Candidates (x, y, raw score) as Point objects of class Anomaly, in the given order,
    with ``anomaly_probability`` (from ``scale``) and ``raw_score`` measurements. Which
    candidates to write (those above the model's threshold, or all) is the caller's choice."""
    features = []
    for rank, (x, y, raw) in enumerate(candidates, start=1):
        probability = scale.probability_of(raw)
        shown = f"p={probability:.3f}" if probability is not None else f"raw={raw:.4g}"
        features.append(
            _feature(
                {"type": "Point", "coordinates": [float(x), float(y)]},
                _properties(f"candidate {rank} ({shown})", object_type, raw, scale, {}),
            )
        )
    return {"type": "FeatureCollection", "features": features}


def region_area_um2(region: Region, mpp: float | None) -> float | None:
    """A region's area in square micrometres (None without the slide's level-0 mpp)."""
    return region.area * mpp * mpp if mpp else None


def regions_geojson(
    regions: Sequence[Region],
    scale: ProbabilityScale = NO_SCALE,
    object_type: str = "detection",
    mpp: float | None = None,
    omitted: int = 0,
) -> dict[str, Any]:
    """Heatmap regions (``heatmap_regions``) as Polygon objects of class Anomaly, holes kept
    as inner rings.

    Measurements: ``anomaly_probability`` and ``raw_score`` of the region's strongest
    location, ``mean_raw_score``, ``area_level0_px2`` and, given the slide's ``mpp``,
    ``area_um2``. ``omitted``: weaker regions left out (``strongest_regions``' cap); when
    there are any, the collection's ``properties`` say how many (QuPath ignores them).
    """
    features = []
    for rank, region in enumerate(regions, start=1):
        extra = {
            "mean_raw_score": float(region.mean_probability),  # raw, whatever aggregate calls it
            "area_level0_px2": float(region.area),
        }
        area = region_area_um2(region, mpp)
        if area is not None:
            extra["area_um2"] = float(area)
        features.append(
            _feature(
                {
                    "type": "Polygon",
                    "coordinates": [_ring(region.outline), *(_ring(h) for h in region.holes)],
                },
                _properties(
                    f"anomaly region {rank}", object_type, region.max_probability, scale, extra
                ),
            )
        )
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if omitted:
        collection["properties"] = {
            "regions_written": len(features),
            "regions_omitted": int(omitted),
            "note": f"the {len(features)} strongest of {len(features) + omitted} regions; "
            "weaker ones are left out so a noisy heatmap stays a file one can open",
        }
    return collection


def write_geojson(path: str | Path, collection: dict[str, Any]) -> Path:
    """Write a FeatureCollection as UTF-8 JSON; the folder is created when missing."""
    if collection.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: expected a FeatureCollection, got {collection.get('type')!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: QuPath's JSON reader rejects NaN, so a NaN here is a bug to hear about.
    path.write_text(json.dumps(collection, allow_nan=False), encoding="utf-8")
    return path


def export_slide_geojson(
    out_dir: str | Path,
    slide_id: str,
    candidates: Sequence[Candidate],
    heatmap: np.ndarray | None = None,
    downsample: float | None = None,
    threshold: float | None = None,
    regions: Sequence[Region] | None = None,
    *,
    scale: ProbabilityScale = NO_SCALE,
    object_type: str = "detection",
    mpp: float | None = None,
    regions_omitted: int = 0,
) -> list[Path]:
    """``<slide>.candidates.geojson``, and ``<slide>.regions.geojson`` when given a heatmap
    (or its ``regions``, already outlined with ``heatmap_regions``).

    Regions are the heatmap's 8-connected areas strictly above ``threshold`` (a raw level);
    the heatmap's ``downsample`` maps them to level 0. ``regions_omitted``: how many weaker
    regions the caller left out of ``regions`` (said in the file's properties).
    """
    out = Path(out_dir)
    points = candidates_geojson(candidates, scale, object_type)
    written = [write_geojson(out / f"{slide_id}.candidates.geojson", points)]
    if regions is None and heatmap is not None:
        if downsample is None or threshold is None:
            raise ValueError(f"{slide_id}: regions need the heatmap's downsample and a threshold")
        regions = heatmap_regions(heatmap, downsample, threshold)
    if regions is not None:
        outlines = regions_geojson(regions, scale, object_type, mpp, regions_omitted)
        written.append(write_geojson(out / f"{slide_id}.regions.geojson", outlines))
    return written
