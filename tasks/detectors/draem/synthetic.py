"""Synthetic anomalies for training on normal tiles only: Perlin-noise masks and lesion-like
sources, drawn from a seeded CPU generator.

DRAEM (Zavrtanik et al. 2021) pastes foreign textures (the DTD photo set) into normal images
through a thresholded Perlin-noise mask and teaches a segmenter to find the mask. A pathology
site has no texture set to paste, and its lesions do not look foreign: in the hard synthetic
mode and in real metastases a lesion keeps the host's stain and mean colour and differs in
morphology (denser, larger nuclei; lost stroma). So the sources here are made from the normal
tiles themselves:

- "foreign": another tile of the batch, turned and flipped (tissue from elsewhere);
- "enlarge": the tile itself zoomed in 1.4-2x (the same cells, larger nuclei);
- "dense": the tile's optical density merged with a turned copy of itself by a pixelwise
  maximum (twice the nuclei in the same area);
- "stain": the tile with its haematoxylin amount raised (the one darker kind).

Most sources are then colour-matched: their mean optical density per channel is moved onto
the host tile's, so a segmenter cannot learn "darker" or "bluer" as the whole of an anomaly.
The mask's blobs come from Perlin noise at 2-8 cells per side, thresholded, so their outlines
are smooth and irregular like a lesion's edge; a blend factor leaves some of the host showing.

Every function takes float (B, 3, H, W) tiles in [0, 1] and a CPU `torch.Generator`; the
same generator state gives the same anomalies on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vadflow.tasks.detectors.base import gaussian_smooth
from vadflow.tasks.detectors.components.augment import hed_to_rgb, rgb_to_hed

SOURCES: tuple[str, ...] = ("foreign", "enlarge", "dense", "stain")
PERLIN_RESOLUTIONS: tuple[int, ...] = (2, 4, 8)  # Perlin cells per tile side, drawn per axis
_OD_FLOOR = 1.0 / 255.0


@dataclass(frozen=True)
class AnomalySynthesis:
    """How training tiles are corrupted; the `draem` config holds these as its own fields.

    `probability`: share of tiles that get an anomaly (the rest stay normal with an empty
    mask, so the segmenter also learns to say "nothing here"). `sources`: the kinds drawn from,
    uniformly. `colour_match`: share of sources moved onto the host's mean colour. `max_blend`:
    the host's share inside the mask is drawn from U(0, max_blend). `threshold`: the Perlin
    value (about [-0.7, 0.7]) above which a pixel is in the mask is drawn from this range;
    lower thresholds give larger blobs. `edge_softness`: Gaussian sigma in px of the blend
    weights at the mask's edge (the target mask stays binary); a lesion blends into its host,
    and a segmenter trained on hard seams learns to find seams.
    """

    probability: float = 0.5
    sources: tuple[str, ...] = SOURCES
    colour_match: float = 0.75
    max_blend: float = 0.5
    threshold: tuple[float, float] = (0.2, 0.5)
    edge_softness: float = 1.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown or not self.sources:
            raise ValueError(
                f"anomaly sources must be a non-empty selection of {', '.join(SOURCES)}; "
                f"got {list(self.sources)}"
            )
        for name in ("probability", "colour_match", "max_blend"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"anomaly {name} must be in [0, 1], got {value}")
        if self.edge_softness < 0:
            raise ValueError(f"anomaly edge_softness must be >= 0, got {self.edge_softness}")
        low, high = self.threshold
        if not -1.0 < low <= high < 1.0:
            raise ValueError(
                f"anomaly threshold must be (low, high) in (-1, 1), got {self.threshold}"
            )


def perlin_noise(
    height: int, width: int, res_y: int, res_x: int, generator: torch.Generator
) -> torch.Tensor:
    """One (height, width) field of 2-D Perlin gradient noise with res_y x res_x cells.

    Random unit gradients sit on the cell corners; each pixel blends its four corners' dot
    products with the quintic fade 6t^5 - 15t^4 + 10t^3, so the field is smooth and zero on
    every lattice point. Values lie in about [-0.7, 0.7].
    """
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1, generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry+1, rx+1, 2)
    y = torch.arange(height, dtype=torch.float32) * res_y / height  # (H,) in cell units
    x = torch.arange(width, dtype=torch.float32) * res_x / width  # (W,)
    iy, ix = y.floor().long(), x.floor().long()
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]  # (H, 1), (1, W) offsets inside the cell

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[iy[:, None] + dy, ix[None, :] + dx]  # (H, W, 2)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)  # (H, W)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), wx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), wx)
    return torch.lerp(top, bottom, wy)  # (H, W)


def perlin_masks(
    count: int,
    height: int,
    width: int,
    threshold: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """(count, 1, H, W) binary masks: Perlin noise at a random resolution per axis, above a
    random threshold. A mask may come out empty (then its tile counts as normal)."""
    masks = torch.empty(count, 1, height, width)
    low, high = threshold
    for i in range(count):
        pick = torch.randint(len(PERLIN_RESOLUTIONS), (2,), generator=generator).tolist()
        res_y, res_x = (PERLIN_RESOLUTIONS[k] for k in pick)
        noise = perlin_noise(height, width, res_y, res_x, generator)
        cut = low + (high - low) * torch.rand((), generator=generator).item()
        masks[i, 0] = (noise > cut).float()
    return masks


def _dihedral(tiles: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random quarter turn and flip per tile (square tiles)."""
    turns = torch.randint(0, 4, (len(tiles),), generator=generator).tolist()
    flips = (torch.rand(len(tiles), generator=generator) < 0.5).tolist()
    out = [
        torch.rot90(t, k, dims=(-2, -1)).flip(-1) if f else torch.rot90(t, k, dims=(-2, -1))
        for t, k, f in zip(tiles, turns, flips, strict=True)
    ]
    return torch.stack(out)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def foreign_source(tiles: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each tile's source is another tile of the batch, turned and flipped (a batch of one
    gets its own tile, turned)."""
    b = len(tiles)
    shift = torch.randint(1, max(b, 2), (b,), generator=generator)
    other = (torch.arange(b) + shift) % b  # never the tile itself when b > 1
    return _dihedral(tiles[other.to(tiles.device)], generator)


def enlarge_source(tiles: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The tile zoomed in by U(1.4, 2.0) about a random centre: the same cells, larger."""
    b = len(tiles)
    inverse = 1.0 / _uniform(generator, b, 1.4, 2.0)  # (b,) share of the tile kept
    room = 1.0 - inverse
    tx, ty = _uniform(generator, b, -1, 1) * room, _uniform(generator, b, -1, 1) * room
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = inverse, inverse
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    theta = theta.to(device=tiles.device, dtype=tiles.dtype)
    grid = F.affine_grid(theta, list(tiles.shape), align_corners=False)  # (b, H, W, 2)
    return F.grid_sample(tiles, grid, mode="bilinear", align_corners=False)


def _od(tiles: torch.Tensor) -> torch.Tensor:
    return -torch.log(tiles.clamp(_OD_FLOOR, 1.0))  # Beer-Lambert optical density


def dense_source(tiles: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The tile's optical density merged with a turned, shifted copy of itself by a pixelwise
    maximum: every nucleus of both layers shows, so the same area holds about twice the
    nuclei, with the stain of the tile."""
    turned = _dihedral(tiles, generator)
    h, w = tiles.shape[-2:]
    dy, dx = (torch.randint(0, s, (1,), generator=generator).item() for s in (h, w))
    turned = torch.roll(turned, shifts=(dy, dx), dims=(-2, -1))
    return torch.exp(-torch.maximum(_od(tiles), _od(turned)))


def stain_source(tiles: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The tile with its haematoxylin amount scaled by U(1.3, 1.8): more nuclear stain."""
    scale = torch.ones(len(tiles), 3, 1, 1)
    scale[:, 0, 0, 0] = _uniform(generator, len(tiles), 1.3, 1.8)
    hed = rgb_to_hed(tiles) * scale.to(device=tiles.device, dtype=tiles.dtype)
    return hed_to_rgb(hed)


_SOURCE_FNS = {
    "foreign": foreign_source,
    "enlarge": enlarge_source,
    "dense": dense_source,
    "stain": stain_source,
}


def match_mean_colour(source: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Move each source tile's mean optical density per channel onto its host's: the texture
    stays, the average colour becomes the host's."""
    od_src, od_host = _od(source), _od(host)
    shift = od_host.mean(dim=(2, 3), keepdim=True) - od_src.mean(dim=(2, 3), keepdim=True)
    return torch.exp(-(od_src + shift).clamp_min(0.0)).clamp(0.0, 1.0)


def synthesise(
    tiles: torch.Tensor, settings: AnomalySynthesis, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a (B, 3, H, W) batch: -> (corrupted (B, 3, H, W), target mask (B, 1, H, W)).

    Tiles left normal (1 - `probability` of them, and any whose mask came out empty) come back
    unchanged with an all-zero mask. Draws only from `generator`, in a fixed order.
    """
    b, _, h, w = tiles.shape
    masks = perlin_masks(b, h, w, settings.threshold, generator)  # (B, 1, H, W)
    chosen = torch.rand(b, generator=generator) < settings.probability  # (B,)
    masks = masks * chosen[:, None, None, None].float()

    kinds = torch.randint(len(settings.sources), (b,), generator=generator)  # (B,)
    source = tiles.clone()
    for k, name in enumerate(settings.sources):
        # Every kind draws for the whole batch, so one kind's draws never shift another's.
        made = _SOURCE_FNS[name](tiles, generator)
        pick = (kinds == k).to(tiles.device)[:, None, None, None]
        source = torch.where(pick, made, source)
    matched = torch.rand(b, generator=generator) < settings.colour_match
    source = torch.where(
        matched.to(tiles.device)[:, None, None, None], match_mean_colour(source, tiles), source
    )
    blend = (settings.max_blend * torch.rand(b, 1, 1, 1, generator=generator)).to(tiles.device)
    masks = masks.to(device=tiles.device, dtype=tiles.dtype)
    weights = gaussian_smooth(masks, settings.edge_softness)  # (B, 1, H, W) soft-edged
    inside = blend * tiles + (1.0 - blend) * source
    corrupted = tiles * (1.0 - weights) + inside * weights
    return corrupted, masks
