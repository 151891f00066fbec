"""Training-time augmentation of tile batches: the eight symmetries of a square, H&E and HSV
colour jitter, small brightness and contrast changes.

A tile has no "up", so flips and 90-degree rotations are free extra normal data. Stain varies
from lab to lab and from day to day; jittering the haematoxylin and eosin amounts in optical
density (Tellez et al. 2018: per-stain scale and shift in HED space) teaches a model that such
changes are normal, which is one of the two defences against a stain shift (the other is stain
normalisation, `tasks/normalise/stain.py`). Augmentation is for training only: `Trainer` applies
it to shuffled training batches, never to validation batches or to `Detector.score`.

Every function works on a float batch (B, 3, H, W) in [0, 1], draws its randomness from a CPU
`torch.Generator` (so a resumed run draws the same numbers, whatever the device), and returns a
batch in [0, 1] of the same shape on the same device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Ruifrok & Johnston's stain OD vectors (rows: haematoxylin, eosin, DAB), as skimage's
# `rgb_from_hed`; normalised to unit length. DAB is the residual channel of an H&E slide.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1.0 / 255.0  # darkest intensity: one 8-bit step, so OD stays finite
_EPS = 1e-8

MAX_HED_JITTER = 0.5
MAX_HSV_JITTER = 0.5
MAX_BRIGHTNESS = 0.5
MAX_CONTRAST = 0.9  # a contrast factor must stay positive, or the tile is inverted


@dataclass(frozen=True)
class Augmentation:
    """What training may change in a tile. The defaults (flips only) are what every family did
    before the other kinds existed; all off is the identity.

    `hed_jitter` s: each of H and E is scaled by U(1 - s, 1 + s) and shifted by U(-s, s) in OD
    (0.02-0.05 is a realistic lab-to-lab range). `hsv_jitter` s: hue turned by U(-s, s) of a full
    circle, saturation scaled by U(1 - s, 1 + s). `brightness` b: U(-b, b) added. `contrast` c:
    the distance from the tile's mean scaled by U(1 - c, 1 + c).
    """

    flips: bool = True
    rot90: bool = False
    hed_jitter: float = 0.0
    hsv_jitter: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        for name, limit in (
            ("hed_jitter", MAX_HED_JITTER),
            ("hsv_jitter", MAX_HSV_JITTER),
            ("brightness", MAX_BRIGHTNESS),
            ("contrast", MAX_CONTRAST),
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= limit:
                raise ValueError(
                    f"augmentation {name} must be in [0, {limit}], got {value}; "
                    "strengths are fractions (0.03 is a small jitter, 0 turns it off)"
                )

    @classmethod
    def off(cls) -> Augmentation:
        return cls(flips=False, rot90=False)

    @classmethod
    def from_setting(cls, value: bool | Mapping[str, Any] | Augmentation) -> Augmentation:
        """A family config's `augment` field: True (the defaults), False (none), or a mapping
        of this class's fields, as a site file's `augmentation` block gives it."""
        if isinstance(value, Augmentation):
            return value
        if isinstance(value, bool):
            return cls() if value else cls.off()
        valid = [f.name for f in dataclasses.fields(cls)]
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(valid))
            if unknown:
                raise TypeError(
                    f"unknown augmentation setting(s) {', '.join(map(repr, unknown))}; "
                    f"valid: {', '.join(valid)}"
                )
            return cls(**value)
        raise TypeError(
            f"augment must be true, false or a mapping of {valid}, got {type(value).__name__}"
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def active(self) -> bool:
        return self != Augmentation.off()

    def __bool__(self) -> bool:
        return self.active

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a (B, 3, H, W) batch in [0, 1]; each tile draws its own transform."""
        if self.flips or self.rot90:
            batch = random_dihedral(batch, generator, flips=self.flips, rot90=self.rot90)
        if self.hed_jitter > 0:
            batch = hed_jitter(batch, self.hed_jitter, generator)
        if self.hsv_jitter > 0:
            batch = hsv_jitter(batch, self.hsv_jitter, generator)
        if self.brightness > 0 or self.contrast > 0:
            batch = brightness_contrast(batch, self.brightness, self.contrast, generator)
        return batch


def _uniform(
    generator: torch.Generator, shape: tuple[int, ...], low: float, high: float, like: torch.Tensor
) -> torch.Tensor:
    """U(low, high) drawn on the CPU generator, moved to `like`'s device and dtype."""
    draw = torch.rand(shape, generator=generator, dtype=torch.float32)
    return (low + (high - low) * draw).to(device=like.device, dtype=like.dtype)


def random_dihedral(
    batch: torch.Tensor, generator: torch.Generator, *, flips: bool = True, rot90: bool = True
) -> torch.Tensor:
    """Per tile, a random horizontal and vertical flip and (square tiles) a quarter turn.

    Both flips together with quarter turns reach all eight symmetries of a square; every output
    tile is an exact pixel permutation of its input. Non-square tiles get half turns only (a
    quarter turn would change their shape), which both flips already give.
    """
    b = len(batch)
    if flips:
        draws = torch.rand(2, b, generator=generator) < 0.5  # (2, b)
        draws = draws.to(batch.device)[:, :, None, None, None]  # (2, b, 1, 1, 1)
        batch = torch.where(draws[0], batch.flip(-1), batch)
        batch = torch.where(draws[1], batch.flip(-2), batch)
    if rot90 and batch.shape[-1] == batch.shape[-2]:
        turns = torch.randint(0, 4, (b,), generator=generator).to(batch.device)  # (b,)
        turns = turns[:, None, None, None]  # (b, 1, 1, 1)
        out = batch
        for k in (1, 2, 3):
            out = torch.where(turns == k, torch.rot90(batch, k, dims=(-2, -1)), out)
        batch = out
    return batch


def rgb_to_hed(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain amounts (B, 3, H, W): haematoxylin, eosin, DAB."""
    od = -torch.log(batch.clamp(_OD_FLOOR, 1.0))  # Beer-Lambert optical density
    return _mix_channels(od, _HED_FROM_RGB)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed`, clamped to [0, 1]."""
    return torch.exp(-_mix_channels(hed, _RGB_FROM_HED)).clamp(0.0, 1.0)


def _mix_channels(batch: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """out[:, d] = sum_c batch[:, c] * matrix[c, d] for (B, 3, H, W), as plain elementwise sums
    (three channels need no BLAS call)."""
    m = matrix.to(device=batch.device, dtype=batch.dtype)
    x0, x1, x2 = batch.unbind(1)  # each (B, H, W)
    return torch.stack([x0 * m[0, d] + x1 * m[1, d] + x2 * m[2, d] for d in range(3)], dim=1)


def hed_jitter(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random per-tile haematoxylin and eosin amounts: scale U(1-s, 1+s), shift U(-s, s) in OD.

    The DAB channel (what H and E do not explain) is left as it is. Strength 0 returns the
    batch unchanged (no round trip through optical density).
    """
    if strength <= 0:
        return batch
    b = len(batch)
    scale = torch.ones(b, 3, 1, 1, device=batch.device, dtype=batch.dtype)
    shift = torch.zeros(b, 3, 1, 1, device=batch.device, dtype=batch.dtype)
    scale[:, :2] = _uniform(generator, (b, 2, 1, 1), 1.0 - strength, 1.0 + strength, batch)
    shift[:, :2] = _uniform(generator, (b, 2, 1, 1), -strength, strength, batch)
    return hed_to_rgb(rgb_to_hed(batch) * scale + shift)


def rgb_to_hsv(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, each channel in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = batch.unbind(1)  # each (B, H, W)
    value, _ = batch.max(dim=1)
    delta = value - batch.min(dim=1).values
    saturation = torch.where(value > 0, delta / value.clamp_min(_EPS), torch.zeros_like(value))
    safe = delta.clamp_min(_EPS)
    hue = torch.where(
        value == r,
        (g - b) / safe,
        torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`, clamped to [0, 1]."""
    hue, saturation, value = hsv.unbind(1)  # each (B, H, W)
    sector = hue * 6.0
    index = torch.floor(sector).long() % 6  # (B, H, W) in 0..5
    frac = sector - torch.floor(sector)
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * frac)
    t = value * (1.0 - saturation * (1.0 - frac))
    # Per sector, which of (v, t, p, q) each channel takes.
    r = torch.stack([value, q, p, p, t, value])  # (6, B, H, W)
    g = torch.stack([t, value, value, q, p, p])
    b = torch.stack([p, p, t, value, value, q])
    pick = index[None]  # (1, B, H, W)
    rgb = [channel.gather(0, pick)[0] for channel in (r, g, b)]
    return torch.stack(rgb, dim=1).clamp(0.0, 1.0)


def hsv_jitter(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random per-tile hue turn U(-s, s) (of a full circle) and saturation scale U(1-s, 1+s)."""
    if strength <= 0:
        return batch
    b = len(batch)
    turn = _uniform(generator, (b, 1, 1), -strength, strength, batch)
    scale = _uniform(generator, (b, 1, 1), 1.0 - strength, 1.0 + strength, batch)
    hue, saturation, value = rgb_to_hsv(batch).unbind(1)
    hsv = torch.stack([(hue + turn) % 1.0, (saturation * scale).clamp(0.0, 1.0), value], dim=1)
    return hsv_to_rgb(hsv)


def brightness_contrast(
    batch: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator
) -> torch.Tensor:
    """Per tile: distance from the tile's mean scaled by U(1-c, 1+c), then U(-b, b) added."""
    if brightness <= 0 and contrast <= 0:
        return batch
    b = len(batch)
    factor = _uniform(generator, (b, 1, 1, 1), 1.0 - contrast, 1.0 + contrast, batch)
    offset = _uniform(generator, (b, 1, 1, 1), -brightness, brightness, batch)
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return ((batch - mean) * factor + mean + offset).clamp(0.0, 1.0)
