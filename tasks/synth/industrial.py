"""A synthetic MVTec-AD-like production line: textured surfaces, some with scratches or stains.

Good images share one surface (a woven fabric or a wood grain) with per-image jitter in colour,
phase and lighting, so "normal" has real variety; defect images add a drawn defect and its exact
pixel mask. Images are small PNGs, so a whole line generates in a second or two.

Two modes. "easy" (the default) draws defects that change colour: a dark or bright scratch, a
brown stain. "hard" draws defects that keep the texture's colour, so only its structure tells
them apart: a smudge that blurs the weave or grain away, and a scratch that runs along the grain
and shifts the pattern across it by part of a period.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyvips
import yaml
from scipy import ndimage

from vadflow.tasks.synth.pathology import prepare_synthetic_site

DEFECTS = ("scratch", "stain")
HARD_DEFECTS = ("scratch", "smudge")
CATEGORIES = ("fabric", "wood")
MODES = ("easy", "hard")
Mode = Literal["easy", "hard"]

Progress = Callable[[int, int], None]

# The tiling block every generated line gets; keys must stay exactly these (see tasks/site.py).
_SITE_TILING = {
    "target_mpp": None,
    "tile_size": 32,
    "stride": 16,
    "heatmap_downsample": 1,
    "foreground_mask": False,
    "mask_mpp": 8.0,
}


@dataclass(frozen=True)
class _Surface:
    """What every image of a line has in common; each image jitters around it."""

    colour: np.ndarray  # (3,) float, RGB in [0, 1]
    period: float  # thread spacing or grain spacing, px
    angle: float  # radians


@dataclass(frozen=True)
class _Grain:
    """One image's pattern geometry, which hard defects follow."""

    angle: float  # radians; the grain (wood rings, warp threads) runs along (-sin, cos)
    period: float  # px


def make_industrial_site(
    out_dir: Path,
    name: str = "line-a",
    *,
    category: str = "fabric",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 6,
    defects: Sequence[str] | None = None,
    image_size: int = 128,
    defect_strength: float = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
    mode: Mode = "easy",
) -> Path:
    """Write an MVTec-AD-shaped folder `out_dir/name` and return its path.

    Layout: `site.yaml`, `<category>/train/good/NNN.png`, `<category>/test/good/NNN.png`,
    `<category>/test/<defect>/NNN.png` and `<category>/ground_truth/<defect>/NNN_mask.png`
    (uint8 0/255, the image's size). Seeds derive from `seed`, the image's role and index.
    `mode` "easy" draws colour-changing defects (default `DEFECTS`), "hard" colour-keeping ones
    (default `HARD_DEFECTS`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES}")
    known = DEFECTS if mode == "easy" else HARD_DEFECTS
    defects = known if defects is None else defects
    unknown = [d for d in defects if d not in known]
    if unknown:
        raise ValueError(f"unknown defect(s) {unknown} in {mode} mode; choose from {known}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    if defect_strength < 0:
        raise ValueError(f"defect_strength must be >= 0, got {defect_strength}")

    site = prepare_synthetic_site(Path(out_dir) / name, (category,))
    (site / "site.yaml").write_text(
        yaml.safe_dump(
            {"name": name, "domain": "industrial", "tiling": dict(_SITE_TILING)}, sort_keys=False
        )
    )
    surface = _line_surface(np.random.default_rng(_seq(seed, 0, 0)), category)
    root = site / category
    # (folder, defect or None, seed key): train = role 1, test good = role 2, defects = crc32.
    jobs: list[tuple[Path, str | None, np.random.SeedSequence]] = []
    jobs += [
        (root / "train" / "good" / f"{i:03d}.png", None, _seq(seed, 1, i)) for i in range(n_train)
    ]
    jobs += [
        (root / "test" / "good" / f"{i:03d}.png", None, _seq(seed, 2, i))
        for i in range(n_test_good)
    ]
    for defect in defects:
        role = zlib.crc32(defect.encode())
        jobs += [
            (root / "test" / defect / f"{i:03d}.png", defect, _seq(seed, role, i))
            for i in range(n_test_per_defect)
        ]

    for done, (path, defect, image_seed) in enumerate(jobs, start=1):
        rng = np.random.default_rng(image_seed)
        image, grain = _texture(rng, surface, category, image_size)
        if defect is not None:
            if mode == "hard":
                image, mask = _add_hard_defect(rng, image, defect, defect_strength, grain)
            else:
                image, mask = _add_defect(rng, image, defect, defect_strength)
            mask_path = root / "ground_truth" / defect / f"{path.stem}_mask.png"
            _save_png(mask_path, (mask * 255).astype(np.uint8))
        _save_png(path, np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8))
        if progress is not None:
            progress(done, len(jobs))
    return site


def _seq(seed: int, role: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=seed, spawn_key=(role, index))


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    interpretation = "srgb" if array.ndim == 3 else "b-w"
    pyvips.Image.new_from_array(array, interpretation=interpretation).pngsave(str(path))


def _line_surface(rng: np.random.Generator, category: str) -> _Surface:
    if category == "fabric":
        colour = np.array([0.62, 0.55, 0.42]) + rng.uniform(-0.06, 0.06, 3)
        period = rng.uniform(5.0, 7.0)
    else:  # wood
        colour = np.array([0.66, 0.47, 0.30]) + rng.uniform(-0.05, 0.05, 3)
        period = rng.uniform(9.0, 14.0)
    return _Surface(colour=colour, period=period, angle=rng.uniform(0, np.pi))


def _blurred_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about `sigma` px wide."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (noise - noise.mean()) / (noise.std() + 1e-9)


def _texture(
    rng: np.random.Generator, surface: _Surface, category: str, size: int
) -> tuple[np.ndarray, _Grain]:
    """(size, size, 3) float RGB in [0, 1]: the line's surface with this image's jitter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = surface.angle + rng.normal(0, 0.04)
    period = surface.period * rng.uniform(0.97, 1.03)
    u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, 100)
    v = -xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, 100)
    if category == "fabric":
        # Plain weave: warp and weft threads alternate on top, each a rounded ridge.
        warp = np.abs(np.sin(np.pi * u / period)) ** 0.6
        weft = np.abs(np.sin(np.pi * v / period)) ** 0.6
        on_top = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
        shade = 0.78 + 0.22 * np.where(on_top, warp, weft)
        shade += 0.03 * _blurred_noise(rng, size, 0.7)
    else:
        # Wood: growth lines bent by slow noise, with fine fibre noise along them.
        bend = 2.0 * _blurred_noise(rng, size, size / 5)
        rings = 0.5 + 0.5 * np.sin(2 * np.pi * (u + period * 0.4 * bend) / period)
        shade = 0.8 + 0.2 * rings**2 + 0.025 * _blurred_noise(rng, size, 0.8)
    lighting = 1 + 0.04 * _blurred_noise(rng, size, size / 3)
    colour = surface.colour * rng.uniform(0.96, 1.04, 3)
    image = shade[..., None] * lighting[..., None] * colour
    image += rng.normal(0, 0.008, image.shape)  # sensor noise
    return np.clip(image, 0, 1), _Grain(angle=angle, period=period)


def _add_defect(
    rng: np.random.Generator, image: np.ndarray, defect: str, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """The image with one defect drawn in, and its (H, W) bool mask."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if defect == "scratch":
        # A thin straight line over 30-70 % of the image; dark (gouge) or bright (polish).
        length = rng.uniform(0.3, 0.7) * size
        angle = rng.uniform(0, np.pi)
        direction = np.array([math.cos(angle), math.sin(angle)])
        centre = rng.uniform(0.3, 0.7, 2) * size
        p0 = centre - direction * length / 2
        half_width = rng.integers(1, 4) / 2  # thickness 1-3 px
        # Distance from each pixel centre to the segment p0 + t * direction, t in [0, length].
        rel_x, rel_y = xx - p0[0], yy - p0[1]
        t = np.clip(rel_x * direction[0] + rel_y * direction[1], 0, length)
        dist = np.hypot(rel_x - t * direction[0], rel_y - t * direction[1])
        weight = np.clip(half_width + 0.5 - dist, 0, 1)[..., None]  # 1 px anti-aliased edge
        if rng.random() < 0.5:
            out = image * (1 - 0.55 * strength * weight)
        else:
            out = image + (1 - image) * 0.7 * strength * weight
        mask = dist <= half_width
    elif defect == "stain":
        # A smooth irregular blob that tints the surface (oil, rust): darker and browner.
        radius = rng.uniform(0.08, 0.16) * size
        centre = rng.uniform(0.25, 0.75, 2) * size
        harmonics = np.arange(2, 5)
        amps = rng.uniform(0, 0.12, harmonics.size)
        phases = rng.uniform(0, 2 * np.pi, harmonics.size)
        theta = np.arctan2(yy - centre[1], xx - centre[0])[..., None]
        bound = radius * (1 + (amps * np.cos(harmonics * theta + phases)).sum(-1))
        signed = bound - np.hypot(xx - centre[0], yy - centre[1])
        weight = np.clip(0.5 + signed / max(2.0, 0.25 * radius), 0, 1)
        tint = np.array([0.25, 0.4, 0.6]) * strength  # absorbs blue most: brown
        out = image * (1 - weight[..., None] * tint)
        mask = signed >= 0
    else:
        raise ValueError(f"unknown defect {defect!r}; choose from {DEFECTS}")
    return np.clip(out, 0, 1), mask


def _add_hard_defect(
    rng: np.random.Generator, image: np.ndarray, defect: str, strength: float, grain: _Grain
) -> tuple[np.ndarray, np.ndarray]:
    """The image with one colour-keeping defect drawn in, and its (H, W) bool mask.

    Both move pixels of the texture rather than tint them, so the defect's mean colour is the
    texture's: a smudge blurs the pattern away; a scratch along the grain shifts the pattern
    across the grain by 30-50 % of a period inside a 2-3 px line.
    """
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if defect == "smudge":
        radius = rng.uniform(0.08, 0.16) * size
        centre = rng.uniform(0.25, 0.75, 2) * size
        harmonics = np.arange(2, 5)
        amps = rng.uniform(0, 0.15, harmonics.size)
        phases = rng.uniform(0, 2 * np.pi, harmonics.size)
        theta = np.arctan2(yy - centre[1], xx - centre[0])[..., None]
        bound = radius * (1 + (amps * np.cos(harmonics * theta + phases)).sum(-1))
        signed = bound - np.hypot(xx - centre[0], yy - centre[1])
        weight = np.clip(0.5 + signed / max(2.0, 0.2 * radius), 0, 1) * min(strength, 1.0)
        sigma = 0.6 * grain.period  # wide enough to erase threads or rings, not the lighting
        blurred = np.stack(
            [ndimage.gaussian_filter(image[..., c], sigma, mode="reflect") for c in range(3)],
            axis=-1,
        )
        out = image * (1 - weight[..., None]) + blurred * weight[..., None]
        mask = signed >= 0
    elif defect == "scratch":
        along = grain.angle + np.pi / 2 + rng.normal(0, 0.03)  # the grain's direction
        direction = np.array([math.cos(along), math.sin(along)])
        length = rng.uniform(0.4, 0.8) * size
        centre = rng.uniform(0.3, 0.7, 2) * size
        p0 = centre - direction * length / 2
        half_width = rng.uniform(1.0, 1.5)
        rel_x, rel_y = xx - p0[0], yy - p0[1]
        t = np.clip(rel_x * direction[0] + rel_y * direction[1], 0, length)
        dist = np.hypot(rel_x - t * direction[0], rel_y - t * direction[1])
        weight = np.clip(half_width + 0.5 - dist, 0, 1) * min(strength, 1.0)
        # Across the grain = along (cos, sin) of the texture angle.
        shift = rng.uniform(0.3, 0.5) * grain.period * rng.choice([-1.0, 1.0])
        coords = [yy + shift * math.sin(grain.angle), xx + shift * math.cos(grain.angle)]
        shifted = np.stack(
            [
                ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect")
                for c in range(3)
            ],
            axis=-1,
        )
        out = image * (1 - weight[..., None]) + shifted * weight[..., None]
        mask = dist <= half_width
    else:
        raise ValueError(f"unknown hard defect {defect!r}; choose from {HARD_DEFECTS}")
    return np.clip(out, 0, 1), mask
