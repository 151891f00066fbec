"""Heatmap overlays on slide thumbnails: the picture a pathologist or line engineer opens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from vadflow.tasks.exports.probability import ProbabilityScale
from vadflow.tasks.slides.reader import Slide

TARGET_EDGE_PX = 1024  # long edge of the overlay: readable, and small enough to open anywhere
COLOUR_MAP = "inferno"
BAR_STRIP_PX = 96  # white strip right of the image holding the colour bar and its labels
PNG_COMPRESS_LEVEL = 1
COLOUR_START = 0.3  # the colour map's low end is near black on inferno: start past it
TRUTH_RGB = (0, 255, 0)  # annotated lesion outlines


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
    *,
    scale: ProbabilityScale | None = None,
    thumbnail_png: Path | None = None,
) -> Path:
    """Colour a slide thumbnail where the model predicts an anomaly, and only there.

    Heatmap cells at or below the prediction level (``scale.cut``, the model's calibrated
    threshold; the run's normal floor ``vmin`` without one), unscored cells and glass (never
    scored) leave the slide as it is; cells above it are blended in at ``alpha`` with a
    colour that grows with their calibrated probability (``scale``; the raw score up to
    ``vmax`` where the model has no probability). Annotated lesions (``truth``) are outlined
    in green. With ``colour_bar`` a strip on the right gives the colour scale, in probability
    where there is one. ``thumbnail_png`` also saves the plain thumbnail, for a side-by-side.

    The thumbnail is read at whatever level gives a ~1024 px image (at most the slide's own
    size); the heatmap is scaled up to it.
    """
    slide = Slide(slide_uri)
    # Thumbnail px per heatmap cell: enough for ~TARGET_EDGE_PX, but never past the slide's own
    # pixels (an image scored at downsample 1 is drawn at its own size, not interpolated up).
    zoom = max(1, min(TARGET_EDGE_PX // max(heatmap.shape), int(downsample)))
    h, w = heatmap.shape[0] * zoom, heatmap.shape[1] * zoom
    thumb = slide.thumbnail(downsample / zoom)[:h, :w].astype(np.float32)  # (h, w, 3)
    h, w = thumb.shape[:2]
    big = np.kron(heatmap, np.ones((zoom, zoom), dtype=np.float32))[:h, :w]
    legend = overlay_legend(scale, vmin, vmax)
    strength, shown = colour_strength(big, scale, legend)
    colour = colormaps[colour_map](colour_position(strength))[..., :3] * 255.0  # (h, w, 3)
    out = np.where(shown[..., None], (1 - alpha) * thumb + alpha * colour, thumb)
    if truth is not None and truth.any():
        big_truth = np.kron(truth > 0.5, np.ones((zoom, zoom), dtype=bool))[:h, :w]
        edges = find_boundaries(big_truth, mode="thick")
        out[edges] = TRUTH_RGB
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if colour_bar:
        image = with_colour_bar(
            image, legend.low, legend.high, legend.label, colour_map, start=COLOUR_START
        )
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: 4x faster than the default 6 for 30 % more bytes (a 1024 px texture
    # overlay: 0.07 s against 0.27 s), and a run writes one per slide.
    image.save(out_png, compress_level=PNG_COMPRESS_LEVEL)
    if thumbnail_png is not None:
        plain = Image.fromarray(thumb.clip(0, 255).astype(np.uint8))
        plain.save(thumbnail_png, compress_level=PNG_COMPRESS_LEVEL)
    return out_png


@dataclass(frozen=True)
class OverlayLegend:
    """What the colours of an overlay mean: ``low`` (just above the prediction level) to
    ``high``, in probability or in raw score, as ``label`` says; ``cut`` is the raw level."""

    cut: float
    low: float
    high: float
    label: str
    probability: bool


def overlay_legend(scale: ProbabilityScale | None, vmin: float, vmax: float) -> OverlayLegend:
    """The colour scale of an overlay: from the prediction level (the model's calibrated one;
    else the run's normal floor ``vmin``) up to probability 1, or, without a calibrated
    probability, up to the raw ``vmax``."""
    cut = scale.cut if scale is not None and scale.has_cut else float(vmin)
    if scale is not None and scale.calibrated:
        low = scale.probability_of(cut)
        return OverlayLegend(cut, 0.0 if low is None else low, 1.0, "probability", True)
    return OverlayLegend(cut, cut, max(float(vmax), cut + 1e-12), "raw score", False)


def colour_strength(
    values: np.ndarray, scale: ProbabilityScale | None, legend: OverlayLegend
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's place on the legend (0 at its low end, 1 at its high end) and whether it
    is coloured at all: scored and strictly above the prediction level."""
    finite = np.isfinite(values)
    shown = finite & (np.where(finite, values, -np.inf) > legend.cut)
    if legend.probability and scale is not None:
        level = scale.probability(values.ravel()).reshape(values.shape)
    else:
        level = values
    span = max(legend.high - legend.low, 1e-12)
    strength = np.clip((np.nan_to_num(level, nan=legend.low) - legend.low) / span, 0.0, 1.0)
    return strength.astype(np.float32), shown


def colour_position(strength: np.ndarray) -> np.ndarray:
    """Where on the colour map a strength in [0, 1] is drawn: from ``COLOUR_START`` up, so
    the weakest prediction is a visible colour, not the map's near-black low end."""
    return COLOUR_START + (1.0 - COLOUR_START) * strength


def with_colour_bar(
    image: Image.Image,
    vmin: float,
    vmax: float,
    label: str = "score",
    colour_map: str = COLOUR_MAP,
    start: float = 0.0,
) -> Image.Image:
    """The image with a white strip on its right: a vertical colour bar, vmax at the top.

    Tick labels give vmin, the midpoint and vmax in the heatmap's own units; values outside
    the range are drawn at its ends (the overlay clips them too). ``start`` is where on the
    colour map vmin is drawn (the overlay's ``COLOUR_START``).
    """
    h = max(image.height, 120)  # room for three labels on very flat images
    out = Image.new("RGB", (image.width + BAR_STRIP_PX, h), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    top, bottom = 24, h - 12
    x0, x1 = image.width + 8, image.width + 28
    ramp = np.linspace(1.0, start, bottom - top)[:, None]  # (rows, 1): top row is vmax
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
