"""Tissue masks: Otsu on HSV saturation at a coarse level, then morphology.

Glass is bright and grey (low saturation); stained tissue is coloured. Otsu picks the split;
a floor on the threshold keeps an all-glass slide from being split into "tissue" noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

MIN_SATURATION = 0.08  # glass with a colour cast stays below this


@dataclass(frozen=True)
class MaskPreset:
    """Masking settings as data, so a site can pick or override them by name."""

    min_saturation: float = MIN_SATURATION
    min_object_px: int = 16
    fill_holes: bool = True
    closing_px: int = 1


def tissue_mask(rgb: np.ndarray, preset: MaskPreset = MaskPreset()) -> np.ndarray:
    """Boolean (H, W) tissue mask from a low-resolution RGB thumbnail."""
    saturation = rgb2hsv(rgb)[..., 1]  # (H, W) in [0, 1]
    if float(saturation.max()) < preset.min_saturation:
        return np.zeros(saturation.shape, dtype=bool)
    try:
        threshold = float(threshold_otsu(saturation))
    except ValueError:  # a constant image
        threshold = preset.min_saturation
    mask = saturation > max(threshold, preset.min_saturation)
    if preset.closing_px > 0:
        structure = np.ones((2 * preset.closing_px + 1,) * 2, dtype=bool)
        mask = ndimage.binary_closing(mask, structure=structure)
    if preset.min_object_px > 0:
        mask = remove_small_objects(mask, max_size=preset.min_object_px)
    if preset.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask.astype(bool)
