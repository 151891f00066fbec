"""Stain normalisation: make one site's H&E colours look like a reference site's.

Camelyon16 taught that standardising stain variation matters more than the network. Two
classic methods, each fitted on a *sample of normal tissue tiles* (never whole slides) and saved
with the model as plain JSON, so scoring at another site applies the training site's reference:

- Reinhard et al. 2001: match per-channel mean and standard deviation in LAB space.
- Macenko et al. 2009: estimate the two stain vectors from optical density (OD) by SVD,
  unmix each pixel into stain concentrations, rescale them to the reference's 99th percentile,
  and remix with the reference's stain vectors.

The *source* statistics (what the incoming tiles' stain looks like) are estimated once per
slide, from a sample of its tiles (`for_source`), and then applied to every batch of that slide.
Estimating them per batch instead would normalise a batch that holds a lesion differently from
one that does not, and pull the lesion's colour towards the reference: a tile's output would
depend on which tiles it was batched with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
from skimage.color import lab2rgb, rgb2lab

BACKGROUND_LUMINANCE = 0.85  # pixels brighter than this (in [0, 1]) are glass, not tissue
OD_FLOOR = 0.15  # Macenko's beta: OD below this is background or too faint to unmix
ANGLE_PERCENTILE = 1.0  # Macenko's alpha: robust extremes of the stain-angle distribution


def tissue_pixels(tiles: np.ndarray) -> np.ndarray:
    """(N, 3) float RGB in [0, 1] of the non-glass pixels of uint8 tiles (B, H, W, 3)."""
    rgb = tiles.reshape(-1, 3).astype(np.float32) / 255.0
    keep = rgb.mean(axis=1) < BACKGROUND_LUMINANCE
    return rgb[keep] if keep.sum() >= 16 else rgb


class StainNormaliser:
    """Fit on reference tiles, then transform any tiles; `to_dict`/`from_dict` to save.

    `transform(tiles)` estimates the source statistics from `tiles` themselves (one slide's
    or one site's array at once); `for_source(sample)` fixes them from a sample of a slide's
    tiles and returns a transform for each of that slide's batches.
    """

    method: ClassVar[str]

    def fit(self, tiles: np.ndarray) -> StainNormaliser:
        raise NotImplementedError

    def source(self, tiles: np.ndarray) -> Any:
        """The source statistics of `tiles` that `transform` maps to the reference."""
        raise NotImplementedError

    def transform(self, tiles: np.ndarray, source: Any = None) -> np.ndarray:
        raise NotImplementedError

    def for_source(self, sample: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """A transform with the source statistics of `sample` (B, H, W, 3) fixed; tiles pass
        unchanged when the sample shows no stain to match (all glass)."""
        fixed = self.source(sample)
        if fixed is None:
            return lambda tiles: tiles

        def transform(tiles: np.ndarray) -> np.ndarray:
            return self.transform(tiles, fixed)

        return transform

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class NoNormaliser(StainNormaliser):
    method: ClassVar[str] = "none"

    def fit(self, tiles: np.ndarray) -> NoNormaliser:
        return self

    def source(self, tiles: np.ndarray) -> None:
        return None

    def transform(self, tiles: np.ndarray, source: Any = None) -> np.ndarray:
        return tiles


@dataclass
class Reinhard(StainNormaliser):
    """LAB mean/std matching (Reinhard 2001). Statistics over tissue pixels only."""

    method: ClassVar[str] = "reinhard"
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def fit(self, tiles: np.ndarray) -> Reinhard:
        mean, std = self.source(tiles)
        self.mean, self.std = mean.tolist(), std.tolist()
        return self

    def source(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the tissue pixels in LAB."""
        lab = rgb2lab(tissue_pixels(tiles)[None])[0]  # (N, 3)
        return lab.mean(axis=0), lab.std(axis=0) + 1e-6

    def transform(
        self, tiles: np.ndarray, source: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Match the source's LAB tissue statistics (default: those of `tiles`) to the reference."""
        src_mean, src_std = source if source is not None else self.source(tiles)
        lab = rgb2lab(tiles.astype(np.float32) / 255.0)  # (B, H, W, 3)
        glass = tiles.mean(axis=-1) / 255.0 >= BACKGROUND_LUMINANCE
        lab = (lab - src_mean) / src_std * np.asarray(self.std) + np.asarray(self.mean)
        out = np.clip(lab2rgb(lab) * 255.0, 0, 255).astype(np.uint8)
        out[glass] = tiles[glass]  # glass stays glass
        return out


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer-Lambert OD of RGB in [0, 1]: -log(I / I0) with I0 = 1."""
    return -np.log(np.clip(rgb, 1.0 / 255.0, 1.0))


def macenko_stains(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stain matrix (2, 3) with haematoxylin first, 99th-percentile concentrations (2,))."""
    od = optical_density(tissue_pixels(tiles))  # (N, 3)
    # The usual rule drops pixels with OD below beta in *any* channel; eosin barely absorbs
    # red, so that drops pure-eosin stroma and bends the eosin vector. Use the OD magnitude.
    od = od[np.linalg.norm(od, axis=1) > OD_FLOOR]
    if len(od) < 16:
        raise ValueError("too few stained pixels to estimate stain vectors (is this glass?)")
    _, eigvecs = np.linalg.eigh(np.cov(od.T))  # ascending eigenvalues
    plane = eigvecs[:, 1:3]  # (3, 2): the two largest
    projected = od @ plane  # (N, 2)
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = (v if v[0] >= 0 else -v for v in (v1, v2))  # OD vectors are positive
    # Haematoxylin absorbs red most (larger first component) of the two.
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    concentrations = stain_concentrations(stains, od)  # (N, 2)
    return stains, np.percentile(concentrations, 99, axis=0)


def stain_concentrations(stains: np.ndarray, od: np.ndarray) -> np.ndarray:
    """Least-squares stain amounts (P, 2) of OD pixels (P, 3) for stain vectors (2, 3).

    The pseudo-inverse of the 3 x 2 stain matrix is computed once and applied as one matrix
    product: the same solution as `np.linalg.lstsq` with P right-hand sides, without its
    per-call cost growing with P in LAPACK's workspace.
    """
    return od @ np.linalg.pinv(np.asarray(stains, dtype=np.float64).T).T.astype(od.dtype)


@dataclass
class Macenko(StainNormaliser):
    """OD-SVD stain separation (Macenko 2009), remixed with the reference's stains."""

    method: ClassVar[str] = "macenko"
    stains: list[list[float]] = field(default_factory=list)  # (2, 3), haematoxylin first
    max_concentrations: list[float] = field(default_factory=list)  # (2,)

    def fit(self, tiles: np.ndarray) -> Macenko:
        stains, cmax = macenko_stains(tiles)
        self.stains, self.max_concentrations = stains.tolist(), cmax.tolist()
        return self

    def source(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Stain vectors and 99th-percentile amounts; None when nothing is stained."""
        try:
            return macenko_stains(tiles)
        except ValueError:
            return None

    def transform(
        self, tiles: np.ndarray, source: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Remix with the reference's stains; `source` defaults to the stains of `tiles`."""
        if source is None:
            source = self.source(tiles)
        if source is None:
            return tiles  # nothing stained: leave it as it is
        src_stains, src_max = source
        shape = tiles.shape
        od = optical_density(tiles.reshape(-1, 3).astype(np.float32) / 255.0)  # (P, 3)
        conc = stain_concentrations(src_stains, od)  # (P, 2)
        conc *= np.asarray(self.max_concentrations) / np.maximum(src_max, 1e-6)
        od_ref = conc @ np.asarray(self.stains)  # (P, 3)
        out = np.clip(np.exp(-od_ref) * 255.0, 0, 255).astype(np.uint8).reshape(shape)
        glass = tiles.mean(axis=-1) / 255.0 >= BACKGROUND_LUMINANCE
        out[glass] = tiles[glass]
        return out


NORMALISERS: dict[str, type[StainNormaliser]] = {
    cls.method: cls for cls in (NoNormaliser, Reinhard, Macenko)
}


def make_normaliser(method: str) -> StainNormaliser:
    if method not in NORMALISERS:
        raise ValueError(
            f"unknown stain normalisation {method!r}; choose one of {list(NORMALISERS)}"
        )
    return NORMALISERS[method]()


def normaliser_from_dict(data: dict[str, Any]) -> StainNormaliser:
    data = dict(data)
    cls = NORMALISERS[data.pop("method")]
    return cls(**data)
