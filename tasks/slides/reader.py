"""Open a slide or an image behind one small interface, and read regions of it.

Two backends, one `Slide`:

- **libvips** (pyvips + the `pyvips-binary` wheel) for generic tiled pyramidal TIFF (Camelyon16,
  pyvips/QuPath/bfconvert output, OME-TIFF sub-IFD pyramids) and plain PNG/JPEG/TIFF/BMP images.
  The pyramid levels are the TIFF pages that are tiled, smaller than the page above and of the same
  aspect ratio; anything else in the file (Aperio thumbnail, label and macro images) is skipped.
- **OpenSlide** (openslide-python + the `openslide-bin` wheel, both from PyPI alone) for the vendor
  formats: Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS, Leica SCN, Ventana BIF, Philips TIFF,
  Sakura SVSLIDE... `pyvips-binary` is built without libvips' OpenSlide loader, so these do not go
  through libvips. OpenSlide exposes label and macro images as associated images, which are never
  read; a label or macro page tiled like a level (OpenSlide then lists it as one) is dropped.
  Label and macro images show the slide's paper label, often a patient identifier: no level, no
  thumbnail and so no export is ever made from them.

Reads are lazy: a region read decodes only the tiles it touches, so a gigapixel slide is never held
in memory. Whatever the file holds (grey, grey+alpha, RGBA, 16-bit, palette, float, CMYK), pixels
come back as 8-bit RGB, transparent areas flattened on white (glass).

`s3://` URIs are downloaded to the local slide cache first (see `tasks.slides.storage`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips

from vadflow.tasks.slides.storage import StorageOptions, is_remote, local_path

SLIDE_SUFFIXES = (
    ".tif",
    ".tiff",
    ".svs",
    ".tf2",
    ".tf8",
    ".btf",
    ".ndpi",
    ".vms",
    ".vmu",
    ".mrxs",
    ".scn",
    ".bif",
    ".svslide",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# OpenSlide's vendor drivers; "generic-tiff" stays with libvips, which reads it faster.
_OPENSLIDE_ONLY = frozenset(
    {"aperio", "hamamatsu", "leica", "mirax", "philips", "sakura", "trestle", "ventana", "zeiss"}
)
# ImageDescription words that mark a page as something other than a pyramid level.
_NOT_A_LEVEL = re.compile(r"\b(label|macro|thumbnail|overview)\b", re.IGNORECASE)
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_OME_MPP = re.compile(r'PhysicalSizeX="([0-9.eE+-]+)"(?:\s+PhysicalSizeXUnit="([^"]+)")?')
_OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}


class SlideOpenError(RuntimeError):
    """A file that cannot be opened as a slide; the message names the file and the cause."""


class SlideTooLargeError(SlideOpenError):
    """A slide whose header says opening it would decode more pixels than allowed."""


def _check_decode_size(path: Path, dims: Sequence[tuple[int, int]], limit_mp: float) -> None:
    width, height = min(dims, key=lambda d: d[0] * d[1])
    megapixels = width * height / 1e6
    if megapixels > limit_mp:
        raise SlideTooLargeError(
            f"{path.name}: its smallest pyramid level is {width:,} x {height:,} px "
            f"({megapixels:,.0f} megapixels), more than the {limit_mp:,.0f} allowed to decode "
            "for the tissue mask (limits.max_mask_megapixels); save it as a tiled pyramidal "
            "TIFF (vips tiffsave --tile --pyramid) or raise the limit"
        )


@dataclass(frozen=True)
class LevelInfo:
    width: int
    height: int
    downsample: float


def vips_to_rgb(image: pyvips.Image) -> pyvips.Image:
    """Any band layout or depth to 8-bit sRGB: grey, RGBA (flattened on white), 16-bit, palette.

    libvips already expands palette images to RGB(A) or grey when it loads them.
    """
    if image.interpretation in ("cmyk", "lab", "labs", "lch", "cmc", "xyz", "yxy", "hsv", "scrgb"):
        image = image.colourspace("srgb")
    image = _to_uchar(image)
    if image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    if image.bands in (1, 2):
        band = image.extract_band(0)
        image = band.bandjoin([band, band])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
    return image if image.interpretation == "srgb" else image.copy(interpretation="srgb")


def _to_uchar(image: pyvips.Image) -> pyvips.Image:
    """8 bits per sample, scaling by the format's range (cast alone would clip 16-bit to 255)."""
    fmt = image.format
    if fmt == "uchar":
        return image
    if image.interpretation in ("rgb16", "grey16"):
        return image.colourspace("srgb" if image.interpretation == "rgb16" else "b-w")
    if fmt == "char":
        return (image + 128).cast("uchar")
    if fmt == "ushort":
        return (image >> 8).cast("uchar")
    if fmt == "short":
        return (image >> 7).cast("uchar")  # negatives clip to 0
    if fmt in ("uint", "int"):
        return (image >> (24 if fmt == "uint" else 23)).cast("uchar")
    # float, double, complex: [0, 1] or [0, 255]; one pass over the image to tell which.
    scale = 255.0 if image.max() <= 1.0 else 1.0
    return (image * scale).cast("uchar")


def vips_to_numpy(image: pyvips.Image) -> np.ndarray:
    """A small pyvips image to a (H, W, C) uint8 array."""
    array = np.ndarray(
        buffer=image.write_to_memory(),
        dtype=np.uint8,
        shape=(image.height, image.width, image.bands),
    )
    return array


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) straight-alpha uint8 to (H, W, 3) on white: OpenSlide's outside-the-scan areas."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


# How image and slide files start; a file that starts otherwise is not one, whatever its name.
_MAGIC = (
    b"II*\x00",  # TIFF (SVS, NDPI, SCN, BIF, OME-TIFF...), little-endian
    b"MM\x00*",
    b"II+\x00",  # BigTIFF
    b"MM\x00+",
    b"\x89PNG",
    b"\xff\xd8\xff",  # JPEG
    b"BM",
    b"\x00\x00\x00\x0cjP",  # JPEG 2000
)


def _not_an_image(path: Path) -> str | None:
    """Why `path` is plainly not an image (empty, or text), for the open error; else None."""
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head:
        return "the file is empty (0 bytes)"
    if any(head.startswith(magic) for magic in _MAGIC):
        return None
    shown = head[:24].decode("ascii", "replace")
    return f"not an image or slide file: it starts with {shown!r}, not an image format's signature"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _VipsBackend:
    """Generic pyramidal TIFF and plain images through libvips."""

    def __init__(self, path: Path) -> None:
        base = pyvips.Image.new_from_file(str(path), access="random")
        loader = base.get("vips-loader")
        self.format = loader.removesuffix("_source").removesuffix("load")
        self.description = _field(base, "image-description") or ""
        self.images = [vips_to_rgb(base)]
        if loader.startswith("tiff"):
            self.images += [vips_to_rgb(im) for im in _tiff_levels(path, base)]
        self._xres = float(_field(base, "xres") or 0.0)  # px per mm; libvips fills in 1.0
        self._regions: dict[int, pyvips.Region] = {}

    @property
    def dimensions(self) -> list[tuple[int, int]]:
        return [(im.width, im.height) for im in self.images]

    def metadata_mpp(self) -> float | None:
        match = _APERIO_MPP.search(self.description)
        if match:
            return _positive(match.group(1))
        match = _OME_MPP.search(self.description)
        if match:
            value = _positive(match.group(1))
            unit = _OME_UNITS.get(match.group(2) or "µm")
            return None if value is None or unit is None else value * unit
        # libvips reports 1 px/mm when a file has no resolution tag; PNGs without pHYs too.
        if self._xres <= 1.0 + 1e-9:
            return None
        return 1000.0 / self._xres

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8, all inside the level."""
        region = self._regions.get(level)
        if region is None:
            region = self._regions[level] = pyvips.Region.new(self.images[level])
        data = region.fetch(x, y, width, height)  # the decoded pixels, not copied again
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)

    def scaled(self, level: int, width: int, height: int) -> np.ndarray:
        image = self.images[level]
        if abs(image.width - width) > 1 or abs(image.height - height) > 1:
            image = image.resize(width / image.width, vscale=height / image.height, kernel="linear")
        return vips_to_numpy(image.crop(0, 0, min(width, image.width), min(height, image.height)))

    def touch(self) -> None:
        # Decode one pixel so truncated or corrupt files fail on open, not mid-tiling.
        self.images[-1].crop(0, 0, 1, 1).write_to_memory()

    def close(self) -> None:
        self._regions.clear()


def _field(image: pyvips.Image, name: str):
    return image.get(name) if name in image.get_fields() else None


def _positive(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def _tiff_levels(path: Path, base: pyvips.Image) -> list[pyvips.Image]:
    """Pyramid levels below page 0: tiled pages, each smaller, same aspect; or sub-IFDs."""
    import tifffile

    levels = []
    try:
        with tifffile.TiffFile(path) as tif:
            first = tif.pages.first
            width0, height0 = first.imagewidth, first.imagelength
            if first.subifds:  # OME-TIFF style: the levels hang off page 0
                for index in range(len(first.subifds)):
                    levels.append(pyvips.Image.tiffload(str(path), subifd=index, access="random"))
                return _consistent(levels, width0, height0)
            previous = (width0, height0)
            for index in range(1, len(tif.pages)):
                page = tif.pages[index]
                shape = (page.imagewidth, page.imagelength)
                if (
                    not page.is_tiled  # Aperio thumbnails, labels, macros are stripped
                    or _NOT_A_LEVEL.search(page.description or "")
                    or shape[0] >= previous[0]
                    or shape[1] >= previous[1]
                    or not _same_aspect(shape, (width0, height0))
                ):
                    continue
                levels.append(pyvips.Image.tiffload(str(path), page=index, access="random"))
                previous = shape
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, AttributeError):
        return []  # a TIFF tifffile cannot parse but libvips can: level 0 only
    return levels


# Formats whose files are TIFFs the structure check below understands.
TIFF_FORMATS = frozenset({"tiff", "openslide-aperio"})
_JPEG = 7  # TIFF Compression tag value of JPEG (new-style) tiles and strips
_MAX_IFDS = 100_000


def tiff_damage(path: str | Path) -> str | None:
    """Why a TIFF's structure is broken, or None when it is sound (or not a TIFF at all).

    libvips opens a truncated pyramid as long as its first directory survives and decodes one
    pixel happily, then a read far into the slide fails, or returns black, mid-run. This finds
    the damage from the structure alone, without decoding: a directory chain that points past
    the end of the file (truncated; tifffile silently drops the levels it cannot reach), tile or
    strip data past the end, and JPEG tiles that do not start with a JPEG start-of-image marker
    (overwritten or zeroed). A tile whose compressed bytes are damaged further in decodes to
    wrong pixels instead: JPEG has no checksum, so no reader can tell.
    """
    import tifffile

    path = Path(path)
    name, size = path.name, path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(16)
    if head[:2] not in (b"II", b"MM") or len(head) < 8:
        return None  # not a TIFF: the loaders decide
    order = "<" if head[:2] == b"II" else ">"
    magic = int.from_bytes(head[2:4], "little" if order == "<" else "big")
    if magic not in (42, 43):
        return None
    problem = _ifd_chain_damage(path, size, order, bigtiff=magic == 43)
    if problem is not None:
        return (
            f"{name}: {problem}; the file is truncated or damaged, copy it again from the scanner"
        )
    try:
        with tifffile.TiffFile(path) as tif:
            pages = {page.offset: page for page in tif.pages}
            for series in tif.series:
                for level in series.levels:
                    pages.update({page.offset: page for page in level.pages if page is not None})
            data = np.memmap(path, dtype=np.uint8, mode="r") if size else None
            for index, page in enumerate(sorted(pages.values(), key=lambda p: p.offset)):
                problem = _page_data_damage(page, data, size)
                if problem is not None:
                    shape = f"{page.imagewidth}x{page.imagelength}"
                    return (
                        f"{name}: image {index} ({shape}) {problem}; the file is truncated or "
                        "damaged, copy it again from the scanner"
                    )
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError) as exc:
        return f"{name}: the TIFF structure cannot be read ({_first_line(exc)})"
    return None


def _ifd_chain_damage(path: Path, size: int, order: str, *, bigtiff: bool) -> str | None:
    """Walk the chain of image directories; say where it leaves the file, if it does."""
    import struct

    count_fmt, entry_size, offset_fmt = ("Q", 20, "Q") if bigtiff else ("H", 12, "I")
    count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
    with path.open("rb") as handle:
        handle.seek(8 if bigtiff else 4)
        (offset,) = struct.unpack(order + offset_fmt, handle.read(offset_size))
        seen: set[int] = set()
        while offset and len(seen) < _MAX_IFDS:
            if offset in seen:
                return f"image directory {len(seen)} points back to an earlier one (a loop)"
            if offset + count_size > size:
                return (
                    f"image directory {len(seen)} should start at byte {offset}, past the end "
                    f"of the {size}-byte file"
                )
            seen.add(offset)
            handle.seek(offset)
            (count,) = struct.unpack(order + count_fmt, handle.read(count_size))
            end = offset + count_size + count * entry_size + offset_size
            if end > size:
                return (
                    f"image directory {len(seen) - 1} ends at byte {end}, past the end of the "
                    f"{size}-byte file"
                )
            handle.seek(end - offset_size)
            (offset,) = struct.unpack(order + offset_fmt, handle.read(offset_size))
    return None


def _page_data_damage(page, data: np.ndarray | None, size: int) -> str | None:
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    present = counts > 0  # a zero count is an empty (sparse) tile, which readers fill
    ends = offsets + counts
    if present.any() and int(ends[present].max()) > size:
        first = int(np.argmax(present & (ends > size)))
        return (
            f"has {'tile' if page.is_tiled else 'strip'} {first} at bytes "
            f"{int(offsets[first])}-{int(ends[first])}, past the end of the {size}-byte file"
        )
    if page.compression == _JPEG and data is not None and present.any():
        starts = offsets[present]
        soi = (data[starts] == 0xFF) & (data[starts + 1] == 0xD8)
        if not soi.all():
            bad = int(np.flatnonzero(present)[np.argmin(soi)])
            return (
                f"has JPEG {'tile' if page.is_tiled else 'strip'} {bad} (at byte "
                f"{int(offsets[bad])}) that is not JPEG data (no start-of-image marker)"
            )
    return None


def _same_aspect(shape: tuple[int, int], base: tuple[int, int]) -> bool:
    downsample = base[0] / shape[0]
    return abs(base[1] / downsample - shape[1]) <= max(2.0, 0.01 * shape[1])


def _consistent(levels: list[pyvips.Image], width0: int, height0: int) -> list[pyvips.Image]:
    out, previous = [], (width0, height0)
    for image in levels:
        shape = (image.width, image.height)
        if shape[0] < previous[0] and shape[1] < previous[1] and _same_aspect(shape, previous):
            out.append(image)
            previous = shape
    return out


class _OpenSlideBackend:
    """Vendor formats through openslide-python; the library comes from the openslide-bin wheel."""

    def __init__(self, path: Path, vendor: str) -> None:
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        self.format = f"openslide-{vendor}"
        self.description = self._osr.properties.get("tiff.ImageDescription", "")
        # OpenSlide's level indices that are pyramid levels: a tiled label or macro page (which
        # shows the slide's paper label) is a "level" to OpenSlide, never to us.
        self._index = _openslide_levels(path, self._osr.level_dimensions)
        self._downsamples = [self._osr.level_downsamples[i] for i in self._index]

    @property
    def dimensions(self) -> list[tuple[int, int]]:
        return [tuple(self._osr.level_dimensions[i]) for i in self._index]

    def metadata_mpp(self) -> float | None:
        value = self._osr.properties.get("openslide.mpp-x")
        return None if value is None else _positive(value)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self._downsamples[level]
        # OpenSlide takes the top-left in level-0 pixels and the size in the level's.
        image = self._osr.read_region(
            (round(x * ds), round(y * ds)), self._index[level], (width, height)
        )
        return rgba_to_rgb(np.asarray(image))

    def scaled(self, level: int, width: int, height: int) -> np.ndarray:
        """The whole level resized to (width, height), read in strips to bound memory."""
        lw, lh = self.dimensions[level]
        out = np.empty((height, width, 3), dtype=np.uint8)
        strip = max(1, (1 << 24) // max(1, lw))  # ~16 Mpx per strip
        scale_y = height / lh
        row = 0
        while row < height:
            rows = min(height - row, max(1, math.floor(strip * scale_y)))
            src0 = math.floor(row / scale_y)
            src1 = min(lh, max(src0 + 1, math.ceil((row + rows) / scale_y)))
            patch = self.read(level, 0, src0, lw, src1 - src0)
            if patch.shape[:2] != (rows, width):
                image = pyvips.Image.new_from_array(patch)
                image = image.resize(width / lw, vscale=rows / (src1 - src0), kernel="linear")
                patch = _fit(vips_to_numpy(image), width, rows)
            out[row : row + rows] = patch
            row += rows
        return out

    def touch(self) -> None:
        self.read(len(self._downsamples) - 1, 0, 0, 1, 1)

    def close(self) -> None:
        self._osr.close()


def _openslide_levels(path: Path, dimensions) -> list[int]:
    """OpenSlide level indices minus any whose TIFF page calls itself a label, macro or overview.

    Pages are matched to levels by size; level 0 is always kept. Files tifffile cannot parse
    (MIRAX, VMS) keep every level: OpenSlide exposes their label and macro as associated images.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            hidden = {
                (page.imagewidth, page.imagelength)
                for page in tif.pages
                if _NOT_A_LEVEL.search(page.description or "")
            }
    except Exception:  # not a TIFF, or one tifffile cannot parse
        return list(range(len(dimensions)))
    return [i for i, dims in enumerate(dimensions) if i == 0 or tuple(dims) not in hidden]


def _fit(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop or edge-pad (H, W, 3) to exactly (height, width, 3)."""
    array = array[:height, :width]
    if array.shape[:2] != (height, width):
        array = np.pad(
            array,
            ((0, height - array.shape[0]), (0, width - array.shape[1]), (0, 0)),
            mode="edge",
        )
    return array


def openslide_vendor(path: Path) -> str | None:
    """OpenSlide's name for the file's format when only OpenSlide should read it, else None."""
    try:
        import openslide

        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # the library missing or a file it chokes on: libvips decides
        return None
    return vendor if vendor in _OPENSLIDE_ONLY else None


def _any_openslide_format(path: Path) -> str:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path)) or "unknown"
    except Exception:
        return "unknown"


class Slide:
    """A pyramidal slide or a single-level image, opened lazily (libvips or OpenSlide).

    `uri` may be a local path or `s3://...` (downloaded into the slide cache first).
    """

    def __init__(
        self,
        path: str | Path,
        storage: StorageOptions | None = None,
        backend: str = "auto",
        max_decode_megapixels: float | None = None,
    ) -> None:
        """`backend`: "auto" (OpenSlide for vendor formats, else libvips), "vips", "openslide".

        Opening decodes one pixel of the smallest level, so a damaged file fails here; for an
        image without tiles or a pyramid that decodes all of it. With `max_decode_megapixels`,
        a slide whose smallest level is larger fails with SlideTooLargeError first, from the
        header alone.
        """
        self.uri = str(path)
        try:
            self.path = local_path(path, storage) if is_remote(path) else Path(path)
        except OSError as exc:
            raise SlideOpenError(f"{self.uri}: cannot be fetched ({_first_line(exc)})") from None
        if not self.path.is_file():
            raise SlideOpenError(f"{self.path}: no such file")
        vendor = openslide_vendor(self.path) if backend == "auto" else None
        if backend == "openslide":
            vendor = _any_openslide_format(self.path)
        try:
            if vendor is not None:
                self._backend = _OpenSlideBackend(self.path, vendor)
            else:
                self._backend = _VipsBackend(self.path)
            dims = self._backend.dimensions
            if max_decode_megapixels is not None:
                _check_decode_size(self.path, dims, max_decode_megapixels)
            self._backend.touch()
        except SlideTooLargeError:
            raise
        except Exception as exc:  # pyvips.Error, openslide.OpenSlideError, OSError...
            raise SlideOpenError(
                f"{self.path.name}: cannot be opened as a slide "
                f"({_not_an_image(self.path) or _first_line(exc)})"
            ) from None
        self.format: str = self._backend.format
        self._levels = tuple(LevelInfo(w, h, dims[0][0] / w) for w, h in dims)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

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
        return list(self._levels)

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel from the file's metadata, or None when it has none.

        The value is reported as found, plausible or not: registration decides what is absurd.
        """
        return self._backend.metadata_mpp()

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed the wanted one (read, then shrink)."""
        best = 0
        for index, info in enumerate(self._levels):
            if info.downsample <= downsample * 1.01:
                best = index
        return best

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 from `level`, with (x, y) in that level's pixels.

        Areas outside the slide are padded with white (glass), so edge tiles keep their size.
        The array may be read-only (it is libvips' buffer, not a copy): copy it to write to it.
        """
        info = self._levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, info.width), min(y + height, info.height)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), 255, dtype=np.uint8)
        patch = self._backend.read(level, x0, y0, x1 - x0, y1 - y0)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return patch  # the common case: no padding, no copy
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = patch
        return out

    def read_tile(self, x0: int, y0: int, extent0: int, level: int, size: int) -> np.ndarray:
        """A square tile given in level-0 coordinates, resized to `size` px if the level differs."""
        ds = self._levels[level].downsample
        span = max(1, round(extent0 / ds))
        patch = self.read_region(level, round(x0 / ds), round(y0 / ds), span, span)
        if span != size:
            patch = resize_rgb(patch, size, size)
        return patch

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The whole slide at roughly level-0 size / downsample, read from the best level."""
        level = self.best_level_for_downsample(downsample)
        width = max(1, math.ceil(self.width / downsample))
        height = max(1, math.ceil(self.height / downsample))
        array = self._backend.scaled(level, width, height)
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
    return _fit(vips_to_numpy(scaled), width, height)
