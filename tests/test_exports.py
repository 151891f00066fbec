"""Exports people open: QuPath GeoJSON, ASAP XML, the HTML report, overlays with a colour bar."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from matplotlib import colormaps
from PIL import Image

from vadflow.tasks.evaluation.froc import froc
from vadflow.tasks.evaluation.plots import plot_froc, plot_pro, plot_roc
from vadflow.tasks.evaluation.pro import pro_curve
from vadflow.tasks.exports.asap import (
    read_candidates_asap,
    region_polygons,
    write_candidates_asap,
    write_regions_asap,
)
from vadflow.tasks.exports.geojson import (
    candidates_geojson,
    export_slide_geojson,
    regions_geojson,
    write_geojson,
)
from vadflow.tasks.exports.overlay import BAR_STRIP_PX, heatmap_overlay, with_colour_bar
from vadflow.tasks.exports.report import write_html_report
from vadflow.tasks.scoring.aggregate import heatmap_regions, lesion_candidates
from vadflow.tasks.slides.annotations import Polygon, rasterize_annotations, read_asap_xml


def _heatmap() -> np.ndarray:
    hm = np.zeros((12, 16))
    hm[2, 3] = 0.9  # a peak
    hm[2:4, 8:11] = 0.7  # a block
    hm[6:10, 2:6] = 0.8  # a ring ...
    hm[7:9, 3:5] = 0.0  # ... with a 2x2 hole
    return hm


def test_geojson_candidates_parse_back_in_level0(tmp_path: Path) -> None:
    cands = lesion_candidates(_heatmap(), downsample=32.0, threshold=0.5)
    path = write_geojson(tmp_path / "s.geojson", candidates_geojson(cands))
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(cands)
    first = data["features"][0]
    # Heatmap pixel (row 2, col 3) at 32x: level-0 centre (3.5 * 32, 2.5 * 32).
    assert first["geometry"] == {"type": "Point", "coordinates": [112.0, 80.0]}
    props = first["properties"]
    assert props["objectType"] == "detection"  # predictions, not a pathologist's annotations
    assert props["classification"]["name"] == "Anomaly"
    # No tail reference: the raw score only, and the name says why there is no probability.
    assert props["measurements"] == {"raw_score": 0.9}
    assert "no calibrated probability" in props["name"]


def test_geojson_regions_are_closed_polygons_with_holes(tmp_path: Path) -> None:
    regions = heatmap_regions(_heatmap(), 16.0, 0.5)
    data = json.loads(json.dumps(regions_geojson(regions)))
    geometries = [f["geometry"] for f in data["features"]]
    assert [g["type"] for g in geometries] == ["Polygon"] * 3
    for g in geometries:
        for ring in g["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4
    ring_region = next(f for f in data["features"] if len(f["geometry"]["coordinates"]) == 2)
    outer = np.array(ring_region["geometry"]["coordinates"][0])
    # The ring covers heatmap cols 2..5, rows 6..9: level-0 x [32, 96), y [96, 160).
    assert (outer[:, 0].min(), outer[:, 0].max()) == (32.0, 96.0)
    assert (outer[:, 1].min(), outer[:, 1].max()) == (96.0, 160.0)
    assert ring_region["properties"]["measurements"]["area_level0_px2"] == 12 * 256
    written = export_slide_geojson(tmp_path, "s1", [(1.0, 2.0, 0.5)], _heatmap(), 16.0, 0.5)
    assert [p.name for p in written] == ["s1.candidates.geojson", "s1.regions.geojson"]
    with pytest.raises(ValueError, match="downsample"):
        export_slide_geojson(tmp_path, "s1", [], _heatmap())


def test_geojson_regions_capped_say_how_many_were_left_out(tmp_path: Path) -> None:
    from vadflow.tasks.scoring.aggregate import strongest_regions

    found = strongest_regions(_heatmap(), 16.0, 0.5, max_regions=2)
    assert found.total == 3 and found.omitted == 1
    assert [r.max_probability for r in found.regions] == [0.9, 0.8]  # the strongest kept
    written = export_slide_geojson(
        tmp_path, "s1", [], regions=found.regions, regions_omitted=found.omitted
    )
    data = json.loads(written[1].read_text())
    assert len(data["features"]) == 2
    assert data["properties"]["regions_written"] == 2
    assert data["properties"]["regions_omitted"] == 1
    assert "properties" not in regions_geojson(heatmap_regions(_heatmap(), 16.0, 0.5))


def test_asap_candidates_round_trip(tmp_path: Path) -> None:
    cands = [(112.0, 80.5, 0.9), (10.25, 20.0, 1 / 3)]
    path = write_candidates_asap(tmp_path / "c.xml", cands)
    assert read_candidates_asap(path) == cands
    annotations = list(ET.parse(path).getroot().iter("Annotation"))
    assert {a.get("Type") for a in annotations} == {"Dot"}
    assert {a.get("PartOfGroup") for a in annotations} == {"vadflow"}
    # Dots are ignored when the file is rasterised as a lesion annotation.
    assert not rasterize_annotations(read_asap_xml(path), 256, 256, 16).any()


def test_asap_regions_rasterise_back_to_the_heatmap_mask(tmp_path: Path) -> None:
    hm = _heatmap()
    ds = 16
    path = write_regions_asap(tmp_path / "r.xml", heatmap_regions(hm, ds, 0.5))
    polygons = read_asap_xml(path)
    # Predictions in their own groups, never ground truth's Tumor / _0 / _1 / _2.
    assert sorted({p.group for p in polygons}) == ["vadflow", "vadflow holes"]
    # A ground-truth reader ignores them ...
    assert not rasterize_annotations(polygons, hm.shape[1] * ds, hm.shape[0] * ds, ds).any()
    # ... and, read as truth on purpose, they are exactly the heatmap's regions.
    mask = rasterize_annotations(_as_truth(polygons), hm.shape[1] * ds, hm.shape[0] * ds, ds)
    assert np.array_equal(mask, hm > 0.5)


def _as_truth(polygons: list[Polygon]) -> list[Polygon]:
    """Predictions relabelled as Camelyon16 ground truth: outlines Tumor, holes _2."""
    group = {"vadflow": "Tumor", "vadflow holes": "_2"}
    return [Polygon(p.name, group[p.group], p.coords) for p in polygons]


def test_asap_hole_with_an_island_keeps_the_island() -> None:
    hm = np.zeros((9, 9))
    hm[1:8, 1:8] = 0.8
    hm[2:7, 2:7] = 0.0  # hole ...
    hm[4, 4] = 0.9  # ... with an island
    polygons = region_polygons(heatmap_regions(hm, 16.0, 0.5))
    assert [p.group for p in polygons] == ["vadflow", "vadflow"]  # the hole is left out
    mask = rasterize_annotations(_as_truth(polygons), 9 * 16, 9 * 16, 16)
    assert mask[4, 4] and mask[1:8, 1:8].all()


def test_plots_and_report_are_self_contained(tmp_path: Path) -> None:
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    roc = plot_roc(labels, scores, tmp_path / "roc.png", title="slide ROC")
    lesions = np.zeros((8, 8), np.int32)
    lesions[1:3, 1:3] = 1
    result = froc({"t": [(20.0, 20.0, 0.9), (120.0, 120.0, 0.5)]}, {"t": (lesions, 16.0)}, [])
    froc_png = plot_froc(result, tmp_path / "froc.png")
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    pro_png = plot_pro(
        pro_curve([mask], [mask + 0.1 * np.arange(36).reshape(6, 6)]), tmp_path / "pro.png"
    )
    for png in (roc, froc_png, pro_png):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 300
    table = pl.DataFrame(
        {
            "slide_id": ["test_001", "test_<2>"],
            "label": ["anomalous", "normal"],
            "score": [0.9, float("nan")],
        }
    )
    report = write_html_report(
        tmp_path / "report" / "index.html",
        "ae_l2 on site-a",
        table,
        {"slide_auroc": 0.875, "froc": result.score},
        plots={"ROC": roc, "FROC": froc_png},
        overlays={"test_001": roc},
        notes=["threshold 0.42 from 3 held-out normal slides"],
    )
    text = report.read_text()
    assert "<table>" in text and "test_001" in text and "test_&lt;2&gt;" in text
    assert "slide_auroc" in text and "0.875" in text and "n/a" in text
    assert "threshold 0.42" in text
    uris = text.split('src="data:image/png;base64,')[1:]  # the plots: line art stays PNG
    assert len(uris) == 2 and 'src="roc.png' not in text
    decoded = base64.b64decode(uris[0].split('"')[0])
    with Image.open(io.BytesIO(decoded)) as image:
        assert image.format == "PNG"
    photos = text.split('src="data:image/jpeg;base64,')[1:]  # the overlays: JPEG
    assert len(photos) == 1
    with Image.open(io.BytesIO(base64.b64decode(photos[0].split('"')[0]))) as image:
        assert image.format == "JPEG"


def test_colour_bar_strip() -> None:
    image = Image.new("RGB", (200, 150), (10, 20, 30))
    out = with_colour_bar(image, vmin=0.0, vmax=2.0)
    assert out.size == (200 + BAR_STRIP_PX, 150)
    pixels = np.asarray(out)
    assert (pixels[:, :200] == (10, 20, 30)).all()  # the image itself is untouched
    x = 200 + 18  # inside the bar
    top, bottom = pixels[24, x], pixels[150 - 13, x]
    inferno = colormaps["inferno"]
    assert np.abs(top.astype(int) - np.array(inferno(1.0)[:3]) * 255).max() <= 3
    assert np.abs(bottom.astype(int) - np.array(inferno(0.0)[:3]) * 255).max() <= 3


def test_heatmap_overlay_has_a_colour_bar(tmp_path: Path) -> None:
    slide = tmp_path / "slide.png"
    Image.new("RGB", (256, 192), (230, 200, 220)).save(slide)
    hm = np.full((12, 16), np.nan, dtype=np.float32)
    hm[2:6, 2:6] = 1.0
    with_bar = heatmap_overlay(str(slide), hm, 16, tmp_path / "a.png", 0.0, 1.0)
    without = heatmap_overlay(str(slide), hm, 16, tmp_path / "b.png", 0.0, 1.0, colour_bar=False)
    with Image.open(with_bar) as a, Image.open(without) as b:
        assert a.width == b.width + BAR_STRIP_PX and a.height == b.height
