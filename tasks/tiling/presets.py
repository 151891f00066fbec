"""Masking presets as data: a name a site file gives in `tiling.mask_preset` -> `MaskPreset`.

Site validation checks a preset name here, and `mask.py` reads the settings; this module imports
nothing but the standard library, so loading a site pulls in neither the masking code nor its
image libraries (scipy, scikit-image). Sizes are in um^2 where the slide has an MPP and in mask
pixels where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MIN_SATURATION = 0.08  # glass with a colour cast stays below this

Feature = Literal["saturation", "darkness", "brightness"]


@dataclass(frozen=True)
class MaskPreset:
    """Masking settings as data, so a site can pick them by name."""

    feature: Feature = "saturation"  # HSV saturation (stains), 1 - luma, or luma
    min_value: float = MIN_SATURATION  # floor under Otsu's threshold, feature units in [0, 1]
    closing_px: int = 1  # binary closing radius, mask pixels (bridges stain gaps)
    min_object_um2: float = 20_000.0  # specks smaller than this are dropped (slides with MPP)
    min_object_px: int = 16  # the same, in mask pixels, for images without MPP
    fill_holes: bool = True
    max_hole_um2: float | None = None  # None fills every hole; else only holes up to this size
    description: str = ""

    @property
    def min_saturation(self) -> float:  # the name earlier code used
        return self.min_value


MASK_PRESETS: dict[str, MaskPreset] = {
    "he": MaskPreset(description="H&E: coloured tissue on bright glass"),
    "he-faint": MaskPreset(
        min_value=0.04,
        min_object_um2=10_000.0,
        description="pale or under-stained H&E, frozen sections, thin fatty tissue",
    ),
    "he-keep-lumens": MaskPreset(
        max_hole_um2=250_000.0,
        description="H&E, but large holes (vessels, lumens, fat) stay background",
    ),
    "ihc": MaskPreset(
        min_value=0.05,
        closing_px=2,
        description="IHC (DAB + hematoxylin): weaker colour than H&E",
    ),
    "object-dark": MaskPreset(
        feature="darkness",
        min_value=0.05,
        min_object_px=64,
        description="industrial: a part darker than a light background",
    ),
    "object-bright": MaskPreset(
        feature="brightness",
        min_value=0.05,
        min_object_px=64,
        description="industrial: a part lighter than a dark background",
    ),
}
DEFAULT_PRESET = {"pathology": "he", "industrial": "object-dark"}


def mask_preset(name: str) -> MaskPreset:
    """The preset called `name`; an unknown name lists the known ones."""
    try:
        return MASK_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown mask preset {name!r}: use one of {', '.join(sorted(MASK_PRESETS))}"
        ) from None
