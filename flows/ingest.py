"""The stages every flow starts with: discover, register, mask + tile, validate.

A plain function that calls tasks, so the nightly and the batch-scoring flows share it
instead of repeating it.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from vadflow.tasks.prefect_tasks import (
    discover_task,
    register_task,
    tile_site_task,
    validate_manifests_task,
)
from vadflow.tasks.site import SiteConfig, SiteLayout
from vadflow.tasks.tiling.grid import TilingResult
from vadflow.tasks.validation import BoundaryCheck


@dataclass(frozen=True)
class Ingested:
    slides_path: str
    tiling: list[TilingResult]  # slides that tiled and passed the contracts
    failed: list[TilingResult]  # slides whose tiling failed, with reasons
    checked: BoundaryCheck

    @property
    def slides(self) -> pl.DataFrame:
        """The slide manifest as it stands now (contracts may have quarantined slides)."""
        return pl.read_parquet(self.slides_path)

    @property
    def tile_paths(self) -> list[str]:
        return [t.manifest for t in self.tiling]

    def scorable(self, splits: tuple[str, ...]) -> list[dict]:
        """Slide rows with tiles, in the given splits."""
        tiled = {t.slide_id for t in self.tiling if t.tiles > 0}
        return [
            r
            for r in self.slides.filter(pl.col("status") == "ok").to_dicts()
            if r["slide_id"] in tiled and r["split"] in splits
        ]

    def manifest_of(self, slide_id: str) -> str:
        return next(t.manifest for t in self.tiling if t.slide_id == slide_id)

    @property
    def quarantined(self) -> list[dict]:
        frozen = self.slides.filter(pl.col("status") == "quarantined")
        listed = frozen.select("slide_id", "reason").to_dicts()
        listed += [{"slide_id": t.slide_id, "reason": t.reason} for t in self.failed]
        return listed

    @property
    def no_tissue(self) -> list[str]:
        return [t.slide_id for t in self.tiling if t.status == "no_tissue"]


def ingest(site: SiteConfig, layout: SiteLayout, run: str) -> Ingested:
    sources = discover_task(site)
    slides_path = register_task(site, sources, layout)
    usable = pl.read_parquet(slides_path).filter(pl.col("status") == "ok").to_dicts()
    tiling = tile_site_task(usable, site, layout)
    failed = [t for t in tiling if t.status == "failed"]
    tiled = [t for t in tiling if t.status != "failed"]
    checked = validate_manifests_task(slides_path, [t.manifest for t in tiled], site, layout, run)
    dropped = set(checked.quarantined_ids)
    kept = [t for t in tiled if t.slide_id not in dropped]
    return Ingested(slides_path, kept, failed, checked)
