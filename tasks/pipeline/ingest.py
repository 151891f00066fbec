"""The ingest stage's tasks: discover, register, mask + tile (the manifest contracts are in
validate.py). Each calls one stage of `tasks/slides/` or `tasks/tiling/`."""

from __future__ import annotations

from prefect import get_run_logger, task

from vadflow.tasks.manifests import write_parquet_atomic
from vadflow.tasks.records import Quarantined, SlideManifest
from vadflow.tasks.site import SiteConfig, SiteLayout
from vadflow.tasks.slides.discover import SlideSource, discover
from vadflow.tasks.slides.register import register_slide, slide_frame, write_quarantine
from vadflow.tasks.tiling.grid import TilingResult
from vadflow.tasks.tiling.runners import tile_site


@task(name="discover")
def discover_task(site: SiteConfig) -> list[SlideSource]:
    """The site's slides and what their place in its folders says (label, split)."""
    sources = discover(site.source, site.domain, site.val_fraction, storage=site.storage.options())
    get_run_logger().info("found %d slides under %s", len(sources), site.source)
    return sources


@task(name="register")
def register_task(
    site: SiteConfig, sources: list[SlideSource], layout: SiteLayout
) -> SlideManifest:
    """Slide manifest for the site; quarantined slides get a JSON file with their reason."""
    logger = get_run_logger()
    options = site.storage.options()
    rows = [
        register_slide(
            s,
            site.name,
            site.domain,
            site.mpp_override,
            site.mpp_bounds,
            options,
            tiling=site.tiling,
            limits=site.limits,
        )
        for s in sources
    ]
    quarantined = tuple(
        Quarantined(r["slide_id"], r["reason"]) for r in rows if r["status"] == "quarantined"
    )
    for q in quarantined:
        logger.warning("quarantined %s: %s", q.slide_id, q.reason)
    write_quarantine(rows, layout.quarantine_uri, options)
    path = write_parquet_atomic(slide_frame(rows), layout.slides_manifest)
    return SlideManifest(str(path), len(rows), quarantined)


@task(name="tile-site")
def tile_site_task(rows: list[dict], site: SiteConfig, layout: SiteLayout) -> list[TilingResult]:
    """Mask and tile every slide: local processes or a Dask cluster, as the site says.

    Finished slides (same content hash and tiling settings) are skipped, so a nightly rerun
    starts no workers when nothing changed; a slide that fails is reported, the rest go on.
    """
    logger = get_run_logger()

    def report(result: TilingResult) -> None:
        if result.status != "ok":
            logger.warning("%s: %s (%s)", result.slide_id, result.status, result.reason)

    return tile_site(rows, site, layout.tiles_uri, layout.masks_uri, on_result=report)
