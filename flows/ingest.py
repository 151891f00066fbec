"""The stages every flow starts with: discover, register, mask + tile, validate.

A plain function that calls tasks, so the nightly and the batch-scoring flows share it
instead of repeating it.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from prefect import unmapped

from tasks.prefect_tasks import discover_task, register_task, tile_task, validate_task
from tasks.site import SiteConfig, SiteLayout
from tasks.tiling.grid import TilingResult


@dataclass(frozen=True)
class Ingested:
    slides_path: str
    slides: pl.DataFrame
    tiling: list[TilingResult]

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
        return (
            self.slides.filter(pl.col("status") == "quarantined")
            .select("slide_id", "reason")
            .to_dicts()
        )

    @property
    def no_tissue(self) -> list[str]:
        return [t.slide_id for t in self.tiling if t.status == "no_tissue"]


def ingest(site: SiteConfig, layout: SiteLayout) -> Ingested:
    sources = discover_task(site)
    slides_path = register_task(site, sources, layout)
    slides = pl.read_parquet(slides_path)
    usable = slides.filter(pl.col("status") == "ok").to_dicts()
    tiling = tile_task.map(usable, site=unmapped(site), layout=unmapped(layout)).result()
    validate_task(slides_path, [t.manifest for t in tiling], layout)
    return Ingested(slides_path, slides, list(tiling))
