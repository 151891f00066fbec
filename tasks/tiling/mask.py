"""Tissue (or object) masks: Otsu on one colour feature at a coarse level, then morphology.

Glass is bright and grey (low saturation); stained tissue is coloured. Otsu picks the split;
a floor on the threshold keeps an all-glass slide from being split into "tissue" noise.
Industrial parts are rarely coloured: their presets threshold darkness (or brightness) instead.

Masking settings are data: `MASK_PRESETS` (`presets.py`, re-exported here) maps a name (what a
site file says in `tiling.mask_preset`) to a frozen `MaskPreset`.

The mask is computed at a level chosen from the slide's MPP (`mask_downsample`): a pyramid level
between `mask_mpp` and `mask_mpp_max` (8-16 um/px by default) when one exists, read as is, and the
finest one that stays under a pixel budget, so time and memory stay flat as slides grow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from vadflow.tasks.slides.reader import LevelInfo

# The preset names stay importable from here, where tiling's callers have always found them.
from vadflow.tasks.tiling.presets import DEFAULT_PRESET as DEFAULT_PRESET
from vadflow.tasks.tiling.presets import MASK_PRESETS as MASK_PRESETS
from vadflow.tasks.tiling.presets import MIN_SATURATION as MIN_SATURATION
from vadflow.tasks.tiling.presets import Feature, MaskPreset
from vadflow.tasks.tiling.presets import mask_preset as mask_preset

# Mask pixels above which a coarser level (still inside the MPP range) is preferred: ~2.8k^2,
# so a 25 x 25 mm slide is masked at 16 um/px and mask time stays flat as slides grow.
MASK_PIXEL_BUDGET = 8_000_000


def feature_map(rgb: np.ndarray, feature: Feature) -> np.ndarray:
    """(H, W) float32 in [0, 1] from (H, W, 3) uint8, without skimage's float64 HSV copy."""
    if feature == "saturation":
        red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        # Element-wise over the three planes: ~15x faster than max(axis=-1) on a length-3 axis.
        high = np.maximum(np.maximum(red, green), blue)
        low = np.minimum(np.minimum(red, green), blue)
        out = (high - low).astype(np.float32)  # uint8 difference cannot underflow: high >= low
        np.divide(out, high, out=out, where=high > 0)
        return out
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    return 1.0 - luma if feature == "darkness" else luma


def tissue_mask(
    rgb: np.ndarray, preset: MaskPreset = MaskPreset(), um_per_px: float | None = None
) -> np.ndarray:
    """Boolean (H, W) tissue mask from a low-resolution RGB thumbnail.

    `um_per_px` is the mask's resolution; with it, object and hole sizes come from the preset's
    um^2, without it from `min_object_px`.
    """
    value = feature_map(rgb, preset.feature)  # (H, W)
    if value.size == 0 or float(value.max()) < preset.min_value:
        return np.zeros(value.shape, dtype=bool)
    # Otsu on a 256-bin histogram: the same threshold as on floats, without sorting 10^7 values.
    counts = np.bincount(np.round(value * 255).astype(np.uint8).ravel(), minlength=256)
    try:
        threshold = float(threshold_otsu(hist=(counts, np.arange(256)))) / 255.0
    except ValueError:  # a constant image
        threshold = preset.min_value
    mask = value > max(threshold, preset.min_value)
    if preset.closing_px > 0:
        structure = np.ones((2 * preset.closing_px + 1,) * 2, dtype=bool)
        # Pad so the closing does not erode tissue that touches the border.
        pad = preset.closing_px
        closed = ndimage.binary_closing(np.pad(mask, pad, mode="edge"), structure=structure)
        mask = closed[pad:-pad, pad:-pad]
    area_px = None if um_per_px is None else um_per_px**2
    min_px = preset.min_object_px if area_px is None else int(preset.min_object_um2 / area_px)
    if min_px > 0:
        mask = remove_small_objects(mask, max_size=min_px)
    if preset.fill_holes:
        if preset.max_hole_um2 is None or area_px is None:
            mask = ndimage.binary_fill_holes(mask)
        else:
            mask = remove_small_holes(mask, max_size=int(preset.max_hole_um2 / area_px))
    return mask.astype(bool)


def mask_downsample(
    levels: Sequence[LevelInfo],
    mpp0: float | None,
    mpp_range: tuple[float, float] = (8.0, 16.0),
    budget: int = MASK_PIXEL_BUDGET,
) -> float:
    """Level-0 px per mask pixel.

    With an MPP: the finest pyramid level whose resolution lies in `mpp_range` and whose pixel
    count fits `budget`, read without resampling; with no such level, the finest resolution in
    the range that fits the budget (or the range's coarse end). Without an MPP (industrial images):
    full resolution up to 4k px, then about 2k px on the long side.
    """
    width, height = levels[0].width, levels[0].height
    if mpp0 is None:
        longest = max(width, height)
        return 1.0 if longest <= 4096 else longest / 2048
    lo = max(1.0, mpp_range[0] / mpp0)
    hi = max(lo, mpp_range[1] / mpp0)

    def pixels(ds: float) -> float:
        return (width / ds) * (height / ds)

    in_range = sorted(lv.downsample for lv in levels if lo * 0.99 <= lv.downsample <= hi * 1.01)
    fitting = [ds for ds in in_range if pixels(ds) <= budget]
    if fitting:
        return fitting[0]
    return min(hi, max(lo, math.sqrt(width * height / budget)))
