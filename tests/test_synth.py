"""Synthetic sites: real file formats, the layouts discovery expects, lesions made of texture."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pyvips
import yaml
from PIL import Image
from scipy import ndimage

from vadflow.tasks.site import load_site
from vadflow.tasks.slides.annotations import rasterize_annotations, read_asap_xml
from vadflow.tasks.synth.industrial import make_industrial_site
from vadflow.tasks.synth.pathology import make_pathology_site, write_synthetic_slide

WIDTH, HEIGHT = 1536, 1024


def _pixels(path: Path) -> np.ndarray:
    """Level 0 of an image as (H, W, C) uint8, or (H, W) for one band."""
    image = pyvips.Image.new_from_file(str(path))
    array = np.ndarray(
        buffer=image.write_to_memory(),
        dtype=np.uint8,
        shape=(image.height, image.width, image.bands),
    )
    return array[..., 0] if image.bands == 1 else array


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    calls: list[tuple[int, int]] = []
    out = make_pathology_site(
        tmp_path_factory.mktemp("path"),
        "tiny-site",
        n_train_normal=1,
        n_train_tumor=1,
        n_test_normal=1,
        n_test_tumor=2,
        width=WIDTH,
        height=HEIGHT,
        seed=11,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 5) for i in range(1, 6)]
    return out


def test_pathology_layout_and_reference(site: Path) -> None:
    assert site.name == "tiny-site"
    assert yaml.safe_load((site / "site.yaml").read_text()) == {
        "name": "tiny-site",
        "domain": "pathology",
        "froc_itc_um": 10.0,  # the isolated-cell rule that fits synthetic lesions
    }
    assert load_site(site).domain == "pathology"
    assert [p.name for p in (site / "training" / "normal").iterdir()] == ["normal_000.tif"]
    assert [p.name for p in (site / "training" / "tumor").iterdir()] == ["tumor_000.tif"]
    with (site / "testing" / "reference.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["image"] for r in rows) == ["test_000", "test_001", "test_002"]
    assert sorted(r["label"] for r in rows) == ["Normal", "Tumor", "Tumor"]
    tests = sorted(p.stem for p in (site / "testing" / "images").glob("*.tif"))
    assert tests == ["test_000", "test_001", "test_002"]
    tumours = {r["image"] for r in rows if r["label"] == "Tumor"} | {"tumor_000"}
    assert {p.stem for p in (site / "lesion_annotations").glob("*.xml")} == tumours
    assert {p.name for p in (site / "ground_truth").glob("*.tif")} == {
        f"{stem}_mask.tif" for stem in tumours
    }
    assert not list(site.rglob("*.tmp"))
    assert (site / ".vadflow-synthetic").exists()


def test_slides_are_pyramidal_tiled_jpeg_rgb_with_mpp(site: Path) -> None:
    path = site / "testing" / "images" / "test_000.tif"
    image = pyvips.Image.new_from_file(str(path))
    assert (image.width, image.height, image.bands, image.format) == (WIDTH, HEIGHT, 3, "uchar")
    assert image.get("n-pages") > 1
    assert pyvips.Image.new_from_file(str(path), page=1).width == WIDTH // 2
    assert 1000.0 / image.get("xres") == pytest.approx(0.25, abs=1e-3)
    assert 1000.0 / image.get("yres") == pytest.approx(0.25, abs=1e-3)
    with Image.open(path) as tiff:
        tags = tiff.tag_v2
        assert tags[259] == 7  # Compression: JPEG
        assert (tags[322], tags[323]) == (256, 256)  # TileWidth, TileLength
        assert tags[296] == 3  # ResolutionUnit: centimetre, as OpenSlide reads it
        assert float(tags[282]) == pytest.approx(10_000 / 0.25)
    mask_path = site / "ground_truth" / "tumor_000_mask.tif"
    mask = pyvips.Image.new_from_file(str(mask_path))
    assert (mask.width, mask.height, mask.bands) == (WIDTH, HEIGHT, 1)
    assert mask.get("n-pages") > 1
    assert set(np.unique(_pixels(mask_path))) == {0, 255}
    with Image.open(mask_path) as tiff:
        assert tiff.tag_v2[259] in (8, 32946)  # Adobe deflate or deflate


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path: Path) -> None:
    kwargs = dict(width=640, height=512, n_lesions=2, mpp=0.5)
    a = write_synthetic_slide(tmp_path / "a.tif", seed=3, mask_path=tmp_path / "am.tif", **kwargs)
    b = write_synthetic_slide(tmp_path / "b.tif", seed=3, mask_path=tmp_path / "bm.tif", **kwargs)
    c = write_synthetic_slide(tmp_path / "c.tif", seed=4, **kwargs)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    np.testing.assert_array_equal(_pixels(tmp_path / "am.tif"), _pixels(tmp_path / "bm.tif"))
    assert len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(_pixels(tmp_path / "a.tif"), _pixels(tmp_path / "c.tif"))
    assert len(c) >= 1
    mpp = 1000.0 / pyvips.Image.new_from_file(str(tmp_path / "c.tif")).get("xres")
    assert mpp == pytest.approx(0.5, abs=1e-3)
    # Rewriting a path in the same process gives the new slide (libvips caches loads by name).
    write_synthetic_slide(tmp_path / "c.tif", seed=3, **kwargs)
    assert (tmp_path / "c.tif").read_bytes() == (tmp_path / "a.tif").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_site_regenerates_identically(site: Path, tmp_path: Path) -> None:
    again = make_pathology_site(
        tmp_path,
        "tiny-site",
        n_train_normal=1,
        n_train_tumor=1,
        n_test_normal=1,
        n_test_tumor=2,
        width=WIDTH,
        height=HEIGHT,
        seed=11,
    )
    for rel in ("testing/reference.csv", "lesion_annotations/tumor_000.xml"):
        assert (again / rel).read_bytes() == (site / rel).read_bytes()
    rel = "training/tumor/tumor_000.tif"
    np.testing.assert_array_equal(_pixels(again / rel), _pixels(site / rel))
    # Running again over a folder the generator wrote replaces it.
    make_pathology_site(
        tmp_path,
        "tiny-site",
        n_train_normal=0,
        n_test_normal=0,
        n_test_tumor=0,
        width=256,
        height=256,
    )
    assert not (again / "training").exists()


@pytest.mark.parametrize("downsample", [8, 16])
def test_xml_rasterised_agrees_with_ground_truth_mask(site: Path, downsample: int) -> None:
    for xml in sorted((site / "lesion_annotations").glob("*.xml")):
        polygons = read_asap_xml(xml)
        assert polygons and all(p.group == "Tumor" for p in polygons)
        coarse = rasterize_annotations(polygons, WIDTH, HEIGHT, downsample)
        truth = _pixels(site / "ground_truth" / f"{xml.stem}_mask.tif") > 127
        # Block majority of the level-0 mask on the same grid.
        blocks = truth.reshape(HEIGHT // downsample, downsample, WIDTH // downsample, downsample)
        reference = blocks.mean(axis=(1, 3)) >= 0.5
        iou = (coarse & reference).sum() / (coarse | reference).sum()
        assert iou > 0.9, (xml.stem, iou)


def _red_od(rgb: np.ndarray) -> np.ndarray:
    # Hematoxylin absorbs red (0.65) and eosin hardly (0.07): red optical density tracks H.
    return -np.log((rgb[..., 0].astype(np.float64) + 1) / 256)


def _regions(rgb: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lesion core, and tissue well away from any lesion (outside the blend zone)."""
    od = -np.log((rgb.astype(np.float64) + 1) / 256).sum(-1)
    tissue = ndimage.binary_erosion(od > 0.5, iterations=20)
    core = ndimage.binary_erosion(lesion, iterations=10) & tissue
    normal = tissue & ~ndimage.binary_dilation(lesion, iterations=60)
    return core, normal


def test_lesions_are_texture_not_a_flat_blob(site: Path) -> None:
    rgb = _pixels(site / "training" / "tumor" / "tumor_000.tif")
    lesion = _pixels(site / "ground_truth" / "tumor_000_mask.tif") > 127
    core, normal = _regions(rgb, lesion)
    assert core.sum() > 2000 and normal.sum() > 20000
    red = _red_od(rgb)
    # More, larger, darker nuclei: clearly more hematoxylin ...
    assert red[core].mean() > 1.3 * red[normal].mean()
    # ... but the same kind of tissue: mean colour moves modestly, and the lesion is textured.
    shift = np.linalg.norm(rgb[core].mean(0) - rgb[normal].mean(0))
    assert 10 < shift < 90
    assert rgb[core].std(0).min() > 15
    assert red[core].std() > 0.5 * red[normal].std()


def test_lesion_strength_zero_is_indistinguishable(tmp_path: Path) -> None:
    kwargs = dict(width=1024, height=1024, n_lesions=1, seed=5)
    flat = write_synthetic_slide(
        tmp_path / "s0.tif", lesion_strength=0.0, mask_path=tmp_path / "m0.tif", **kwargs
    )
    full = write_synthetic_slide(
        tmp_path / "s1.tif", lesion_strength=1.0, mask_path=tmp_path / "m1.tif", **kwargs
    )
    # Strength changes texture only, never where the lesion is.
    np.testing.assert_array_equal(_pixels(tmp_path / "m0.tif"), _pixels(tmp_path / "m1.tif"))
    assert all(np.array_equal(p, q) for p, q in zip(flat, full, strict=True))
    lesion = _pixels(tmp_path / "m0.tif") > 127
    ratios = []
    for name in ("s0.tif", "s1.tif"):
        rgb = _pixels(tmp_path / name)
        core, normal = _regions(rgb, lesion)
        red = _red_od(rgb)
        ratios.append(red[core].mean() / red[normal].mean())
    assert abs(ratios[0] - 1) < 0.15 < ratios[1] - 1


def test_generator_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "precious.tif").write_bytes(b"real slide")
    with pytest.raises(FileExistsError, match="site-a"):
        make_pathology_site(tmp_path, n_train_normal=1, n_test_normal=0, n_test_tumor=0)
    assert (tmp_path / "site-a" / "precious.tif").exists()


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_industrial_site(
        tmp_path_factory.mktemp("line"),
        "tiny-line",
        n_train=3,
        n_test_good=2,
        n_test_per_defect=3,
        image_size=64,
        seed=2,
    )


def test_industrial_layout_and_site_file(line: Path) -> None:
    assert yaml.safe_load((line / "site.yaml").read_text()) == {
        "name": "tiny-line",
        "domain": "industrial",
        "tiling": {
            "target_mpp": None,
            "tile_size": 32,
            "stride": 16,
            "heatmap_downsample": 1,
            "foreground_mask": False,
            "mask_mpp": 8.0,
        },
    }
    config = load_site(line)
    assert config.domain == "industrial" and config.tiling.target_mpp is None
    root = line / "fabric"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [
        "000.png",
        "001.png",
        "002.png",
    ]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["good", "scratch", "stain"]
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == ["scratch", "stain"]


def test_industrial_masks_match_their_images(line: Path) -> None:
    root = line / "fabric"
    for image_path in sorted((root / "test").glob("*/*.png")):
        image = _pixels(image_path)
        assert image.shape == (64, 64, 3)
        defect = image_path.parent.name
        mask_path = root / "ground_truth" / defect / f"{image_path.stem}_mask.png"
        if defect == "good":
            assert not mask_path.exists()
            continue
        mask = _pixels(mask_path)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        inside = mask > 0
        # Visible: the defect's mean colour stands apart from the surface right around it.
        ring = ndimage.binary_dilation(inside, iterations=4) & ~inside
        contrast = np.abs(image[inside].mean(0) - image[ring].mean(0)).sum()
        assert contrast > 40, (image_path, contrast)


def test_industrial_is_deterministic_and_wood_works(tmp_path: Path) -> None:
    kwargs = dict(n_train=2, n_test_good=1, n_test_per_defect=1, image_size=48)
    a = make_industrial_site(tmp_path / "a", seed=1, **kwargs)
    b = make_industrial_site(tmp_path / "b", seed=1, **kwargs)
    c = make_industrial_site(tmp_path / "c", seed=2, **kwargs)
    rel = "fabric/test/stain/000.png"
    np.testing.assert_array_equal(_pixels(a / rel), _pixels(b / rel))
    assert not np.array_equal(_pixels(a / rel), _pixels(c / rel))
    wood = make_industrial_site(tmp_path / "w", category="wood", defects=("scratch",), **kwargs)
    assert (wood / "wood" / "ground_truth" / "scratch" / "000_mask.png").exists()
    with pytest.raises(ValueError, match="unknown defect"):
        make_industrial_site(tmp_path / "x", defects=("dent",), **kwargs)
