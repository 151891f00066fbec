"""ASAP XML: round trips, Camelyon16's groups and holes, rasterising, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vadflow.tasks.slides.annotations import (
    Polygon,
    rasterize_annotations,
    read_asap_xml,
    write_asap_xml,
)

# The shape of a real Camelyon16 file: a "_0" lesion with a "_2" cut-out, coordinates as floats.
CAMELYON_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
\t<Annotations>
\t\t<Annotation Name="_0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="100.0" Y="100.0" />
\t\t\t\t<Coordinate Order="2" X="900.0" Y="900.0" />
\t\t\t\t<Coordinate Order="1" X="900.0" Y="100.0" />
\t\t\t\t<Coordinate Order="3" X="100.0" Y="900.0" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="_1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="300" Y="300" />
\t\t\t\t<Coordinate Order="1" X="700" Y="300" />
\t\t\t\t<Coordinate Order="2" X="700" Y="700" />
\t\t\t\t<Coordinate Order="3" X="300" Y="700" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t</Annotations>
\t<AnnotationGroups>
\t\t<Group Name="_0" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
\t\t<Group Name="_2" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
\t</AnnotationGroups>
</ASAP_Annotations>
"""


def test_round_trip_keeps_coordinates_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    polygons = [rng.uniform(0, 1e5, (n, 2)) for n in (3, 17, 250)]
    path = write_asap_xml(tmp_path / "sub" / "slide.xml", polygons)
    assert path == tmp_path / "sub" / "slide.xml"
    back = read_asap_xml(path)
    assert [p.group for p in back] == ["Tumor"] * 3
    assert [p.name for p in back] == ["Annotation 0", "Annotation 1", "Annotation 2"]
    for original, read in zip(polygons, back, strict=True):
        np.testing.assert_array_equal(read.coords, original)
        assert read.is_positive and not read.is_hole


def test_polygon_objects_keep_their_group(tmp_path: Path) -> None:
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    items = [Polygon("lesion", "_1", square * 4), Polygon("cut", "_2", square + 8)]
    back = read_asap_xml(write_asap_xml(tmp_path / "a.xml", items))
    assert [(p.name, p.group) for p in back] == [("lesion", "_1"), ("cut", "_2")]
    assert back[1].is_hole and not back[1].is_positive


def test_camelyon_groups_sorting_and_holes(tmp_path: Path) -> None:
    path = tmp_path / "tumor_001.xml"
    path.write_text(CAMELYON_XML)
    lesion, hole = read_asap_xml(path)
    # Vertices come back in Order, not in file order.
    np.testing.assert_array_equal(lesion.coords, [[100, 100], [900, 100], [900, 900], [100, 900]])
    assert lesion.is_positive and hole.is_hole
    mask = rasterize_annotations([lesion, hole], width=1000, height=1000, downsample=10)
    assert mask.shape == (100, 100) and mask.dtype == bool
    assert mask[15, 15] and mask[85, 85]  # inside the lesion
    assert not mask[50, 50]  # inside the hole
    assert not mask[5, 5]  # outside
    # Area: 80x80 lesion cells minus 40x40 hole cells, give or take the boundary rows.
    assert abs(int(mask.sum()) - (80 * 80 - 40 * 40)) < 2 * 80 * 2


def test_rasterize_shape_is_ceiled_and_other_groups_ignored() -> None:
    square = np.array([[0, 0], [99, 0], [99, 99], [0, 99]], dtype=float)
    items = [
        Polygon("a", "Tumor", square),
        Polygon("b", "Other", square + 200),
        Polygon("dot", "Tumor", np.array([[500.0, 500.0]])),
    ]
    mask = rasterize_annotations(items, width=1001, height=333, downsample=16)
    assert mask.shape == (21, 63)
    assert mask[:6, :6].all()  # centres 7.5 .. 87.5 lie inside the 0..99 square
    assert mask.sum() == 36  # the other group and the dot add nothing
    empty = rasterize_annotations([], width=10, height=10, downsample=2.5)
    assert empty.shape == (4, 4) and not empty.any()


def test_rasterize_at_level_zero_matches_pixel_centres() -> None:
    triangle = Polygon("t", "Tumor", np.array([[0.0, 0.0], [9.0, 0.0], [0.0, 9.0]]))
    mask = rasterize_annotations([triangle], width=10, height=10, downsample=1)
    rows, cols = np.nonzero(mask)
    assert (rows + cols <= 9).all() and mask[0, 0] and mask[0, 9] and mask[9, 0]


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("<ASAP_Annotations><Annotations>", "not well-formed"),
        ("<Annotations/>", "expected <ASAP_Annotations>"),
        (
            '<ASAP_Annotations><Annotations><Annotation Name="x" PartOfGroup="Tumor">'
            "</Annotation></Annotations></ASAP_Annotations>",
            "no <Coordinates>",
        ),
        (
            '<ASAP_Annotations><Annotations><Annotation Name="x"><Coordinates>'
            '<Coordinate Order="0" X="1"/></Coordinates></Annotation></Annotations>'
            "</ASAP_Annotations>",
            "lacks attribute 'Y'",
        ),
        (
            '<ASAP_Annotations><Annotations><Annotation Name="x"><Coordinates>'
            '<Coordinate Order="0" X="1" Y="abc"/></Coordinates></Annotation></Annotations>'
            "</ASAP_Annotations>",
            "not a number",
        ),
        (
            '<ASAP_Annotations><Annotations><Annotation Name="x"><Coordinates/>'
            "</Annotation></Annotations></ASAP_Annotations>",
            "no coordinates",
        ),
    ],
)
def test_malformed_xml_names_the_file_and_the_fault(tmp_path: Path, text: str, fault: str) -> None:
    path = tmp_path / "broken_017.xml"
    path.write_text(text)
    with pytest.raises(ValueError, match="broken_017.xml") as info:
        read_asap_xml(path)
    assert fault in str(info.value)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing_here.xml"):
        read_asap_xml(tmp_path / "nothing_here.xml")
