"""Heatmap overlays on slide thumbnails: the picture a pathologist or line engineer opens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from vadflow.tasks.slides.reader import Slide

TARGET_EDGE_PX = 1024  # long edge of the overlay: readable, and small enough to open anywhere
COLOUR_MAP = "inferno"
BAR_STRIP_PX = 96  # white strip right of the image holding the colour bar and its labels
PNG_COMPRESS_LEVEL = 1


def heatmap_overlay(
    slide_uri: str,
    heatmap: np.ndarray,
    downsample: int,
    out_png: Path,
    vmin: float,
    vmax: float,
    truth: np.ndarray | None = None,
    alpha: float = 0.5,
    colour_bar: bool = True,
    colour_map: str = COLOUR_MAP,
) -> Path:
    """Blend the heatmap (a matplotlib colour map, one vmin..vmax for a whole run) over a
    slide thumbnail.

    The thumbnail is read at whatever level gives a ~1024 px image (at most the slide's own
    size); the heatmap is scaled up to it. Cells without a score (background) show the slide
    as is; lesion outlines are green.
    With ``colour_bar`` a strip on the right shows the colour scale from vmin to vmax.
    """
    slide = Slide(slide_uri)
    # Thumbnail px per heatmap cell: enough for ~TARGET_EDGE_PX, but never past the slide's own
    # pixels (an image scored at downsample 1 is drawn at its own size, not interpolated up).
    zoom = max(1, min(TARGET_EDGE_PX // max(heatmap.shape), int(downsample)))
    h, w = heatmap.shape[0] * zoom, heatmap.shape[1] * zoom
    thumb = slide.thumbnail(downsample / zoom)[:h, :w].astype(np.float32)  # (h, w, 3)
    h, w = thumb.shape[:2]
    big = np.kron(heatmap, np.ones((zoom, zoom), dtype=np.float32))[:h, :w]
    scaled = np.clip((big - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colour = colormaps[colour_map](np.nan_to_num(scaled))[..., :3] * 255.0  # (h, w, 3)
    scored = np.isfinite(big)[..., None]
    out = np.where(scored, (1 - alpha) * thumb + alpha * colour, thumb)
    if truth is not None and truth.any():
        big_truth = np.kron(truth > 0.5, np.ones((zoom, zoom), dtype=bool))[:h, :w]
        edges = find_boundaries(big_truth, mode="thick")
        out[edges] = (0, 255, 0)
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if colour_bar:
        image = with_colour_bar(image, vmin, vmax, colour_map=colour_map)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: 4x faster than the default 6 for 30 % more bytes (a 1024 px texture
    # overlay: 0.07 s against 0.27 s), and a run writes one per slide.
    image.save(out_png, compress_level=PNG_COMPRESS_LEVEL)
    return out_png


def with_colour_bar(
    image: Image.Image,
    vmin: float,
    vmax: float,
    label: str = "score",
    colour_map: str = COLOUR_MAP,
) -> Image.Image:
    """The image with a white strip on its right: a vertical colour bar, vmax at the top.

    Tick labels give vmin, the midpoint and vmax in the heatmap's own units; values outside
    the range are drawn at its ends (the overlay clips them too).
    """
    h = max(image.height, 120)  # room for three labels on very flat images
    out = Image.new("RGB", (image.width + BAR_STRIP_PX, h), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    top, bottom = 24, h - 12
    x0, x1 = image.width + 8, image.width + 28
    ramp = np.linspace(1.0, 0.0, bottom - top)[:, None]  # (rows, 1): top row is vmax
    bar = colormaps[colour_map](np.repeat(ramp, x1 - x0, axis=1))[..., :3] * 255.0
    out.paste(Image.fromarray(bar.astype(np.uint8)), (x0, top))
    draw = ImageDraw.Draw(out)
    try:
        font = ImageFont.load_default(size=13)  # Pillow >= 10.1: a scalable font
    except TypeError:
        font = ImageFont.load_default()
    draw.rectangle((x0 - 1, top - 1, x1, bottom), outline=(0, 0, 0))
    draw.text((x0 - 4, 4), label, fill=(0, 0, 0), font=font)
    for value, y in ((vmax, top), ((vmin + vmax) / 2, (top + bottom) // 2), (vmin, bottom)):
        draw.line((x1, y, x1 + 4, y), fill=(0, 0, 0))
        draw.text((x1 + 6, y - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
    return out
