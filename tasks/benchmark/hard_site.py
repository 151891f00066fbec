"""The benchmark's site: a hard-mode Camelyon16-shaped synthetic site in a few sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SiteSize:
    """A hard site's geometry: slide size (level 0, 0.25 um/px) and how many of each slide."""

    width: int
    height: int
    n_train_normal: int  # a quarter of them (at least one) is held out as validation
    n_test_normal: int
    n_test_tumor: int
    n_train_tumor: int = 0  # annotated: only the labelled baselines train on them


SIZES: dict[str, SiteSize] = {
    "tiny": SiteSize(2048, 1536, 3, 1, 2, 1),
    "small": SiteSize(3072, 2048, 4, 3, 3, 2),
    "medium": SiteSize(3072, 2304, 6, 5, 5, 3),
}


def site_size(size: str | SiteSize) -> SiteSize:
    """`size` by name (tiny, small, medium) or as given; ValueError naming the sizes."""
    if isinstance(size, SiteSize):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}") from None


def build_hard_site(
    out_dir: Path, size: str | SiteSize = "small", seed: int = 0, name: str = "hard-site"
) -> Path:
    """Write a hard-mode Camelyon16-shaped site and return its folder."""
    from vadflow.tasks.synth.pathology import make_pathology_site

    geometry = site_size(size)
    return make_pathology_site(
        Path(out_dir),
        name,
        n_train_normal=geometry.n_train_normal,
        n_test_normal=geometry.n_test_normal,
        n_test_tumor=geometry.n_test_tumor,
        n_train_tumor=geometry.n_train_tumor,
        width=geometry.width,
        height=geometry.height,
        seed=seed,
        mode="hard",
    )
