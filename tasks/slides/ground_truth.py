"""Ground truth at any downsample, from ASAP XML polygons or from a mask image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyvips

from vadflow.tasks.slides.annotations import rasterize_annotations, read_asap_xml


def ground_truth_mask(
    annotation_uri: str | None, width: int, height: int, downsample: float
) -> np.ndarray:
    """Lesion coverage in [0, 1] on a grid of ceil(size / downsample) cells.

    XML annotations are rasterised straight at the coarse grid; mask images (MVTec's
    `*_mask.png`) are shrunk with area averaging. No annotation means no lesion.
    """
    shape = (math.ceil(height / downsample), math.ceil(width / downsample))
    if annotation_uri is None:
        return np.zeros(shape, dtype=np.float32)
    path = Path(annotation_uri)
    if path.suffix.lower() == ".xml":
        mask = rasterize_annotations(read_asap_xml(path), width, height, downsample)
        return mask.astype(np.float32)
    image = pyvips.Image.new_from_file(str(path), access="sequential")
    if image.bands > 1:
        image = image.extract_band(0)
    if image.width != width or image.height != height:
        raise ValueError(
            f"{path.name}: mask is {image.width}x{image.height} but its image is "
            f"{width}x{height}; masks must match their image"
        )
    scaled = (image > 127).ifthenelse(1.0, 0.0).cast("float")
    if downsample != 1:
        scaled = scaled.resize(shape[1] / width, vscale=shape[0] / height, kernel="linear")
    array = np.ndarray(
        buffer=scaled.write_to_memory(), dtype=np.float32, shape=(scaled.height, scaled.width)
    )
    out = np.zeros(shape, dtype=np.float32)
    h, w = min(shape[0], array.shape[0]), min(shape[1], array.shape[1])
    out[:h, :w] = np.clip(array[:h, :w], 0, 1)
    return out
