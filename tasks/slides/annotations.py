"""ASAP XML annotations (the Camelyon16 format): read, write, and rasterise at a coarse level.

Coordinates are level-0 pixels, x to the right and y down. Camelyon16 puts lesions in groups
"Tumor", "_0" and "_1" and cut-outs (normal tissue inside a lesion) in "_2"; rasterising fills the
first and subtracts the second.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.draw import polygon as fill_polygon

from vadflow.tasks.slides.storage import split_member

POSITIVE_GROUPS = frozenset({"tumor", "tumour", "_0", "_1"})
HOLE_GROUPS = frozenset({"_2"})
# ASAP's default colours: yellow outlines for lesions, blue for exclusions.
_GROUP_COLOURS = {"_2": "#64FE2E"}
_DEFAULT_COLOUR = "#F4FA58"


@dataclass(frozen=True, eq=False)
class Polygon:
    """One ASAP annotation: its name, its group and its (N, 2) level-0 (x, y) vertices."""

    name: str
    group: str
    coords: np.ndarray  # (N, 2) float64, columns x, y

    @property
    def is_positive(self) -> bool:
        return self.group.lower() in POSITIVE_GROUPS

    @property
    def is_hole(self) -> bool:
        return self.group.lower() in HOLE_GROUPS


def write_asap_xml(
    path: str | Path, polygons: Sequence[np.ndarray | Polygon], group: str = "Tumor"
) -> Path:
    """Write polygons as an ASAP XML file that ASAP, QuPath importers and Camelyon tools open.

    Plain arrays go to `group`; `Polygon` objects keep their own group, so holes round-trip.
    """
    path = Path(path)
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    groups: list[str] = []
    for index, item in enumerate(polygons):
        if isinstance(item, Polygon):
            name, item_group, coords = item.name, item.group, item.coords
        else:
            name, item_group, coords = f"Annotation {index}", group, item
        coords = np.asarray(coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(
                f"{path.name}: polygon {index} has shape {coords.shape}; expected (N, 2) x, y"
            )
        if item_group not in groups:
            groups.append(item_group)
        node = ET.SubElement(
            annotations,
            "Annotation",
            Name=name,
            Type="Polygon",
            PartOfGroup=item_group,
            Color=_GROUP_COLOURS.get(item_group, _DEFAULT_COLOUR),
        )
        coord_parent = ET.SubElement(node, "Coordinates")
        for order, (x, y) in enumerate(coords):
            # repr() of a float is the shortest string that reads back to the same float.
            ET.SubElement(
                coord_parent, "Coordinate", Order=str(order), X=repr(float(x)), Y=repr(float(y))
            )
    group_parent = ET.SubElement(root, "AnnotationGroups")
    for name in groups:
        node = ET.SubElement(group_parent, "Group", Name=name, PartOfGroup="None", Color="#00ff00")
        ET.SubElement(node, "Attributes")
    tree = ET.ElementTree(root)
    ET.indent(tree, space="\t")
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path


def read_asap_xml(path: str | Path) -> list[Polygon]:
    """Every annotation in an ASAP XML file, vertices sorted by their Order attribute.

    Raises ValueError naming the file and the fault for anything that is not ASAP XML, so a bad
    annotation is caught at registration instead of turning into an empty ground truth.
    """
    archive, member = split_member(path)
    try:
        if member is None:
            root = ET.parse(Path(path)).getroot()
        else:  # Camelyon16 ships its test annotations as lesion_annotations.zip
            with zipfile.ZipFile(archive) as bundle, bundle.open(member) as handle:
                root = ET.parse(handle).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not well-formed XML ({exc})") from exc
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: cannot read it from the archive ({exc})") from exc
    if root.tag != "ASAP_Annotations":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <ASAP_Annotations>")
    out: list[Polygon] = []
    for index, node in enumerate(root.iter("Annotation")):
        name = node.get("Name", f"Annotation {index}")
        group = node.get("PartOfGroup", "None")
        coord_parent = node.find("Coordinates")
        if coord_parent is None:
            raise ValueError(f"{path}: annotation {name!r} has no <Coordinates> element")
        rows: list[tuple[float, float, float]] = []
        for order, coord in enumerate(coord_parent.iter("Coordinate")):
            try:
                # Some ASAP exports from comma-decimal locales write "123,5".
                x = float(coord.attrib["X"].replace(",", "."))
                y = float(coord.attrib["Y"].replace(",", "."))
                rank = float(coord.get("Order", order))
            except KeyError as exc:
                raise ValueError(
                    f"{path}: annotation {name!r}, coordinate {order} lacks attribute {exc}"
                ) from exc
            except ValueError as exc:
                raise ValueError(
                    f"{path}: annotation {name!r}, coordinate {order} is not a number ({exc})"
                ) from exc
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"{path}: annotation {name!r}, coordinate {order} is not finite")
            rows.append((rank, x, y))
        if not rows:
            raise ValueError(f"{path}: annotation {name!r} has no coordinates")
        rows.sort(key=lambda row: row[0])
        coords = np.array([(x, y) for _, x, y in rows], dtype=np.float64)
        out.append(Polygon(name=name, group=group, coords=coords))
    return out


def rasterize_annotations(
    polygons: Sequence[Polygon], width: int, height: int, downsample: float
) -> np.ndarray:
    """Lesion mask of shape (ceil(height / ds), ceil(width / ds)): positives minus `_2` holes.

    Drawn straight at the coarse grid, never at level 0. A coarse pixel is set when its centre,
    i.e. the centre of the block of level-0 pixels it covers, lies inside a polygon. Annotations in
    other groups, and those with fewer than 3 vertices (ASAP dots), are ignored.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    shape = (math.ceil(height / downsample), math.ceil(width / downsample))
    positive = np.zeros(shape, dtype=bool)
    holes = np.zeros(shape, dtype=bool)
    # Level-0 pixel centres sit on integers; coarse pixel j covers level-0 [j*ds, (j+1)*ds), whose
    # centre is j*ds + (ds-1)/2. Map vertices so that skimage's integer-centre test matches.
    offset = (downsample - 1.0) / 2.0
    for item in polygons:
        if item.coords.shape[0] < 3:
            continue
        target = positive if item.is_positive else holes if item.is_hole else None
        if target is None:
            continue
        cols = (item.coords[:, 0] - offset) / downsample
        rows = (item.coords[:, 1] - offset) / downsample
        rr, cc = fill_polygon(rows, cols, shape=shape)
        target[rr, cc] = True
    return positive & ~holes
