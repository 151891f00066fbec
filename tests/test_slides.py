"""Readers, discovery and registration on small generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pyvips

from tasks.slides.discover import NoSlidesError, discover
from tasks.slides.reader import Slide, SlideOpenError
from tasks.slides.register import register_slide, slide_frame


def _pyramid(path: Path, array: np.ndarray, mpp: float | None = 0.25) -> Path:
    image = pyvips.Image.new_from_array(array)
    kwargs = {"xres": 1000 / mpp, "yres": 1000 / mpp, "resunit": "cm"} if mpp else {}
    image.tiffsave(
        str(path),
        tile=True,
        tile_width=128,
        tile_height=128,
        pyramid=True,
        compression="jpeg",
        Q=90,
        **kwargs,
    )
    return path


def test_pyramid_levels_mpp_and_region(tmp_path: Path) -> None:
    array = np.full((600, 1000, 3), 240, np.uint8)
    array[100:300, 200:500] = (180, 90, 160)
    slide = Slide(_pyramid(tmp_path / "s.tif", array))
    assert slide.width == 1000 and slide.height == 600
    assert slide.level_count >= 3
    assert [lv.downsample for lv in slide.levels[:2]] == [1.0, 2.0]
    assert slide.mpp == pytest.approx(0.25, abs=1e-3)
    patch = slide.read_region(0, 250, 150, 50, 50)
    assert np.abs(patch.mean(axis=(0, 1)) - (180, 90, 160)).max() < 6
    # Past the right edge: padded with glass, size kept.
    edge = slide.read_region(0, 980, 0, 40, 40)
    assert edge.shape == (40, 40, 3) and edge[:, 30:].min() == 255
    # A level-1 tile of level-0 extent 100 comes back at the asked size.
    assert slide.read_tile(200, 100, 100, 1, 50).shape == (50, 50, 3)
    assert slide.best_level_for_downsample(2.0) == 1
    assert slide.best_level_for_downsample(3.0) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.full((40, 40), 128, np.uint8),  # grey
        lambda: np.dstack([np.full((40, 40, 3), 100, np.uint8), np.zeros((40, 40), np.uint8)]),
        lambda: np.full((40, 40, 3), 30000, np.uint16),  # 16-bit
    ],
    ids=["grey", "rgba", "16bit"],
)
def test_odd_images_become_8bit_rgb(tmp_path: Path, make) -> None:
    path = tmp_path / "odd.png"
    pyvips.Image.new_from_array(make()).pngsave(str(path))
    patch = Slide(path).read_region(0, 0, 0, 40, 40)
    assert patch.shape == (40, 40, 3) and patch.dtype == np.uint8


def test_rgba_is_flattened_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent black
    path = tmp_path / "clear.png"
    pyvips.Image.new_from_array(rgba).pngsave(str(path))
    assert Slide(path).read_region(0, 0, 0, 20, 20).min() == 255


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideOpenError, match="broken.tif"):
        Slide(bad)


def test_register_quarantines_bad_and_missing_mpp(tmp_path: Path) -> None:
    (tmp_path / "training" / "normal").mkdir(parents=True)
    good = _pyramid(
        tmp_path / "training" / "normal" / "good.tif", np.full((256, 256, 3), 200, np.uint8)
    )
    _pyramid(
        tmp_path / "training" / "normal" / "nompp.tif",
        np.full((256, 256, 3), 200, np.uint8),
        mpp=None,
    )
    (tmp_path / "training" / "normal" / "bad.tif").write_bytes(b"not a tiff")
    sources = discover(tmp_path, "pathology", val_fraction=0)
    rows = {s.slide_id: register_slide(s, "t", "pathology") for s in sources}
    assert rows["good"]["status"] == "ok" and rows["good"]["mpp_source"] == "metadata"
    assert rows["bad"]["status"] == "quarantined" and "bad.tif" in rows["bad"]["reason"]
    assert rows["nompp"]["status"] == "quarantined" and "mpp_override" in rows["nompp"]["reason"]
    fixed = register_slide(next(s for s in sources if s.slide_id == "nompp"), "t", "pathology", 0.5)
    assert fixed["status"] == "ok" and fixed["mpp_source"] == "site"
    frame = slide_frame(list(rows.values()))
    assert frame.height == 3 and good.exists()


def test_discover_empty_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NoSlidesError, match="no slides found"):
        discover(tmp_path, "pathology")


def test_discover_holds_out_val_normals(tmp_path: Path) -> None:
    folder = tmp_path / "training" / "normal"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"n{i}.tif").write_bytes(b"x")
    splits = [s.split for s in discover(tmp_path, "pathology", val_fraction=0.25)]
    assert sorted(splits) == ["train", "train", "train", "val"]
