"""Site configuration and the on-disk layout of a site's outputs.

A *site* is one hospital or one production line. Its settings are validated by pydantic so a
typo in a site file fails at load time with the field's name, not hours into a nightly run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

SITE_FILE = "site.yaml"


class TilingConfig(BaseModel):
    """How tiles are cut and how coarse the slide heatmap is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_size: int = Field(64, ge=16, le=1024, description="tile edge in pixels at the working MPP")
    stride: int | None = Field(None, ge=8, description="step between tiles; default = tile_size")
    target_mpp: float | None = Field(
        0.5, gt=0, description="working resolution in um/px; None reads level 0 (industrial)"
    )
    mask_mpp: float = Field(8.0, gt=0, description="resolution the tissue mask is computed at")
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)
    min_object_um2: float = Field(
        20_000.0, ge=0, description="tissue specks smaller than this (um^2) are dropped"
    )
    heatmap_downsample: int = Field(16, ge=1, description="heatmap pixel = this many level-0 px")
    foreground_mask: bool = Field(
        True, description="industrial only: False tiles the whole image, ignoring background"
    )

    @property
    def step(self) -> int:
        return self.stride or self.tile_size


class SiteConfig(BaseModel):
    """Everything the nightly flow needs to know about one site."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    domain: Literal["pathology", "industrial"]
    source: str = Field(description="folder (or URI) holding the site's slides or images")
    families: list[str] = Field(default_factory=lambda: ["ae_l2"])
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    detectors: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-family overrides of the family's config dataclass"
    )
    mpp_override: float | None = Field(
        None, gt=0, description="level-0 um/px for slides whose files carry no MPP"
    )
    val_fraction: float = Field(
        0.25, ge=0, lt=1, description="share of normal training slides held out for calibration"
    )
    target_fpr: float = Field(0.05, gt=0, lt=1, description="threshold = normal quantile 1-fpr")
    max_train_tiles: int = Field(4000, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _industrial_defaults(self) -> SiteConfig:
        if self.domain == "industrial" and self.tiling.target_mpp is not None:
            raise ValueError(
                "industrial sites have no MPP: set tiling.target_mpp to null in the site file"
            )
        return self


def load_site(site_dir: str | Path, name: str | None = None) -> SiteConfig:
    """Read `<site_dir>/site.yaml`; without one, guess the domain from the folder layout."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise FileNotFoundError(f"site folder {site_dir} does not exist: give a folder of slides")
    path = site_dir / SITE_FILE
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
    else:
        data = {"domain": _guess_domain(site_dir)}
        if data["domain"] == "industrial":
            data["tiling"] = {"target_mpp": None, "heatmap_downsample": 1}
    data.setdefault("name", name or _slug(site_dir.name))
    data["source"] = str(site_dir.resolve())
    return SiteConfig.model_validate(data)


def _guess_domain(site_dir: Path) -> Literal["pathology", "industrial"]:
    # MVTec AD layout: <category>/train/good
    return "industrial" if any(site_dir.glob("*/train/good")) else "pathology"


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return out or "site"


class SiteLayout:
    """Paths under `<root>/<site>/`, the same locally and (later) under an S3 prefix."""

    def __init__(self, root: str | Path, site: str) -> None:
        self.root = Path(root) / site
        self.site = site

    @property
    def slides_manifest(self) -> Path:
        return self.root / "slides.parquet"

    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def model_dir(self, family: str, version: str) -> Path:
        return self.root / "models" / family / version

    def scores(self, model: str) -> Path:
        return self.root / "scores" / model

    def heatmaps(self, model: str) -> Path:
        return self.root / "heatmaps" / model

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
