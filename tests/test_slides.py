"""Readers, discovery and registration on small generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pyvips

from vadflow.tasks.slides.discover import NoSlidesError, discover
from vadflow.tasks.slides.reader import Slide, SlideOpenError
from vadflow.tasks.slides.register import register_slide, slide_frame


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


# --- formats, colour layouts, MPP ----------------------------------------------------------

PINK = (180, 90, 160)


def _tissue(h: int = 800, w: int = 1000) -> np.ndarray:
    array = np.full((h, w, 3), 240, np.uint8)
    array[100:400, 200:600] = PINK
    return array


def _aperio_svs(path: Path, mpp: float = 0.25) -> Path:
    """An SVS as Aperio lays it out: tiled level 0, stripped thumbnail, tiled level 1, then
    stripped label and macro images, each page described in Aperio's ImageDescription style."""
    import tifffile

    level0 = _tissue()
    head = "Aperio Image Library v12.0.15 \n"
    pages = [
        (
            level0,
            True,
            f"{head}1000x800 [0,0 1000x800] (256x256) JPEG/RGB Q=70|AppMag = 40"
            f"|MPP = {mpp}|Filename = {path.stem}",
        ),
        (level0[::8, ::8], False, f"{head}1000x800 -> 125x100 - |"),
        (level0[::2, ::2], True, f"{head}1000x800 -> 500x400 - |"),
        (np.full((100, 200, 3), 30, np.uint8), False, f"{head}label 200x100"),
        (np.full((200, 400, 3), 60, np.uint8), False, f"{head}macro 400x200"),
    ]
    with tifffile.TiffWriter(path) as tif:
        for array, tiled, description in pages:
            tif.write(
                np.ascontiguousarray(array),
                tile=(256, 256) if tiled else None,
                compression="zlib",
                photometric="rgb",
                description=description,
                metadata=None,
            )
    return path


@pytest.mark.parametrize("backend", ["auto", "vips"])
def test_aperio_svs_levels_mpp_and_no_label_or_macro(tmp_path: Path, backend: str) -> None:
    slide = Slide(_aperio_svs(tmp_path / "case.svs"), backend=backend)
    if backend == "auto":
        assert slide.format == "openslide-aperio"  # OpenSlide from the openslide-bin wheel
    # Thumbnail, label and macro are not pyramid levels.
    assert [(lv.width, lv.height) for lv in slide.levels] == [(1000, 800), (500, 400)]
    assert slide.mpp == pytest.approx(0.25)
    patch = slide.read_region(1, 150, 100, 20, 20)  # inside the pink block, level 1
    assert np.abs(patch.astype(int) - PINK).max() <= 2
    thumb = slide.thumbnail(10.0)
    assert thumb.shape == (80, 100, 3)
    assert thumb.min() > 25  # the label's dark grey never leaks into what is read


def test_aperio_svs_with_absurd_mpp_is_quarantined(tmp_path: Path) -> None:
    from vadflow.tasks.slides.discover import SlideSource

    path = _aperio_svs(tmp_path / "odd.svs", mpp=0.001)
    source = SlideSource("odd", str(path), "normal", "normal", "train", None)
    row = register_slide(source, "t", "pathology")
    assert row["status"] == "quarantined"
    assert "odd.svs" in row["reason"] and "outside" in row["reason"]
    fixed = register_slide(source, "t", "pathology", mpp_override=0.25)
    assert (fixed["status"], fixed["mpp"], fixed["mpp_source"]) == ("ok", 0.25, "site")


def test_generic_tiff_skips_pages_that_are_not_levels(tmp_path: Path) -> None:
    """A tiled label page (other aspect ratio) and a page called 'macro' are not levels."""
    import tifffile

    level0 = _tissue(512, 768)
    with tifffile.TiffWriter(tmp_path / "x.tif") as tif:
        tif.write(level0, tile=(128, 128), photometric="rgb", metadata=None)
        tif.write(level0[::2, ::2], tile=(128, 128), photometric="rgb", metadata=None)
        tif.write(np.zeros((128, 512, 3), np.uint8), tile=(128, 128), metadata=None)
        tif.write(
            np.zeros((128, 192, 3), np.uint8), tile=(64, 64), description="macro", metadata=None
        )
        tif.write(level0[::4, ::4], tile=(64, 64), photometric="rgb", metadata=None)
    slide = Slide(tmp_path / "x.tif")
    assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]
    assert slide.thumbnail(4).min() > 0  # no black label in the pyramid


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_palette_images_become_rgb(tmp_path: Path, suffix: str) -> None:
    from PIL import Image

    index = np.zeros((16, 16), np.uint8)
    index[4:12, 4:12] = 1
    image = Image.fromarray(index, mode="P")
    image.putpalette([255, 255, 255, *PINK] + [0] * 762)
    image.save(tmp_path / f"pal{suffix}")
    patch = Slide(tmp_path / f"pal{suffix}").read_region(0, 0, 0, 16, 16)
    assert patch.shape == (16, 16, 3) and patch.dtype == np.uint8
    assert tuple(patch[8, 8]) == PINK and tuple(patch[0, 0]) == (255, 255, 255)


def test_16bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    import tifffile

    rgb16 = np.full((8, 8, 3), 40000, np.uint16)
    rgb16[..., 2] = 1000
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    tifffile.imwrite(tmp_path / "grey16.tif", np.full((8, 8), 40000, np.uint16))
    for name in ("rgb16.tif", "grey16.tif"):
        patch = Slide(tmp_path / name).read_region(0, 0, 0, 8, 8)
        assert patch.dtype == np.uint8 and patch.shape == (8, 8, 3)
        assert abs(int(patch[0, 0, 0]) - 40000 // 257) <= 1  # 155, not a clipped 255
    assert Slide(tmp_path / "rgb16.tif").read_region(0, 0, 0, 1, 1)[0, 0, 2] <= 4


def test_grey_with_alpha_is_flattened_on_white(tmp_path: Path) -> None:
    grey_alpha = np.dstack([np.full((10, 10), 50, np.uint8), np.zeros((10, 10), np.uint8)])
    grey_alpha[:5, :, 1] = 255  # top half opaque
    pyvips.Image.new_from_array(grey_alpha).copy(interpretation="b-w").pngsave(
        str(tmp_path / "ga.png")
    )
    patch = Slide(tmp_path / "ga.png").read_region(0, 0, 0, 10, 10)
    assert (patch[:5] == 50).all() and (patch[5:] == 255).all()


def test_truncated_and_non_image_files_are_quarantined(tmp_path: Path) -> None:
    from vadflow.tasks.slides.discover import SlideSource

    whole = _pyramid(tmp_path / "whole.tif", _tissue(1024, 1024))
    data = whole.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.svs").write_text("this is not a slide\n")
    for name in ("cut.tif", "notes.svs", "gone.tif"):
        source = SlideSource(
            Path(name).stem, str(tmp_path / name), "normal", "normal", "test", None
        )
        row = register_slide(source, "t", "pathology")
        assert row["status"] == "quarantined" and name in row["reason"], row


def test_mpp_sources_and_bounds(tmp_path: Path) -> None:
    from vadflow.tasks.slides.discover import SlideSource

    def row(path: Path, domain: str = "pathology", **kwargs):
        source = SlideSource(path.stem, str(path), "normal", "normal", "test", None)
        return register_slide(source, "t", domain, **kwargs)

    array = _tissue(256, 256)
    fine = row(_pyramid(tmp_path / "fine.tif", array, mpp=0.5))
    assert (fine["mpp"], fine["mpp_source"]) == (pytest.approx(0.5), "metadata")
    # 72 dpi (352.8 um/px): a scanner export's default, not a microscope resolution.
    dpi = row(_pyramid(tmp_path / "dpi.tif", array, mpp=25400 / 72))
    assert dpi["status"] == "quarantined" and "outside the plausible 0.05-20" in dpi["reason"]
    tight = row(tmp_path / "fine.tif", mpp_bounds=(0.1, 0.4))
    assert tight["status"] == "quarantined"
    # Industrial images need no MPP: an absurd one is ignored, not a reason to quarantine.
    png = tmp_path / "part.png"
    pyvips.Image.new_from_array(array).pngsave(str(png))
    part = row(png, "industrial")
    assert (part["status"], part["mpp"], part["mpp_source"]) == ("ok", None, "none")


def test_site_config_rejects_implausible_override() -> None:
    from pydantic import ValidationError

    from vadflow.tasks.site import SiteConfig

    with pytest.raises(ValidationError, match="outside mpp_bounds"):
        SiteConfig(name="s", domain="pathology", source="/x", mpp_override=50.0)
    with pytest.raises(ValidationError, match="unknown mask preset"):
        SiteConfig(name="s", domain="pathology", source="/x", tiling={"mask_preset": "nope"})


# --- tile reader for training and scoring ----------------------------------------------------


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory):
    """Two small pyramids and a 32-row manifest that interleaves them."""
    import polars as pl

    folder = tmp_path_factory.mktemp("reader")
    uris, rows = {}, []
    for k in range(2):
        rng = np.random.default_rng(k)
        array = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        path = folder / f"s{k}.tif"
        pyvips.Image.new_from_array(array).tiffsave(
            str(path), tile=True, pyramid=True, compression="deflate", xres=4000.0, yres=4000.0
        )
        uris[f"s{k}"] = str(path)
        rows += [
            {"slide_id": f"s{k}", "x": x, "y": y, "extent": 64, "level": 1, "size": 32}
            for y in range(0, 512, 128)
            for x in range(0, 512, 128)
        ]
    rows = rows[::2] + rows[1::2]  # not grouped by slide
    frame = pl.DataFrame(rows).with_columns(tile_id=pl.format("{}:{}:{}", "slide_id", "x", "y"))
    expected = np.stack(
        [Slide(uris[r["slide_id"]]).read_tile(r["x"], r["y"], 64, 1, 32) for r in rows]
    )
    return frame, uris, expected


def test_dataset_batches_keep_the_asked_order_and_one_handle_per_slide(two_slides) -> None:
    import pickle

    from vadflow.tasks.slides.tiles import TileDataset, load_tiles

    frame, uris, expected = two_slides
    dataset = TileDataset(frame, uris)
    picked = [7, 3, 30, 0, 19]
    np.testing.assert_array_equal(np.stack(dataset.__getitems__(picked)), expected[picked])
    np.testing.assert_array_equal(dataset[5], expected[5])
    assert len(dataset._open) == 2  # one handle per slide, reused for every tile
    assert pickle.loads(pickle.dumps(dataset))._open == {}  # workers open their own
    np.testing.assert_array_equal(load_tiles(frame, uris), expected)


def test_dataloader_with_spawned_workers_reads_every_tile_once(two_slides) -> None:
    import torch
    from torch.utils.data import DataLoader

    from vadflow.tasks.slides.tiles import TileDataset

    frame, uris, expected = two_slides
    loader = DataLoader(
        TileDataset(frame, uris),
        batch_size=8,
        num_workers=2,
        multiprocessing_context="spawn",  # libvips threads do not survive fork
    )
    batches = list(loader)
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (32, 32, 3) for b in batches)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), expected)


def test_tile_cache_fills_once_and_serves_the_same_pixels(two_slides, tmp_path: Path) -> None:
    """JPEG cache: every epoch, the first included, sees the cached pixels; the file is a
    fraction of the decoded pixels (these tiles are noise, where JPEG gains least)."""
    from vadflow.tasks.slides.tiles import TileDataset

    frame, uris, expected = two_slides
    first = TileDataset(frame, uris, cache_dir=tmp_path)
    assert first.cache.filled == 0
    filling = np.stack(first.__getitems__(list(range(len(first)))))
    assert first.cache.filled == len(first)
    assert first.cache.nbytes() < filling.nbytes  # noise tiles: JPEG gains least
    assert not np.array_equal(filling[:32], expected)  # lossy: the cached version it is
    again = TileDataset(frame, uris, cache_dir=tmp_path)  # a later epoch or run
    assert again.cache.filled == len(first)
    again._slide = None  # a cache hit must not open the slide at all
    np.testing.assert_array_equal(np.stack(again.__getitems__(list(range(32)))), filling[:32])
    other = TileDataset(frame.head(10), uris, cache_dir=tmp_path)  # other rows, other file
    assert other.cache.key != first.cache.key and other.cache.filled == 0


def test_jpeg_tile_round_trip_is_within_a_grey_level_or_two_on_smooth_tissue() -> None:
    from scipy import ndimage

    from vadflow.tasks.slides.tiles import decode_tile_into, encode_tile

    rng = np.random.default_rng(0)
    tissue = ndimage.gaussian_filter(rng.random((256, 256, 3)) * 255, (3, 3, 0))
    tile = np.clip(tissue * 4 - 380, 0, 255).astype(np.uint8)  # blobs of colour, some edges
    encoded = encode_tile(tile, "jpeg")
    back = np.empty_like(tile)
    decode_tile_into(encoded, back)
    assert len(encoded) < tile.nbytes / 6
    assert np.abs(back.astype(int) - tile).mean() < 2


def test_png_tile_cache_serves_the_decoded_pixels_exactly(two_slides, tmp_path: Path) -> None:
    from vadflow.tasks.slides.tiles import TileDataset

    frame, uris, expected = two_slides
    first = TileDataset(frame.head(32), uris, cache_dir=tmp_path, cache_codec="png")
    np.testing.assert_array_equal(np.stack(first.__getitems__(list(range(32)))), expected)
    again = TileDataset(frame.head(32), uris, cache_dir=tmp_path, cache_codec="png")
    again._slide = None
    np.testing.assert_array_equal(np.stack(again.__getitems__(list(range(32)))), expected)
    with pytest.raises(ValueError, match="codec 'webp'"):
        TileDataset(frame, uris, cache_dir=tmp_path, cache_codec="webp")
