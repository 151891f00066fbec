"""Open a slide or an image behind one small interface, and read regions of it.

pyvips opens pyramidal TIFF (Camelyon16), plain PNG/JPEG/TIFF and, where libvips was built with
OpenSlide, vendor formats. Reads are lazy: a region read decodes only the tiles it touches, so a
gigapixel slide is never held in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class SlideOpenError(RuntimeError):
    """A file that cannot be opened as a slide; the message names the file and the cause."""


@dataclass(frozen=True)
class LevelInfo:
    width: int
    height: int
    downsample: float


def vips_to_rgb(image: pyvips.Image) -> pyvips.Image:
    """Any band layout or depth to 8-bit sRGB: grey, RGBA (flattened on white), 16-bit, palette."""
    if image.interpretation in ("b-w", "grey16") or image.bands in (1, 2):
        image = image.colourspace("srgb") if image.bands < 3 else image
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    if image.format != "uchar":
        image = image.colourspace("srgb") if image.interpretation == "rgb16" else image
        image = image.cast("uchar") if image.format != "uchar" else image
    if image.bands > 3:
        image = image.extract_band(0, n=3)
    if image.bands == 1:
        image = image.bandjoin([image, image])
    return image


def vips_to_numpy(image: pyvips.Image) -> np.ndarray:
    """A small pyvips image to a (H, W, C) uint8 array."""
    array = np.ndarray(
        buffer=image.write_to_memory(),
        dtype=np.uint8,
        shape=(image.height, image.width, image.bands),
    )
    return array


class Slide:
    """A pyramidal slide or a single-level image, opened lazily with pyvips."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideOpenError(f"{self.path}: no such file")
        try:
            base = pyvips.Image.new_from_file(str(self.path), access="random")
            self.format = base.get("vips-loader").removesuffix("load").removesuffix("_source")
            self.format = self.format.removesuffix("load")
            self._levels: list[pyvips.Image] = self._open_levels(base)
            # Touch one pixel so truncated or corrupt files fail here, not mid-tiling.
            self._levels[-1].crop(0, 0, 1, 1).write_to_memory()
        except pyvips.Error as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
            raise SlideOpenError(
                f"{self.path.name}: cannot be opened as a slide ({first_line})"
            ) from None
        self._regions: dict[int, pyvips.Region] = {}

    def _open_levels(self, base: pyvips.Image) -> list[pyvips.Image]:
        levels = [vips_to_rgb(base)]
        loader = base.get("vips-loader")
        if loader.startswith("tiff"):
            n_pages = base.get("n-pages") if "n-pages" in base.get_fields() else 1
            for page in range(1, n_pages):
                sub = pyvips.Image.tiffload(str(self.path), page=page, access="random")
                # A pyramid page is smaller than the one above it; label and macro images
                # (SVS) break that rule and are never read as levels.
                if sub.width >= levels[-1].width or sub.height >= levels[-1].height:
                    break
                levels.append(vips_to_rgb(sub))
        elif loader.startswith("openslide"):
            for level in range(1, int(base.get("openslide.level-count"))):
                levels.append(
                    vips_to_rgb(
                        pyvips.Image.openslideload(str(self.path), level=level, access="random")
                    )
                )
        return levels

    @property
    def width(self) -> int:
        return self._levels[0].width

    @property
    def height(self) -> int:
        return self._levels[0].height

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def levels(self) -> list[LevelInfo]:
        return [LevelInfo(img.width, img.height, self.width / img.width) for img in self._levels]

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel from the file's metadata, or None when it has none."""
        image = self._levels[0]
        fields = image.get_fields()
        if "openslide.mpp-x" in fields:
            try:
                return float(image.get("openslide.mpp-x"))
            except ValueError:
                return None
        xres = image.get("xres") if "xres" in fields else 0.0  # pixels per millimetre
        # libvips reports 1 px/mm when a file has no resolution tag; PNGs without pHYs too.
        if xres <= 1.0 + 1e-9:
            return None
        mpp = 1000.0 / xres
        return mpp if 0.01 <= mpp <= 100 else None

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed the wanted one (read, then shrink)."""
        best = 0
        for index, info in enumerate(self.levels):
            if info.downsample <= downsample * 1.01:
                best = index
        return best

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 from `level`, with (x, y) in that level's pixels.

        Areas outside the slide are padded with white (glass), so edge tiles keep their size.
        """
        image = self._levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, image.width), min(y + height, image.height)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        region = self._regions.get(level)
        if region is None:
            region = self._regions[level] = pyvips.Region.new(image)
        data = region.fetch(x0, y0, x1 - x0, y1 - y0)
        patch = np.frombuffer(data, dtype=np.uint8).reshape(y1 - y0, x1 - x0, 3)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = patch
        return out

    def read_tile(self, x0: int, y0: int, extent0: int, level: int, size: int) -> np.ndarray:
        """A square tile given in level-0 coordinates, resized to `size` px if the level differs."""
        ds = self.levels[level].downsample
        span = max(1, round(extent0 / ds))
        patch = self.read_region(level, round(x0 / ds), round(y0 / ds), span, span)
        if span != size:
            patch = resize_rgb(patch, size, size)
        return patch

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide at roughly level-0 size / downsample, read from the best level."""
        level = self.best_level_for_downsample(downsample)
        image = self._levels[level]
        width = max(1, math.ceil(self.width / downsample))
        height = max(1, math.ceil(self.height / downsample))
        scaled = image.resize(width / image.width, vscale=height / image.height, kernel="linear")
        scaled = scaled.crop(0, 0, min(width, scaled.width), min(height, scaled.height))
        array = vips_to_numpy(scaled)
        if array.shape[:2] != (height, width):
            array = np.pad(
                array,
                ((0, height - array.shape[0]), (0, width - array.shape[1]), (0, 0)),
                constant_values=255,
            )
        return array


def resize_rgb(patch: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average resize of a small uint8 RGB patch."""
    image = pyvips.Image.new_from_array(patch)
    scaled = image.resize(width / patch.shape[1], vscale=height / patch.shape[0], kernel="linear")
    array = vips_to_numpy(scaled)[:height, :width]
    if array.shape[:2] != (height, width):
        array = np.pad(
            array,
            ((0, height - array.shape[0]), (0, width - array.shape[1]), (0, 0)),
            mode="edge",
        )
    return array
