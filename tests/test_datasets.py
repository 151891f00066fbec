"""Public datasets read as they are released: Camelyon16 and Camelyon17 folder layouts.

Each layout is built with its real folder and file names (and the releases' label files as
they are written, header or not); the slide files are placeholders, since discovery reads only
names, label files and annotations.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.corpus import write_pyramid
from vadflow.tasks.slides.annotations import read_asap_xml, write_asap_xml
from vadflow.tasks.slides.discover import (
    discover,
    label_gaps,
    nothing_to_train_on,
    train_test_copies,
)
from vadflow.tasks.slides.ground_truth import ground_truth_mask
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.slides.storage import local_path

SQUARE = np.array([[100, 100], [300, 100], [300, 300], [100, 300]], dtype=np.float64)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placeholder for " + path.name.encode())


def camelyon16(root: Path, zipped: bool) -> Path:
    """`training/{normal,tumor}`, `training/lesion_annotations`, `testing/images`, the header-less
    `testing/reference.csv`, and the test annotations as a folder or as the zip they ship in."""
    for n in (1, 2):
        _touch(root / "training" / "normal" / f"normal_{n:03d}.tif")
        _touch(root / "training" / "tumor" / f"tumor_{n:03d}.tif")
        write_asap_xml(root / "training" / "lesion_annotations" / f"tumor_{n:03d}.xml", [SQUARE])
    reference = {1: "Tumor,Macro,Primary", 2: "Normal,None,None", 3: "Tumor,Micro,Primary"}
    for n in reference:
        _touch(root / "testing" / "images" / f"test_{n:03d}.tif")
    (root / "testing" / "reference.csv").write_text(
        "".join(f"Test_{n:03d},{row}\n" for n, row in reference.items())
    )
    folder = root / "testing" / "lesion_annotations"
    for n in (1, 3):
        write_asap_xml(folder / f"test_{n:03d}.xml", [SQUARE * n])
    if zipped:  # as downloaded: testing/lesion_annotations.zip, the folder not yet unpacked
        with zipfile.ZipFile(root / "testing" / "lesion_annotations.zip", "w") as bundle:
            for xml in sorted(folder.iterdir()):
                bundle.write(xml, f"lesion_annotations/{xml.name}")
                xml.unlink()
        folder.rmdir()
    return root


def camelyon17(root: Path) -> Path:
    """`training/center_N/patient_NNN_node_N.tif`, `training/stage_labels.csv` (with its header and
    per-patient pN rows), `training/lesion_annotations/patient_NNN_node_N.xml`."""
    stages = {
        ("000", 0, 0): "negative",
        ("000", 0, 1): "itc",
        ("001", 1, 0): "macro",
        ("001", 1, 3): "micro",
        ("002", 1, 2): "negative",
    }
    rows = ["patient,stage", "patient_000.zip,pN0(i+)", "patient_001.zip,pN1"]
    for (patient, center, node), stage in stages.items():
        name = f"patient_{patient}_node_{node}"
        _touch(root / "training" / f"center_{center}" / f"{name}.tif")
        rows.append(f"{name}.tif,{stage}")
        if stage != "negative":
            write_asap_xml(root / "training" / "lesion_annotations" / f"{name}.xml", [SQUARE])
    (root / "training" / "stage_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _by_id(root: Path) -> dict:
    return {s.slide_id: s for s in discover(root, "pathology", val_fraction=0)}


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_camelyon16_release_every_slide_labelled_and_annotated(tmp_path: Path, zipped) -> None:
    found = _by_id(camelyon16(tmp_path / "camelyon16", zipped))
    expected = {
        "normal_001": ("normal", "train", False),
        "normal_002": ("normal", "train", False),
        "tumor_001": ("anomalous", "train", True),
        "tumor_002": ("anomalous", "train", True),
        "test_001": ("anomalous", "test", True),
        "test_002": ("normal", "test", False),
        "test_003": ("anomalous", "test", True),
    }
    assert {k: (s.label, s.split, s.annotation_uri is not None) for k, s in found.items()} == (
        expected
    )
    # Each annotation is the slide's own, read in place (from inside the zip where zipped).
    test_003 = read_asap_xml(local_path(found["test_003"].annotation_uri))
    np.testing.assert_array_equal(test_003[0].coords, SQUARE * 3)
    assert ("lesion_annotations.zip!/" in found["test_001"].annotation_uri) is zipped
    # ... and rasterised as ground truth by the same path tiling and evaluation use.
    truth = ground_truth_mask(found["test_001"].annotation_uri, 1000, 1000, 10)
    assert truth[10:30, 10:30].all() and truth.sum() == 400
    gaps = label_gaps(list(found.values()))
    assert gaps.lines() == []


def test_registration_checks_an_annotation_inside_the_zip(tmp_path: Path) -> None:
    """A broken XML inside the zip is a quarantine reason at registration, like a loose one."""
    root = camelyon16(tmp_path / "c16", zipped=True)
    archive = root / "testing" / "lesion_annotations.zip"
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr("lesion_annotations/test_002.xml", "<ASAP_Annotations><broken")
    write_pyramid(root / "testing" / "images" / "test_002.tif", np.full((64, 64, 3), 200, np.uint8))
    test_002 = _by_id(root)["test_002"]
    assert test_002.annotation_uri.endswith("!/lesion_annotations/test_002.xml")
    row = register_slide(test_002, "c16", "pathology", None, (0.05, 20.0))
    assert row["status"] == "quarantined"
    assert "test_002.xml" in row["reason"] and "not well-formed XML" in row["reason"]


def test_gaps_are_counted_and_named(tmp_path: Path) -> None:
    root = camelyon16(tmp_path / "c16", zipped=False)
    _touch(root / "testing" / "images" / "test_004.tif")  # not in reference.csv
    (root / "training" / "lesion_annotations" / "tumor_002.xml").unlink()
    gaps = label_gaps(list(_by_id(root).values()))
    assert gaps.unlabelled_test == ("test_004",)
    assert gaps.anomalous_without_annotation == ("tumor_002",)
    assert gaps.lines() == [
        "1 test slides without a label (no metric counts them): test_004",
        "1 anomalous slides without an annotation (left out of pixel metrics and FROC): tumor_002",
    ]


def test_ids_that_differ_only_in_case_get_distinct_ids(tmp_path: Path) -> None:
    """`Case_A` and `case_a` would share outputs on a case-insensitive file system."""
    root = camelyon16(tmp_path / "c16", zipped=False)
    _touch(root / "testing" / "images" / "Case_A.tif")
    _touch(root / "testing" / "images" / "case_a.tif")
    found = _by_id(root)
    ids = sorted(i for i in found if i.casefold().startswith("case_a"))
    assert ids[0] == "Case_A" and ids[1].startswith("case_a--case-") and len(ids) == 2
    assert len({i.casefold() for i in found}) == len(found)
    assert found[ids[1]].uri.endswith("case_a.tif") and found[ids[1]].reject is None
    gaps = label_gaps(list(found.values()))
    assert gaps.renamed_for_case == (ids[1],)
    assert any("differed from another only in case" in line for line in gaps.lines())


def test_a_test_slide_that_copies_a_training_slide_is_named() -> None:
    rows = [
        {"slide_id": "normal_001", "split": "train", "sha256": "aa"},
        {"slide_id": "normal_002", "split": "val", "sha256": "bb"},
        {"slide_id": "test_001", "split": "test", "sha256": "aa"},
        {"slide_id": "test_002", "split": "test", "sha256": "bb"},
        {"slide_id": "test_003", "split": "test", "sha256": "cc"},
        {"slide_id": "test_004", "split": "test", "sha256": None},  # never hashed
    ]
    copies = train_test_copies(rows)
    assert copies == ("test_001 = normal_001", "test_002 = normal_002")
    assert train_test_copies([r for r in rows if r["split"] == "test"]) == ()


def test_a_mask_of_the_wrong_size_is_quarantined_at_registration(tmp_path: Path) -> None:
    """Before: registered `ok`, then tiling failed and no reason file was written (#24, 6)."""
    from PIL import Image

    from vadflow.tasks.synth.industrial import make_industrial_site

    site = make_industrial_site(tmp_path, "line", n_train=2, n_test_good=1, n_test_per_defect=1)
    mask = sorted(site.rglob("*_mask.png"))[0]
    Image.open(mask).resize((7, 5)).save(mask)
    found = [s for s in discover(site, "industrial") if s.annotation_uri]
    rows = {s.annotation_uri: register_slide(s, "line", "industrial") for s in found}
    bad = rows[str(mask.resolve())]
    assert bad["status"] == "quarantined"
    assert "is 7x5 px but its image is" in bad["reason"] and mask.name in bad["reason"]
    assert all(r["status"] == "ok" for uri, r in rows.items() if uri != str(mask.resolve()))


def test_a_site_with_nothing_to_train_on_is_named_before_any_decode(tmp_path: Path) -> None:
    root = camelyon16(tmp_path / "c16", zipped=False)
    assert nothing_to_train_on(list(_by_id(root).values()), "pathology") is None
    for path in (root / "training" / "normal").glob("*.tif"):
        path.unlink()
    problem = nothing_to_train_on(list(_by_id(root).values()), "pathology")
    assert problem == (
        "the site has no usable normal training slide (put them in training/normal "
        "(Camelyon16 layout))"
    )
    line = tmp_path / "mvtec"
    for n in range(2):
        _png(line / "vial" / "train" / "good" / f"{n:03d}.png")
        _png(line / "cable" / "train" / "good" / f"{n:03d}.png")
    _png(line / "vial" / "test" / "good" / "000.png")
    found = discover(line, "industrial", val_fraction=0)
    assert nothing_to_train_on(found, "industrial") == "category cable has no test slide"


def test_camelyon17_release_node_labels_from_stage_labels(tmp_path: Path) -> None:
    found = _by_id(camelyon17(tmp_path / "camelyon17"))
    assert {k: (s.label, s.split, s.annotation_uri is not None) for k, s in found.items()} == {
        "patient_000_node_0": ("normal", "train", False),
        "patient_000_node_1": ("anomalous", "train", True),
        "patient_001_node_0": ("anomalous", "train", True),
        "patient_001_node_3": ("anomalous", "train", True),
        "patient_002_node_2": ("normal", "train", False),
    }


def test_a_synthetic_site_in_the_camelyon16_release_layout(tmp_path: Path) -> None:
    """Real slides, rearranged as the download is: every slide keeps its label and lesions."""
    from vadflow.tasks.slides.annotations import rasterize_annotations
    from vadflow.tasks.synth.pathology import make_pathology_site
    from vadflow.tasks.synth.releases import as_camelyon16_release

    site = make_pathology_site(
        tmp_path / "synth",
        "c16-synth",
        n_train_normal=2,
        n_train_tumor=1,
        n_test_normal=1,
        n_test_tumor=2,
        width=1024,
        height=768,
        seed=3,
    )
    release = as_camelyon16_release(site, tmp_path / "CAMELYON16")
    reference = (release / "testing" / "reference.csv").read_text().splitlines()
    assert all(line.startswith("Test_") for line in reference) and len(reference) == 3
    assert (release / "testing" / "lesion_annotations.zip").exists()
    before = {s.slide_id: s for s in discover(site, "pathology", val_fraction=0)}
    after = _by_id(release)
    names = ["normal_001", "normal_002", "test_001", "test_002", "test_003", "tumor_001"]
    assert sorted(after) == names
    originals = {"normal_001": "normal_000", "normal_002": "normal_001", "tumor_001": "tumor_000"}
    originals |= {f"test_{i:03d}": f"test_{i - 1:03d}" for i in (1, 2, 3)}
    for new, old in originals.items():
        a, b = after[new], before[old]
        assert (a.label, a.split) == (b.label, b.split), new
        assert (a.annotation_uri is None) == (b.annotation_uri is None), new
        if b.annotation_uri is not None:
            polygons = [read_asap_xml(local_path(s.annotation_uri)) for s in (a, b)]
            lesions = [rasterize_annotations(p, 1024, 768, 16) for p in polygons]
            np.testing.assert_array_equal(*lesions)
    assert label_gaps(list(after.values())).lines() == []


def _png(path: Path, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (128, 128, 128)).save(path)


def _industrial(root: Path) -> dict:
    return {s.slide_id: s for s in discover(root, "industrial", val_fraction=0.25)}


def test_mvtec_ad2_release_names(tmp_path: Path) -> None:
    """MVTec AD 2: `validation/good` is the held-out set, `test_public` is labelled with its
    masks inside it, and `test_private*` images are scored without a label."""
    from vadflow.tasks.slides.discover import industrial_category

    root = tmp_path / "mvtec_ad_2"
    for n in range(4):
        _png(root / "vial" / "train" / "good" / f"{n:03d}_regular.png")
    _png(root / "vial" / "validation" / "good" / "000_regular.png")
    _png(root / "vial" / "test_public" / "good" / "000_regular.png")
    _png(root / "vial" / "test_public" / "bad" / "001_regular.png")
    _png(root / "vial" / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png")
    _png(root / "vial" / "test_private" / "000_regular.png")  # no defect folder: no labels
    _png(root / "vial" / "test_private_mixed" / "000_mixed.png")
    found = _industrial(root)
    got = {k: (s.label, s.split, s.annotation_uri is not None) for k, s in found.items()}
    assert got == {
        **{f"vial-train-good-{n:03d}_regular": ("normal", "train", False) for n in range(4)},
        "vial-validation-good-000_regular": ("normal", "val", False),
        "vial-test_public-good-000_regular": ("normal", "test", False),
        "vial-test_public-bad-001_regular": ("anomalous", "test", True),
        "vial-test_private-unknown-000_regular": ("unknown", "test", False),
        "vial-test_private_mixed-unknown-000_mixed": ("unknown", "test", False),
    }
    mask = found["vial-test_public-bad-001_regular"].annotation_uri
    assert mask.endswith("test_public/ground_truth/bad/001_regular_mask.png")
    assert {industrial_category(s.uri) for s in found.values()} == {"vial"}
    assert label_gaps(list(found.values())).unlabelled_test == (
        "vial-test_private-unknown-000_regular",
        "vial-test_private_mixed-unknown-000_mixed",
    )


def test_visa_in_mvtec_form_and_one_hold_out_per_category(tmp_path: Path) -> None:
    """VisA as its preparation script writes it (masks named like their image), and MVTec AD:
    each category holds out its own good training images for calibration."""
    root = tmp_path / "visa"
    for category in ("candle", "pcb1"):
        for n in range(4):
            _png(root / category / "train" / "good" / f"{n:04d}.JPG")
        _png(root / category / "test" / "good" / "0100.JPG")
        _png(root / category / "test" / "bad" / "0200.JPG")
        _png(root / category / "ground_truth" / "bad" / "0200.png")
    found = _industrial(root)
    bad = found["pcb1-test-bad-0200"]
    assert bad.label == "anomalous" and bad.annotation_uri.endswith("ground_truth/bad/0200.png")
    for category in ("candle", "pcb1"):
        val = [s for s in found.values() if s.slide_id.startswith(category) and s.split == "val"]
        assert len(val) == 1 and val[0].label == "normal"
