"""The stages every flow starts with: discover, register, mask + tile, validate.

A plain function that calls tasks, so the nightly and the batch-scoring flows share it
instead of repeating it.
"""

from __future__ import annotations

import polars as pl

from vadflow.tasks.pipeline import (
    discover_task,
    register_task,
    tile_site_task,
    validate_manifests_task,
)
from vadflow.tasks.records import Ingested
from vadflow.tasks.site import SiteConfig, SiteLayout


def ingest(site: SiteConfig, layout: SiteLayout, run: str) -> Ingested:
    """From the site's source to checked manifests; `run` names the contracts report."""
    sources = discover_task(site)
    manifest = register_task(site, sources, layout)
    usable = pl.read_parquet(manifest.path).filter(pl.col("status") == "ok").to_dicts()
    tiling = tile_site_task(usable, site, layout)
    failed = tuple(t for t in tiling if t.status == "failed")
    tiled = [t for t in tiling if t.status != "failed"]
    checked = validate_manifests_task(manifest.path, [t.manifest for t in tiled], site, layout, run)
    dropped = set(checked.quarantined_ids)
    kept = tuple(t for t in tiled if t.slide_id not in dropped)
    return Ingested(manifest.path, kept, failed, checked)
