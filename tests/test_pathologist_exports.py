"""What a pathologist opens (#23): calibrated probabilities beside raw scores, predictions
(not ground truth) in QuPath and ASAP files, overlays coloured only above the threshold, and
contract pages that render offline."""

from __future__ import annotations

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vadflow.tasks.evaluation.camelyon import read_camelyon_csv, write_camelyon_csv
from vadflow.tasks.evaluation.froc import froc
from vadflow.tasks.evaluation.metrics import image_auroc
from vadflow.tasks.exports.asap import GROUND_TRUTH_GROUPS, write_candidates_asap
from vadflow.tasks.exports.geojson import export_slide_geojson
from vadflow.tasks.exports.overlay import BAR_STRIP_PX, heatmap_overlay
from vadflow.tasks.exports.probability import (
    ProbabilityScale,
    prediction_cut,
    raw_at_probability,
)
from vadflow.tasks.exports.render import predicted_candidates
from vadflow.tasks.exports.report import SlideSection, write_html_report
from vadflow.tasks.scoring.aggregate import heatmap_regions, lesion_candidates
from vadflow.tasks.scoring.tail import TailReference

RNG = np.random.default_rng(7)
NORMAL_TILES = RNG.gamma(2.0, 1.5, size=3000)  # raw scores of normal validation tiles


def _scale(cut: float = math.nan) -> ProbabilityScale:
    return ProbabilityScale(TailReference.fit(NORMAL_TILES), cut)


def _heatmap() -> np.ndarray:
    hm = np.full((12, 16), 1.0)
    hm[0, :] = np.nan  # unscored (glass)
    hm[2, 3] = 30.0  # far beyond every normal tile
    hm[6:9, 8:12] = 12.0  # a lesion region
    hm[10, 1] = 4.0  # an ordinary normal-looking peak
    return hm


def test_probability_is_monotone_in_unit_range_and_inverts() -> None:
    scale = _scale()
    raw = np.linspace(-5, 200, 4001)
    p = scale.probability(raw)
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.diff(p) > 0)
    for q in (0.001, 0.2, 0.5, 0.8, 0.99, 0.99999):
        assert scale.probability([raw_at_probability(scale.reference, q)])[0] == pytest.approx(q)
    # Without a reference there is no probability, and no raw score passes for one.
    assert np.isnan(ProbabilityScale(None, 1.0).probability([3.0])).all()
    assert ProbabilityScale(None, 1.0).probability_of(3.0) is None
    # The prediction level: the threshold itself on a `max` calibration, the unlikely-tile
    # level (probability 1 - alpha) on a `tail` one, none on a kind it does not apply to.
    reference = scale.reference
    assert prediction_cut("max", 9.5, reference, 0.2) == 9.5
    tail_cut = prediction_cut("tail", 3.1, reference, 0.2)
    assert reference.probability([tail_cut])[0] == pytest.approx(0.8)
    assert math.isnan(prediction_cut("forest", 0.7, None, 0.2))


def test_a_slide_baseline_moves_a_slides_probabilities_and_tail_cut_with_it() -> None:
    """With a reference fitted on aligned slides, a slide whose tissue all scores 3 higher
    reads its raw scores 3 lower: the export shows the tiles its slide call counted."""
    slides = [RNG.gamma(2.0, 1.5, size=600) + offset for offset in (-0.5, 0.0, 0.5)]
    reference = TailReference.fit_slides(slides, baseline=0.1)
    tail_cut = prediction_cut("tail", 3.1, reference, 0.05)
    scale = ProbabilityScale(reference, tail_cut)
    slide = slides[1] + 3.0
    moved = scale.for_slide(slide, cut_is_tail=True)
    offset = reference.slide_offset(slide)
    assert offset == pytest.approx(3.0, abs=0.6)
    assert moved.cut == pytest.approx(tail_cut + offset)
    raw = np.array([2.0, 6.0, 12.0])
    assert np.allclose(moved.probability(raw + offset), scale.probability(raw))
    assert np.allclose(moved.probability(slide), 1.0 - reference.slide_p_values(slide))
    assert scale.for_slide(slide, cut_is_tail=False).cut == tail_cut  # a `max` cut stays
    assert _scale(1.0).for_slide(slide, cut_is_tail=True) == _scale(1.0)  # no baseline


def test_camelyon_csv_probabilities_keep_froc_and_auroc(tmp_path: Path) -> None:
    scale = _scale()
    lesions = np.zeros((12, 16), np.int32)
    lesions[6:9, 8:12] = 1
    raw = {"t": lesion_candidates(_heatmap(), 32.0, 0.0), "n": [(40.0, 40.0, 9.0)]}
    as_p = {}
    for slide, cands in raw.items():
        p = scale.probability([c[2] for c in cands])
        path = write_camelyon_csv(
            tmp_path / f"{slide}.csv", [(x, y, q) for (x, y, _), q in zip(cands, p, strict=True)]
        )
        as_p[slide] = read_camelyon_csv(path)
        assert all(0.0 <= c[2] <= 1.0 for c in as_p[slide])  # Camelyon16's p is a probability
    masks = {"t": (lesions, 32.0)}
    before, after = froc(raw, masks, ["n"]), froc(as_p, masks, ["n"])
    assert after.score == pytest.approx(before.score)
    assert after.sensitivities == pytest.approx(before.sensitivities)
    scores = np.array([c[2] for c in raw["t"]] + [9.0])
    labels = np.arange(scores.size) % 2 == 0
    assert image_auroc(labels, scale.probability(scores)) == image_auroc(labels, scores)


def _check_qupath_feature(feature: dict, object_type: str) -> None:
    """QuPath's GeoJSON object form: a Feature with a geometry and the properties its
    importer reads (objectType, classification name and RGB colour, numeric measurements)."""
    assert feature["type"] == "Feature"
    assert feature["geometry"]["type"] in ("Point", "Polygon")
    props = feature["properties"]
    assert props["objectType"] == object_type
    assert props["classification"]["name"] == "Anomaly"
    colour = props["classification"]["color"]
    assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
    measurements = props["measurements"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in measurements.values())
    assert 0.0 <= measurements["anomaly_probability"] <= 1.0 and "raw_score" in measurements


@pytest.mark.parametrize("object_type", ["detection", "annotation"])
def test_geojson_holds_predictions_above_the_threshold_as_qupath_objects(
    tmp_path: Path, object_type: str
) -> None:
    cut = raw_at_probability(_scale().reference, 0.99)
    scale = _scale(cut)
    hm = _heatmap()
    every = lesion_candidates(np.nan_to_num(hm, nan=0.0), 32.0, 0.0)
    shown = predicted_candidates(every, scale)
    assert 0 < len(shown) < len(every)  # the ordinary peak at raw 4 is no prediction
    points, regions = export_slide_geojson(
        tmp_path,
        "s",
        shown,
        regions=heatmap_regions(hm, 32.0, cut),
        scale=scale,
        object_type=object_type,
        mpp=0.5,
    )
    features = json.loads(points.read_text())["features"]
    assert len(features) == len(shown)
    for feature in features:
        _check_qupath_feature(feature, object_type)
        m = feature["properties"]["measurements"]
        assert m["raw_score"] > cut
        assert m["anomaly_probability"] == pytest.approx(scale.probability_of(m["raw_score"]))
    outlines = json.loads(regions.read_text())["features"]
    assert [f["geometry"]["type"] for f in outlines] == ["Polygon", "Polygon"]
    for feature in outlines:
        _check_qupath_feature(feature, object_type)
    lesion = outlines[1]["properties"]["measurements"]  # strongest first: the 30 peak leads
    assert lesion["raw_score"] == 12.0 and lesion["area_um2"] == 12 * 32 * 32 * 0.25
    with pytest.raises(ValueError, match="object type 'cell'"):
        export_slide_geojson(tmp_path, "s", shown, scale=scale, object_type="cell")


def test_asap_predictions_never_use_ground_truth_groups(tmp_path: Path) -> None:
    scale = _scale(8.0)
    hm = _heatmap()
    cands = predicted_candidates(lesion_candidates(np.nan_to_num(hm, nan=0.0), 32.0, 0.0), scale)
    path = write_candidates_asap(tmp_path / "s.xml", cands, heatmap_regions(hm, 32.0, 8.0), scale)
    root = ET.parse(path).getroot()
    groups = {a.get("PartOfGroup") for a in root.iter("Annotation")}
    groups |= {g.get("Name") for g in root.iter("Group")}
    assert groups == {"vadflow"} and not {g.lower() for g in groups} & GROUND_TRUTH_GROUPS
    dots = [a.get("Name") for a in root.iter("Annotation") if a.get("Type") == "Dot"]
    assert len(dots) == len(cands) and all(re.search(r"p=0\.\d+ raw=", d) for d in dots)


def test_overlay_is_transparent_below_the_threshold_and_coloured_by_probability(
    tmp_path: Path,
) -> None:
    slide = tmp_path / "slide.png"
    Image.new("RGB", (512, 384), (235, 215, 230)).save(slide)
    cut = raw_at_probability(_scale().reference, 0.95)
    hm = _heatmap().astype(np.float32)
    truth = np.zeros_like(hm)
    truth[6:9, 8:12] = 1.0
    thumb = tmp_path / "thumb.png"
    png = heatmap_overlay(
        str(slide),
        hm,
        32,
        tmp_path / "overlay.png",
        0.0,
        40.0,
        truth,
        scale=_scale(cut),
        thumbnail_png=thumb,
    )
    with Image.open(png) as image, Image.open(thumb) as plain:
        pixels, base = np.asarray(image.convert("RGB")).astype(int), np.asarray(plain).astype(int)
    assert pixels.shape[1] == base.shape[1] + BAR_STRIP_PX
    zoom = base.shape[0] // hm.shape[0]

    def cell(row: int, col: int) -> np.ndarray:  # the centre pixel of a heatmap cell
        return pixels[row * zoom + zoom // 2, col * zoom + zoom // 2]

    def plain_cell(row: int, col: int) -> np.ndarray:
        return base[row * zoom + zoom // 2, col * zoom + zoom // 2]

    for row, col in ((0, 5), (4, 4), (10, 1)):  # unscored glass, normal tissue, a weak peak
        assert np.array_equal(cell(row, col), plain_cell(row, col))
    for row, col in ((2, 3), (7, 9)):  # above the threshold: coloured
        assert np.abs(cell(row, col) - plain_cell(row, col)).max() > 20
    # Colour grows with probability (inferno: brighter towards 1).
    assert cell(2, 3).sum() > cell(7, 9).sum()
    # Annotated lesions are outlined in green.
    assert (pixels[..., :BAR_STRIP_PX] == (0, 255, 0)).all(axis=-1).any()


def test_report_shows_each_slide_call_probability_regions_and_side_by_side(
    tmp_path: Path,
) -> None:
    thumb, overlay = tmp_path / "t.png", tmp_path / "o.png"
    Image.new("RGB", (64, 48), (200, 180, 190)).save(thumb)
    Image.new("RGB", (64, 48), (250, 120, 0)).save(overlay)
    region = {
        "rank": 1,
        "anomaly_probability": 0.998,
        "raw_score": 12.0,
        "x": 320,
        "y": 240,
        "area_um2": 3072.0,
    }
    report = write_html_report(
        tmp_path / "report.html",
        "site / run",
        [{"slide_id": "tumour_1", "score": 30.0}],
        {},
        sections=[
            SlideSection(
                "tumour_1", "anomalous", 30.0, 30.0, 0.9994, [region], str(thumb), str(overlay)
            ),
            SlideSection("old_model", "normal", 2.0, 2.0, None, [], str(thumb), str(overlay)),
        ],
    )
    text = report.read_text()
    section = text[text.index('id="slide-tumour_1"') :]
    assert "anomalous" in section and "probability 0.999" in section and "0.998" in section
    assert section.index("<figure>") < section.index("</section>")
    pair = section[section.index('<div class="pair">') : section.index("</div>")]
    assert pair.count("<figure>") == 2  # thumbnail | overlay
    assert "no calibrated probability" in text[text.index('id="slide-old_model"') :]


def test_data_docs_render_offline_and_name_their_asset(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_validation import _slides  # the contract tests' valid slide manifest

    from vadflow.tasks.validation.report import write_stage_report
    from vadflow.tasks.validation.stage import validate_stage

    stage = validate_stage("slide_manifest", _slides(), mode="strict", report_dir=None)
    index = write_stage_report(stage, tmp_path)
    for page in (index, tmp_path / "slide_manifest.gx.html"):
        text = page.read_text()
        assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", text), page.name
        assert not re.search(r"url\(\s*[\"']?(?:https?:)?//", text), page.name
    gx = (tmp_path / "slide_manifest.gx.html").read_text()
    assert "Data asset: slide_manifest" in gx and "Data asset: None" not in gx
    assert ".card-header" in gx  # our stylesheet is inlined in the CDN's place
