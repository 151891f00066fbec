"""Lesion candidates and heatmap regions as QuPath GeoJSON (File > Import objects).

A FeatureCollection whose coordinates are level-0 pixels with the origin at the top-left of
the full-resolution image, which is what QuPath reads and writes. Each feature is an
annotation with a classification (name and RGB colour) and a ``measurements`` object
(name -> number, QuPath 0.4+), so probabilities show in QuPath's measurement tables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vadflow.tasks.scoring.aggregate import Candidate, Region, heatmap_regions

TUMOUR_CLASS = "Tumor"  # QuPath's built-in class name
TUMOUR_RGB = (200, 0, 0)


def _properties(name: str, classification: str, measurements: dict[str, float]) -> dict:
    return {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": classification, "color": list(TUMOUR_RGB)},
        "measurements": measurements,
    }


def _ring(ring: np.ndarray) -> list[list[float]]:
    ring = np.asarray(ring, dtype=np.float64)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])  # GeoJSON rings are closed
    return [[float(x), float(y)] for x, y in ring]


def candidates_geojson(
    candidates: Sequence[Candidate], classification: str = TUMOUR_CLASS
) -> dict[str, Any]:
    """Candidates (x, y, p) as Point annotations with a ``probability`` measurement."""
    features = []
    for rank, (x, y, p) in enumerate(candidates, start=1):
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
                "properties": _properties(
                    f"candidate {rank} (p={p:.3g})", classification, {"probability": float(p)}
                ),
            }
        )
    return {"type": "FeatureCollection", "features": features}


def regions_geojson(
    regions: Sequence[Region], classification: str = TUMOUR_CLASS
) -> dict[str, Any]:
    """Heatmap regions (``heatmap_regions``) as Polygon annotations, holes kept as inner rings.

    Measurements: ``max probability``, ``mean probability`` and ``area (level-0 px^2)``.
    """
    features = []
    for rank, region in enumerate(regions, start=1):
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_ring(region.outline), *(_ring(h) for h in region.holes)],
                },
                "properties": _properties(
                    f"region {rank} (max p={region.max_probability:.3g})",
                    classification,
                    {
                        "max probability": region.max_probability,
                        "mean probability": region.mean_probability,
                        "area (level-0 px^2)": region.area,
                    },
                ),
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: dict[str, Any]) -> Path:
    """Write a FeatureCollection as UTF-8 JSON; the folder is created when missing."""
    if collection.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: expected a FeatureCollection, got {collection.get('type')!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(collection), encoding="utf-8")
    return path


def export_slide_geojson(
    out_dir: str | Path,
    slide_id: str,
    candidates: Sequence[Candidate],
    heatmap: np.ndarray | None = None,
    downsample: float | None = None,
    threshold: float | None = None,
    regions: Sequence[Region] | None = None,
) -> list[Path]:
    """``<slide>.candidates.geojson``, and ``<slide>.regions.geojson`` when given a heatmap
    (or its ``regions``, already outlined with ``heatmap_regions``).

    Regions are the heatmap's 8-connected areas strictly above ``threshold``; the heatmap's
    ``downsample`` maps them to level 0.
    """
    out = Path(out_dir)
    written = [
        write_geojson(out / f"{slide_id}.candidates.geojson", candidates_geojson(candidates))
    ]
    if regions is None and heatmap is not None:
        if downsample is None or threshold is None:
            raise ValueError(f"{slide_id}: regions need the heatmap's downsample and a threshold")
        regions = heatmap_regions(heatmap, downsample, threshold)
    if regions is not None:
        written.append(write_geojson(out / f"{slide_id}.regions.geojson", regions_geojson(regions)))
    return written
