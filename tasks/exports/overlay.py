"""Heatmap overlays on slide thumbnails: the picture a pathologist or line engineer opens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from skimage.segmentation import find_boundaries

from tasks.slides.reader import Slide

MIN_EDGE_PX = 256  # small industrial images are upscaled so the overlay is readable


def heatmap_overlay(
    slide_uri: str,
    heatmap: np.ndarray,
    downsample: int,
    out_png: Path,
    vmin: float,
    vmax: float,
    truth: np.ndarray | None = None,
    alpha: float = 0.55,
) -> Path:
    """Blend the heatmap (inferno, fixed vmin..vmax across a run) over the thumbnail.

    Cells without a score (background) show the slide as is; ground-truth outlines are green.
    """
    thumb = Slide(slide_uri).thumbnail(downsample).astype(np.float32)  # (h, w, 3)
    h, w = heatmap.shape
    thumb = thumb[:h, :w]
    scaled = np.clip((heatmap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colour = colormaps["inferno"](np.nan_to_num(scaled))[..., :3] * 255.0  # (h, w, 3)
    scored = np.isfinite(heatmap)[..., None]
    out = np.where(scored, (1 - alpha) * thumb + alpha * colour, thumb)
    if truth is not None and truth.any():
        edges = find_boundaries(truth[:h, :w] > 0.5, mode="inner")
        out[edges] = (0, 255, 0)
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if max(image.size) < MIN_EDGE_PX:
        factor = -(-MIN_EDGE_PX // max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png)
    return out_png
