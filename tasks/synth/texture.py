"""Generated H&E-like texture tiles, normal or with a small planted defect.

Pink stroma with scattered purple nuclei, per-tile stain jitter and noise: cheap tiles with the
statistics of tissue, for detector tests and the throughput benchmark
(`benchmarks/detectors.py`), so AUROCs there and in the tests are on the same kind of data.
"""

from __future__ import annotations

import numpy as np

PINK = np.array([0.93, 0.72, 0.80])
NUCLEUS = np.array([0.48, 0.28, 0.58])
DENSE_NUCLEUS = np.array([0.30, 0.12, 0.40])
SCRATCH = np.array([0.55, 0.40, 0.45])
FOREIGN = np.array([0.90, 0.62, 0.62])


def soft_discs(
    rng: np.random.Generator,
    n: int,
    size: int,
    count: int,
    r_lo: float,
    r_hi: float,
    centre: tuple[np.ndarray, np.ndarray] | None = None,
    spread: float = 0.0,
) -> np.ndarray:
    """(n, size, size) coverage in [0, 1] of `count` soft-edged discs per tile."""
    if centre is None:
        cy, cx = rng.uniform(0, size, (2, n, count))
    else:
        cy = centre[0][:, None] + rng.normal(0, spread, (n, count))
        cx = centre[1][:, None] + rng.normal(0, spread, (n, count))
    radius = rng.uniform(r_lo, r_hi, (n, count))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = np.hypot(yy - cy[..., None, None], xx - cx[..., None, None])  # (n, count, S, S)
    return np.clip(radius[..., None, None] + 0.5 - dist, 0, 1).max(axis=1)


def texture_tiles(
    rng: np.random.Generator, n: int, size: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """H&E-like tiles: pink stroma, scattered purple nuclei, per-tile stain jitter, noise.

    Defects (a few pixels across, as in a real tile): 'dense' a clump of darker nuclei,
    'scratch' a thin dark line segment, 'patch' an 8 px square of foreign striped texture.
    Returns uint8 tiles (n, size, size, 3) and the defect masks (n, size, size).
    """
    mask = np.zeros((n, size, size), bool)
    background = PINK + rng.normal(0, 0.02, (n, 1, 1, 3))
    img = np.broadcast_to(background, (n, size, size, 3)).copy()
    cover = soft_discs(rng, n, size, round(10 * (size / 32) ** 2), 1.2, 2.2)[..., None]
    img = img * (1 - cover) + NUCLEUS * cover
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if defect == "dense":
        centre = rng.uniform(size * 0.25, size * 0.75, (2, n))
        cover = soft_discs(rng, n, size, 8, 1.5, 2.5, centre=centre, spread=2.0)[..., None]
        img = img * (1 - cover) + DENSE_NUCLEUS * cover
        mask = cover[..., 0] > 0.5
    elif defect == "scratch":
        theta = rng.uniform(0, np.pi, (n, 1, 1))
        offset = rng.uniform(-size / 4, size / 4, (n, 1, 1))
        across = (xx - size / 2) * np.sin(theta) - (yy - size / 2) * np.cos(theta) - offset
        along = (xx - size / 2) * np.cos(theta) + (yy - size / 2) * np.sin(theta)
        cover = (np.clip(1.0 - np.abs(across), 0, 1) * (np.abs(along) < 8))[..., None]
        img = img * (1 - cover) + SCRATCH * cover
        mask = cover[..., 0] > 0.5
    elif defect == "patch":
        side = 8
        stripes = 0.85 + 0.15 * (0.5 + 0.5 * np.sin((xx + yy)[:side, :side] * 1.5))
        corners = rng.integers(0, size - side, (n, 2))
        for tile, tile_mask, (y0, x0) in zip(img, mask, corners, strict=True):
            tile[y0 : y0 + side, x0 : x0 + side] = FOREIGN * stripes[..., None]
            tile_mask[y0 : y0 + side, x0 : x0 + side] = True
    elif defect is not None:
        raise ValueError(f"unknown defect {defect!r}: use dense, scratch or patch")
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def texture_batch(seed: int, n: int, size: int, defect: str | None = None) -> np.ndarray:
    """n uint8 (n, size, size, 3) tiles from `seed`, normal or with a planted `defect`.

    Made 8 tiles at a time: the generator holds float64 (n, nuclei, size, size) arrays,
    ~3 GB for 128 tiles of 128 px at once.
    """
    rng = np.random.default_rng(seed)
    chunks = [texture_tiles(rng, min(8, n - i), size, defect)[0] for i in range(0, n, 8)]
    return np.concatenate(chunks)
