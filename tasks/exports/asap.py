"""Lesion candidates and heatmap regions as ASAP XML, the format Camelyon16 annotations use.

Written with ``tasks.slides.annotations.write_asap_xml`` (level-0 pixels), so the files read
back with ``read_asap_xml`` and rasterise with ``rasterize_annotations`` like any annotation:
region outlines go to group "Tumor" and their holes to "_2" (Camelyon16's cut-out group);
candidates are ASAP "Dot" annotations in group "Candidates", named with their probability
(ASAP has no measurement field).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.measure import points_in_poly

from vadflow.tasks.scoring.aggregate import Candidate, Region
from vadflow.tasks.slides.annotations import Polygon, read_asap_xml, write_asap_xml

CANDIDATE_GROUP = "Candidates"
REGION_GROUP = "Tumor"
HOLE_GROUP = "_2"


def region_polygons(regions: Sequence[Region]) -> list[Polygon]:
    """ASAP polygons of ``heatmap_regions``: outlines in "Tumor", holes in "_2".

    ASAP tools subtract "_2" polygons from every lesion, so a hole with another region inside
    it (an island) would erase that region: such a hole is left out (its gap reads as tumour)
    rather than lose a detection. Rings are written open (ASAP closes them).
    """
    out: list[Polygon] = []
    firsts = np.array([r.outline[0] for r in regions]).reshape(-1, 2)
    for rank, region in enumerate(regions, start=1):
        out.append(Polygon(f"region {rank}", REGION_GROUP, _open(region.outline)))
        for number, hole in enumerate(region.holes, start=1):
            if points_in_poly(firsts, hole).any():
                continue  # an island sits in this hole
            out.append(Polygon(f"region {rank} hole {number}", HOLE_GROUP, _open(hole)))
    return out


def _open(ring: np.ndarray) -> np.ndarray:
    ring = np.asarray(ring, dtype=np.float64)
    return ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring


def write_regions_asap(path: str | Path, regions: Sequence[Region]) -> Path:
    """Heatmap regions as an ASAP XML file (see ``region_polygons``)."""
    return write_asap_xml(path, region_polygons(regions))


def write_candidates_asap(
    path: str | Path, candidates: Sequence[Candidate], regions: Sequence[Region] = ()
) -> Path:
    """Candidates as ASAP dots named "candidate <rank> p=<probability>", plus any regions."""
    dots = [
        Polygon(f"candidate {rank} p={p!r}", CANDIDATE_GROUP, np.array([[x, y]], dtype=np.float64))
        for rank, (x, y, p) in enumerate(candidates, start=1)
    ]
    path = write_asap_xml(path, [*dots, *region_polygons(regions)])
    # write_asap_xml writes every annotation as a Polygon; one-point candidates are Dots.
    tree = ET.parse(path)
    for node in tree.getroot().iter("Annotation"):
        if node.get("PartOfGroup") == CANDIDATE_GROUP:
            node.set("Type", "Dot")
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path


def read_candidates_asap(path: str | Path) -> list[Candidate]:
    """Candidates (x, y, p) back from ``write_candidates_asap``'s file, in file order."""
    out: list[Candidate] = []
    for polygon in read_asap_xml(path):
        if polygon.group != CANDIDATE_GROUP:
            continue
        _, _, p = polygon.name.rpartition("p=")
        try:
            probability = float(p)
        except ValueError as exc:
            raise ValueError(f"{path}: candidate {polygon.name!r} has no p=<number>") from exc
        x, y = polygon.coords[0]
        out.append((float(x), float(y), probability))
    return out
