"""Artefact quality control: where a slide's tissue is a fold, a tear, ink, a bubble, out of
focus or a burnt edge, so the detectors' slide scores and lesion candidates do not read it as
disease.

Every artefact looks unlike normal tissue, so an anomaly detector scores it; on a normal slide a
fold or a crack then outscores a small lesion and the slide call is lost. Pathology pipelines
mask them first (HistoQC, GrandQC); this stage does the same with plain image statistics on one
low-resolution read (`qc_mpp`, 2 um/px by default), in optical density (OD = -ln(I / 256)),
where stain amounts add and a second layer of section doubles:

- fold: OD (smoothed over ~10 um) well above the slide's median tissue OD, with H&E's colour
  balance (a fold is more of the same stain);
- edge: a band `edge_um` wide inside the tissue's border, plus dark, brown (burnt) tissue
  touching it;
- pen: colours no H&E stain makes: in H&E, red light is absorbed no more than green and blue
  much less; green, blue and black inks break one of those;
- bubble: a thin grey outline (a refractive edge) that closes around a region;
- blur: local Laplacian energy far below the slide's median over tissue (HistoQC's
  BlurDetectionModule works the same way);
- crack: thin bright lines inside tissue (a black top-hat on OD), elongated, not round like fat.

Each kind is one function of the same shape, so a site picks the kinds it wants. The result is
a label image: 0 no artefact, i + 1 for `QC_KINDS[i]` (the first kind in that order wins where
they overlap); `qc_mask` is the union. Figures for each kind on generated slides with known
artefacts are in tests/test_qc.py and the README.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage
from skimage import measure

#: Kinds, in the order they are labelled (label = index + 1).
QC_KINDS: tuple[str, ...] = ("pen", "bubble", "crack", "fold", "edge", "blur")
QC_DIR = "qc"  # under the site's masks folder: masks/qc/<slide_id>.png (a label image)
QC_PIXEL_BUDGET = 16_000_000  # QC reads no more than this many pixels (coarser for huge slides)

FOLD_GAIN = 1.55  # a fold's smoothed OD over the slide's median tissue OD
BURNT_BLUE = 0.5  # blue OD / green OD above which dark tissue is brown (burnt), not a fold
PEN_RED = 1.1  # red OD / green OD above which a colour is ink (H&E: <= 1)
PEN_BLUE = 0.75  # blue OD / green OD above which dark tissue is ink (H&E: ~0.1-0.45)
PEN_BLACK_OD = 0.5  # blue OD above the tissue's median that, with red near green, is black ink
BLUR_RATIO = 0.35  # local Laplacian energy / the slide's median that counts as out of focus
CRACK_OD = 0.25  # how much brighter (in summed OD) than its surroundings a crack pixel is


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) float32 optical density, 0 for white."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy * yy + xx * xx <= r * r + r  # a little fuller than the Euclidean disc


def _px(um: float, um_per_px: float) -> float:
    return um / um_per_px


def fold_mask(od: np.ndarray, tissue: np.ndarray, um_per_px: float) -> np.ndarray:
    """Folds: tissue whose smoothed OD is well above the slide's median, in H&E's colours."""
    total = ndimage.gaussian_filter(od.sum(axis=2), _px(5.0, um_per_px))
    if not tissue.any():
        return np.zeros(tissue.shape, dtype=bool)
    median = float(np.median(total[tissue]))
    blue = _smoothed_ratio(od[..., 2], od[..., 1], _px(5.0, um_per_px))
    dark = tissue & (total > FOLD_GAIN * median) & (blue < BURNT_BLUE)
    return _clean(dark, _px(4.0, um_per_px), _px(15.0, um_per_px) ** 2)


def edge_mask(od: np.ndarray, tissue: np.ndarray, um_per_px: float, edge_um: float) -> np.ndarray:
    """A band `edge_um` wide inside the tissue's border, plus burnt (dark, brown) tissue that
    touches the border."""
    depth = ndimage.distance_transform_edt(np.pad(tissue, 1))[1:-1, 1:-1] * um_per_px
    band = tissue & (depth <= edge_um)
    total = ndimage.gaussian_filter(od.sum(axis=2), _px(5.0, um_per_px))
    if not tissue.any():
        return band
    median = float(np.median(total[tissue]))
    blue = _smoothed_ratio(od[..., 2], od[..., 1], _px(5.0, um_per_px))
    burnt = _clean(
        tissue & (total > 1.35 * median) & (blue >= BURNT_BLUE) & (blue < PEN_BLUE),
        _px(4.0, um_per_px),
        _px(15.0, um_per_px) ** 2,
    )
    # Burnt tissue counts as edge where it reaches the border (a dark lesion in the middle
    # would not); then all of that dark piece goes.
    labels, n = ndimage.label(burnt)
    if n:
        touching = np.unique(labels[burnt & (depth <= edge_um + 2 * um_per_px)])
        band |= np.isin(labels, touching[touching > 0])
    return band


def pen_mask(od: np.ndarray, tissue: np.ndarray, um_per_px: float) -> np.ndarray:
    """Ink: red absorbed more than green (blue and green inks), or blue nearly as much as green
    (black ink), where there is stain at all; on tissue and glass alike."""
    sigma = _px(3.0, um_per_px)
    red = _smoothed_ratio(od[..., 0], od[..., 1], sigma)
    blue = _smoothed_ratio(od[..., 2], od[..., 1], sigma)
    stained = ndimage.gaussian_filter(od.sum(axis=2), sigma) > 0.6
    ink = stained & ((red > PEN_RED) | (blue > PEN_BLUE))
    # Black ink over tissue: a flat, grey OD on top of the stain, so blue OD far above the
    # tissue's and red no longer far below green (a burnt, brown edge keeps red low).
    blue_od = ndimage.gaussian_filter(od[..., 2], sigma)
    if tissue.any():
        floor = float(np.median(blue_od[tissue]))
        ink |= (blue_od > floor + PEN_BLACK_OD) & (red > 0.6)
    # Ink strokes are wide; a bubble's grey outline is thin: opening removes it.
    return _clean(ink, _px(5.0, um_per_px), _px(20.0, um_per_px) ** 2, open_px=_px(5, um_per_px))


def bubble_mask(od: np.ndarray, tissue: np.ndarray, um_per_px: float) -> np.ndarray:
    """Air bubbles: a thin grey outline (dark in every channel, unlike H&E) that closes around a
    region; the region and its outline."""
    total = od.sum(axis=2)
    thin = total - ndimage.grey_opening(total, footprint=_disk(round(_px(6.0, um_per_px))))
    blue = od[..., 2] / np.maximum(od[..., 1], 1e-3)
    outline = (thin > 0.5) & (blue > 0.5)
    outline = ndimage.binary_closing(outline, structure=_disk(round(_px(4.0, um_per_px))))
    filled = ndimage.binary_fill_holes(outline)
    inner = filled & ~outline
    # A bubble encloses a sizeable area; nuclei and specks that close on themselves do not.
    inner = _clean(inner, 0, (_px(30.0, um_per_px)) ** 2)
    return ndimage.binary_dilation(inner, structure=_disk(round(_px(6.0, um_per_px))))


def blur_mask(od: np.ndarray, tissue: np.ndarray, um_per_px: float) -> np.ndarray:
    """Out of focus: local Laplacian energy of the OD image far below the slide's median over
    tissue, over windows ~40 um wide."""
    total = od.sum(axis=2)
    energy = ndimage.gaussian_filter(ndimage.laplace(total) ** 2, _px(12.0, um_per_px))
    inner = ndimage.binary_erosion(tissue, structure=_disk(round(_px(10.0, um_per_px))))
    if not inner.any():
        return np.zeros(tissue.shape, dtype=bool)
    median = float(np.median(energy[inner]))
    low = inner & (energy < BLUR_RATIO * median)
    return _clean(low, _px(6.0, um_per_px), _px(40.0, um_per_px) ** 2)


def crack_mask(od: np.ndarray, tissue: np.ndarray, um_per_px: float) -> np.ndarray:
    """Cracks and tears: thin lines much brighter than the tissue around them, elongated."""
    total = ndimage.gaussian_filter(od.sum(axis=2), 0.7)
    gap = ndimage.grey_closing(total, footprint=_disk(round(_px(6.0, um_per_px)))) - total
    inner = ndimage.binary_erosion(tissue, structure=_disk(round(_px(8.0, um_per_px))))
    bright = inner & (gap > CRACK_OD)
    labels, n = ndimage.label(bright, structure=np.ones((3, 3), bool))
    keep = np.zeros(n + 1, dtype=bool)
    for region in measure.regionprops(labels):
        long = region.axis_major_length * um_per_px
        thin = region.axis_minor_length * um_per_px
        keep[region.label] = long >= 25.0 and long >= 4.0 * max(thin, um_per_px)
    lines = keep[labels]
    return ndimage.binary_dilation(lines, structure=_disk(round(_px(3.0, um_per_px))))


def _smoothed_ratio(num: np.ndarray, den: np.ndarray, sigma: float) -> np.ndarray:
    """Ratio of two smoothed OD planes; where there is no stain it is 0."""
    a = ndimage.gaussian_filter(num, sigma)
    b = ndimage.gaussian_filter(den, sigma)
    return np.where(b > 0.05, a / np.maximum(b, 1e-3), 0.0)


def _clean(mask: np.ndarray, close_px: float, min_area_px: float, open_px: float = 0) -> np.ndarray:
    """Opening (drops thin bits), closing (joins a piece's holes), then no piece under an area."""
    if open_px >= 1:
        mask = ndimage.binary_opening(mask, structure=_disk(round(open_px)))
    if close_px >= 1:
        mask = ndimage.binary_closing(mask, structure=_disk(round(close_px)))
    labels, n = ndimage.label(mask)
    if not n:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.r_[False, sizes >= min_area_px]
    return keep[labels]


def qc_labels(
    rgb: np.ndarray,
    tissue: np.ndarray,
    um_per_px: float,
    kinds: Iterable[str] = QC_KINDS,
    edge_um: float = 15.0,
) -> np.ndarray:
    """(H, W) uint8 label image of a slide read at `um_per_px`: 0 clean, i + 1 `QC_KINDS[i]`.

    `tissue` is the tissue mask at the same size; artefacts are looked for on it (pen marks on
    glass too). `kinds` picks which detectors run.
    """
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(QC_KINDS))
    if unknown:
        raise ValueError(f"unknown QC kinds {unknown}; choose from {', '.join(QC_KINDS)}")
    if rgb.shape[:2] != tissue.shape:
        raise ValueError(f"QC image {rgb.shape[:2]} and tissue mask {tissue.shape} differ")
    od = optical_density(rgb)  # (H, W, 3)
    found = {
        "pen": lambda: pen_mask(od, tissue, um_per_px),
        "bubble": lambda: bubble_mask(od, tissue, um_per_px),
        "crack": lambda: crack_mask(od, tissue, um_per_px),
        "fold": lambda: fold_mask(od, tissue, um_per_px),
        "edge": lambda: edge_mask(od, tissue, um_per_px, edge_um),
        "blur": lambda: blur_mask(od, tissue, um_per_px),
    }
    labels = np.zeros(tissue.shape, dtype=np.uint8)
    # Reversed, so the first kind in QC_KINDS is written last and wins where kinds overlap.
    for index in reversed(range(len(QC_KINDS))):
        kind = QC_KINDS[index]
        if kind in kinds:
            labels[found[kind]()] = index + 1
    return labels


def kind_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """A QC label image as kind -> (H, W) bool."""
    return {kind: labels == index + 1 for index, kind in enumerate(QC_KINDS)}


def qc_downsample(width: int, height: int, mpp0: float | None, qc_mpp: float) -> float:
    """Level-0 px per QC pixel: `qc_mpp` um/px, coarser when the slide would exceed the budget."""
    wanted = 1.0 if mpp0 is None else max(1.0, qc_mpp / mpp0)
    budget = float(np.sqrt(width * height / QC_PIXEL_BUDGET))
    return max(wanted, budget)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (h, w) mask to `shape` (both cover the same slide)."""
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1)
    return mask[rows.astype(int)[:, None], cols.astype(int)[None, :]]
