"""Heatmap overlays on slide thumbnails: the picture a pathologist or line engineer opens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from skimage.segmentation import find_boundaries

from tasks.slides.reader import Slide

TARGET_EDGE_PX = 1024  # long edge of the overlay: readable, and small enough to open anywhere


def heatmap_overlay(
    slide_uri: str,
    heatmap: np.ndarray,
    downsample: int,
    out_png: Path,
    vmin: float,
    vmax: float,
    truth: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Path:
    """Blend the heatmap (inferno, one vmin..vmax for a whole run) over a slide thumbnail.

    The thumbnail is read at whatever level gives a ~1024 px image; the heatmap is scaled up
    to it. Cells without a score (background) show the slide as is; lesion outlines are green.
    """
    slide = Slide(slide_uri)
    zoom = max(1, TARGET_EDGE_PX // max(heatmap.shape))  # thumbnail px per heatmap cell
    h, w = heatmap.shape[0] * zoom, heatmap.shape[1] * zoom
    thumb = slide.thumbnail(downsample / zoom)[:h, :w].astype(np.float32)  # (h, w, 3)
    h, w = thumb.shape[:2]
    big = np.kron(heatmap, np.ones((zoom, zoom), dtype=np.float32))[:h, :w]
    scaled = np.clip((big - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colour = colormaps["inferno"](np.nan_to_num(scaled))[..., :3] * 255.0  # (h, w, 3)
    scored = np.isfinite(big)[..., None]
    out = np.where(scored, (1 - alpha) * thumb + alpha * colour, thumb)
    if truth is not None and truth.any():
        big_truth = np.kron(truth > 0.5, np.ones((zoom, zoom), dtype=bool))[:h, :w]
        edges = find_boundaries(big_truth, mode="thick")
        out[edges] = (0, 255, 0)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out.clip(0, 255).astype(np.uint8)).save(out_png)
    return out_png
