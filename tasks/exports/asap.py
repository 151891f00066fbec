"""Model predictions as ASAP XML, the format Camelyon16 annotations use, in a group of their
own.

Written with ``tasks.slides.annotations.write_asap_xml`` (level-0 pixels), so the files open in
ASAP beside a slide's ground truth without being mistaken for it: every prediction is in group
``vadflow``, never ``Tumor`` or Camelyon16's ``_0``/``_1``/``_2`` (a tool that merges or
rasterises those would count the model's output as a pathologist's). Region outlines and
candidate dots are in ``vadflow``; a region's holes in ``vadflow holes`` (ASAP has no holes:
its Camelyon16 convention, group ``_2``, is ground truth's, so ours are named for what they
are). Candidates are ASAP "Dot" annotations named with their calibrated probability and raw
score (ASAP has no measurement field).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.measure import points_in_poly

from vadflow.tasks.exports.probability import ProbabilityScale
from vadflow.tasks.scoring.aggregate import Candidate, Region
from vadflow.tasks.slides.annotations import Polygon, read_asap_xml, write_asap_xml

PREDICTION_GROUP = "vadflow"
HOLE_GROUP = "vadflow holes"
GROUND_TRUTH_GROUPS = frozenset({"tumor", "_0", "_1", "_2"})  # never written here
PREDICTION_COLOUR = "#ff8c00"  # the GeoJSON's Anomaly orange
_RAW = re.compile(r"raw=(\S+)")
_P = re.compile(r"p=(\S+)")


def region_polygons(regions: Sequence[Region]) -> list[Polygon]:
    """ASAP polygons of ``heatmap_regions``: outlines in ``vadflow``, holes in
    ``vadflow holes``.

    A hole with another region inside it (an island) is left out (its gap reads as anomalous),
    so a tool that subtracts holes never erases a detection. Rings are written open (ASAP
    closes them).
    """
    out: list[Polygon] = []
    firsts = np.array([r.outline[0] for r in regions]).reshape(-1, 2)
    for rank, region in enumerate(regions, start=1):
        out.append(Polygon(f"region {rank}", PREDICTION_GROUP, _open(region.outline)))
        for number, hole in enumerate(region.holes, start=1):
            if points_in_poly(firsts, hole).any():
                continue  # an island sits in this hole
            out.append(Polygon(f"region {rank} hole {number}", HOLE_GROUP, _open(hole)))
    return out


def _open(ring: np.ndarray) -> np.ndarray:
    ring = np.asarray(ring, dtype=np.float64)
    return ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring


def _dot_name(rank: int, raw: float, scale: ProbabilityScale) -> str:
    probability = scale.probability_of(raw)
    shown = "p=n/a" if probability is None else f"p={probability!r}"
    return f"candidate {rank} {shown} raw={float(raw)!r}"


def _recolour(path: Path) -> None:
    """write_asap_xml writes every annotation as a green Polygon: one-point candidates become
    Dots, and predictions take their own colour."""
    tree = ET.parse(path)
    root = tree.getroot()
    for node in root.iter("Annotation"):
        if node.get("PartOfGroup") in (PREDICTION_GROUP, HOLE_GROUP):
            node.set("Color", PREDICTION_COLOUR)
            if len(node.findall("Coordinates/Coordinate")) == 1:
                node.set("Type", "Dot")
    for node in root.iter("Group"):
        if node.get("Name") in (PREDICTION_GROUP, HOLE_GROUP):
            node.set("Color", PREDICTION_COLOUR)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def write_regions_asap(path: str | Path, regions: Sequence[Region]) -> Path:
    """Heatmap regions as an ASAP XML file (see ``region_polygons``)."""
    path = write_asap_xml(path, region_polygons(regions))
    _recolour(path)
    return path


def write_candidates_asap(
    path: str | Path,
    candidates: Sequence[Candidate],
    regions: Sequence[Region] = (),
    scale: ProbabilityScale | None = None,
) -> Path:
    """Candidates (x, y, raw score) as ASAP dots named "candidate <rank> p=<probability>
    raw=<raw score>" (``p=n/a`` where the model has no calibrated probability), plus any
    regions, all in group ``vadflow``."""
    scale = scale or ProbabilityScale(None, math.nan)
    dots = [
        Polygon(_dot_name(rank, raw, scale), PREDICTION_GROUP, np.array([[x, y]], np.float64))
        for rank, (x, y, raw) in enumerate(candidates, start=1)
    ]
    path = write_asap_xml(path, [*dots, *region_polygons(regions)])
    _recolour(path)
    return path


def read_candidates_asap(path: str | Path) -> list[Candidate]:
    """Candidates (x, y, raw score) back from ``write_candidates_asap``'s file, in file order
    (the probability in a name is for people; the raw score is what reads back exactly)."""
    out: list[Candidate] = []
    for polygon in read_asap_xml(path):
        if polygon.group != PREDICTION_GROUP or len(polygon.coords) != 1:
            continue
        found = _RAW.search(polygon.name) or _P.search(polygon.name)  # older files: p= only
        try:
            raw = float(found.group(1)) if found else math.nan
        except ValueError:
            raw = math.nan
        if math.isnan(raw):
            raise ValueError(f"{path}: candidate {polygon.name!r} has no raw=<number>")
        x, y = polygon.coords[0]
        out.append((float(x), float(y), raw))
    return out
