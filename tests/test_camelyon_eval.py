"""The Camelyon16 evaluation mask (75 um merging, filled holes, ITCs) and its FROC end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vadflow.tasks.evaluation.camelyon import (
    CAMELYON_DOWNSAMPLE,
    CAMELYON_MPP,
    evaluation_mask,
    evaluation_mask_from_annotations,
    read_camelyon_csv,
    write_camelyon_csv,
)
from vadflow.tasks.evaluation.froc import froc
from vadflow.tasks.slides.annotations import write_asap_xml

PIXEL_UM = CAMELYON_MPP * CAMELYON_DOWNSAMPLE  # 7.776 um per level-5 pixel
# Growth is distance < 75 / (2 * 7.776) = 4.82 px: a gap of g pixels closes when
# floor((g + 1) / 2) < 4.82, i.e. for g <= 8 (62 um); g = 10 (78 um) stays open.


def _two_blobs(gap_px: int, size_px: int = 40) -> np.ndarray:
    mask = np.zeros((80, 2 * size_px + gap_px + 40), dtype=bool)
    mask[20 : 20 + size_px, 20 : 20 + size_px] = True
    left = 20 + size_px + gap_px
    mask[20 : 20 + size_px, left : left + size_px] = True
    return mask


def test_annotations_closer_than_75um_merge() -> None:
    near = evaluation_mask(_two_blobs(gap_px=8))  # 62 um apart
    assert near.labels.max() == 1 and near.n_lesions == 1 and not near.itc
    far = evaluation_mask(_two_blobs(gap_px=12))  # 93 um apart
    assert far.labels.max() == 2 and far.n_lesions == 2
    # Each region grew by 4 px (31 um; 5 px would be 38.9 > 37.5) around its 40 px square.
    assert far.labels[20:60, 16].all() and not far.labels[20:60, 15].any()


def test_small_regions_are_itcs_measured_after_growth() -> None:
    mask = np.zeros((120, 120), dtype=bool)
    mask[20:60, 20:60] = True  # 311 um: a lesion
    mask[90:93, 90:93] = True  # 23 um, ~110 um once grown: an ITC
    em = evaluation_mask(mask)
    assert em.labels.max() == 2
    itc_label = int(em.labels[91, 91])
    assert em.itc == frozenset({itc_label}) and em.lesion_ids == [int(em.labels[40, 40])]
    # A region just long enough: 32 px (249 um) long and 1 px wide grows to a major axis of
    # about 40 px (311 um > 275): a lesion, although the annotation itself is shorter.
    line = np.zeros((60, 80), dtype=bool)
    line[30, 20:52] = True
    assert evaluation_mask(line).n_lesions == 1
    # 20 px (156 um) grows to about 28 px (218 um): still an ITC.
    short = np.zeros((60, 80), dtype=bool)
    short[30, 20:40] = True
    assert evaluation_mask(short).n_lesions == 0 and len(evaluation_mask(short).itc) == 1


def test_holes_are_filled_and_labels_8_connected() -> None:
    ring = np.zeros((100, 100), dtype=bool)
    ring[10:90, 10:90] = True
    ring[30:70, 30:70] = False  # a 40 px hole: wider than growth closes
    em = evaluation_mask(ring)
    assert em.labels.max() == 1 and (em.labels[30:70, 30:70] == 1).all()
    # Without growth, diagonal neighbours are still one region (connectivity=2).
    diagonal = np.zeros((60, 60), dtype=bool)
    diagonal[10:30, 10:30] = True
    diagonal[30:50, 30:50] = True
    assert evaluation_mask(diagonal, dilation_um=0.0, itc_um=0.0).labels.max() == 1


def test_other_downsample_same_physical_answer() -> None:
    """The mask at 16x (twice the resolution) gives the same lesions and ITCs."""
    mask32 = np.zeros((120, 160), dtype=bool)
    mask32[20:60, 20:60] = True
    mask32[20:60, 68:108] = True  # 8 px = 62 um gap: merges
    mask32[90:93, 130:133] = True  # ITC
    mask16 = np.kron(mask32, np.ones((2, 2), dtype=bool))
    for em in (evaluation_mask(mask32, 32), evaluation_mask(mask16, 16)):
        assert (em.labels.max(), em.n_lesions, len(em.itc)) == (2, 1, 1)


def test_empty_mask_has_no_lesions() -> None:
    em = evaluation_mask(np.zeros((10, 10), bool))
    assert em.labels.shape == (10, 10) and em.n_lesions == 0 and em.downsample == 32


def test_froc_on_evaluation_masks_end_to_end(tmp_path: Path) -> None:
    """Annotations -> evaluation mask -> submission CSVs -> FROC, with an ITC and a merge."""
    mpp = 0.25
    um = 1 / mpp  # level-0 px per um
    width = height = 8192

    def square(x0: float, y0: float, side_um: float) -> np.ndarray:
        s = side_um * um
        return np.array([[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s]])

    # Lesion A: two 400 um squares 40 um apart (one lesion); lesion B alone; C a 20 um ITC.
    a1, a2 = square(800, 800, 400), square(800 + 440 * um, 800, 400)
    b, c = square(5000, 5000, 500), square(800, 6000, 20)
    xml = write_asap_xml(tmp_path / "tumor_001.xml", [a1, a2, b, c])
    em = evaluation_mask_from_annotations(str(xml), width, height, mpp)
    assert em.downsample == 32 and (em.n_lesions, len(em.itc)) == (2, 1)

    detections = {
        "tumor_001": [
            (800 + 200 * um, 800 + 200 * um, 0.9),  # A, first half
            (800 + 640 * um, 800 + 200 * um, 0.95),  # A again, second half: A at 0.95
            (802 + 10 * um, 6002 + 10 * um, 0.99),  # on the ITC: ignored
            (7000, 500, 0.6),  # FP
            (5000 + 250 * um, 5000 + 250 * um, 0.5),  # B
        ],
        "normal_001": [(100, 100, 0.7)],
    }
    for slide, cands in detections.items():
        write_camelyon_csv(tmp_path / f"{slide}.csv", cands)
    read = {s: read_camelyon_csv(tmp_path / f"{s}.csv") for s in detections}
    assert [p for _, _, p in read["tumor_001"]] == [0.9, 0.95, 0.99, 0.6, 0.5]
    result = froc(read, {"tumor_001": em}, ["normal_001"])
    assert (result.n_ignored, result.n_false_positives, result.n_slides) == (2, 2, 2)
    # 0.95 -> (0 FP, 1/2); 0.7 -> (1/2, 1/2); 0.6 -> (1, 1/2); 0.5 -> (1, 1).
    assert list(result.avg_fps) == [0.0, 0.5, 1.0, 1.0]
    assert list(result.sensitivity) == [0.5, 0.5, 0.5, 1.0]
    assert result.score == pytest.approx((0.5 + 0.5 + 1 + 1 + 1 + 1) / 6)


def test_camelyon_csv_format(tmp_path: Path) -> None:
    path = write_camelyon_csv(tmp_path / "s.csv", [(10.7, 20.2, 0.123456789)])
    assert path.read_text() == "0.123456789,10,20\n"
    (tmp_path / "h.csv").write_text("Confidence,X,Y\n0.5,1,2\n\n")
    assert read_camelyon_csv(tmp_path / "h.csv") == [(1.0, 2.0, 0.5)]
    (tmp_path / "bad.csv").write_text("0.5,1,2\nx,y\n")
    with pytest.raises(ValueError, match="line 2"):
        read_camelyon_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="not finite"):
        write_camelyon_csv(tmp_path / "n.csv", [(1.0, 2.0, float("nan"))])
