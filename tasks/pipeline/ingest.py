"""The ingest stage's tasks: discover, register, mask + tile (the manifest contracts are in
validate.py). Each calls one stage of `tasks/slides/` or `tasks/tiling/`, imported in the task
body so that importing a flow costs none of the stages' libraries (scipy, scikit-image)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task

from vadflow.tasks.progress import report
from vadflow.tasks.records import Quarantined, SlideManifest
from vadflow.tasks.site import SiteConfig, SiteLayout

if TYPE_CHECKING:
    from vadflow.tasks.slides.discover import SlideSource
    from vadflow.tasks.tiling.grid import TilingResult


@task(name="discover")
def discover_task(site: SiteConfig) -> list[SlideSource]:
    """The site's slides and what their place in its folders says (label, split)."""
    from vadflow.tasks.slides.discover import discover

    report("discover", 0, 1, f"looking under {site.source}")
    sources = discover(site.source, site.domain, site.val_fraction, storage=site.storage.options())
    get_run_logger().info("found %d slides under %s", len(sources), site.source)
    report("discover", 1, 1, f"{len(sources)} slides")
    return sources


@task(name="register")
def register_task(
    site: SiteConfig, sources: list[SlideSource], layout: SiteLayout, force: bool = False
) -> SlideManifest:
    """Slide manifest for the site; quarantined slides get a JSON file with their reason.

    Unchanged slides keep their previous row (the site's fingerprint index,
    `tasks/slides/register.py`); `force` hashes and opens every slide again."""
    from vadflow.tasks.manifests import write_parquet_atomic
    from vadflow.tasks.slides.register import (
        INDEX_FILE,
        register_slides,
        slide_frame,
        write_quarantine,
    )
    from vadflow.tasks.slides.storage import join

    logger = get_run_logger()
    options = site.storage.options()
    report("register", 0, len(sources))
    done: list[dict] = []

    def on_row(row: dict) -> None:
        done.append(row)
        report("register", len(done), len(sources), f"{row['slide_id']} {row['status']}")

    registered = register_slides(
        sources,
        site.name,
        site.domain,
        site.mpp_override,
        site.mpp_bounds,
        options,
        tiling=site.tiling,
        limits=site.limits,
        index_uri=join(layout.root_uri, INDEX_FILE),
        force=force,
        on_row=on_row,
    )
    rows = registered.rows
    logger.info(
        "registered %d slides: %d unchanged (previous row kept), %d hashed in full",
        len(rows),
        len(registered.reused),
        len(registered.hashed),
    )
    quarantined = tuple(
        Quarantined(r["slide_id"], r["reason"]) for r in rows if r["status"] == "quarantined"
    )
    for q in quarantined:
        logger.warning("quarantined %s: %s", q.slide_id, q.reason)
    write_quarantine(rows, layout.quarantine_uri, options)
    path = write_parquet_atomic(slide_frame(rows), layout.slides_manifest)
    aside = f"{len(quarantined)} quarantined" if quarantined else "none quarantined"
    report("register", len(rows), len(sources), aside)
    return SlideManifest(str(path), len(rows), quarantined)


@task(name="tile-site")
def tile_site_task(rows: list[dict], site: SiteConfig, layout: SiteLayout) -> list[TilingResult]:
    """Mask and tile every slide: local processes or a Dask cluster, as the site says.

    Finished slides (same content hash and tiling settings) are skipped, so a nightly rerun
    starts no workers when nothing changed; a slide that fails is reported, the rest go on.
    """
    from vadflow.tasks.tiling.runners import tile_site

    logger = get_run_logger()
    finished: list[TilingResult] = []
    report("tile", 0, len(rows))

    def on_result(result: TilingResult) -> None:  # in this process, as each slide finishes
        finished.append(result)
        if result.status != "ok":
            logger.warning("%s: %s (%s)", result.slide_id, result.status, result.reason)
        what = f"{result.tiles} tiles" if result.status == "ok" else result.status
        report("tile", len(finished), len(rows), f"{result.slide_id}: {what}")

    results = tile_site(rows, site, layout.tiles_uri, layout.masks_uri, on_result=on_result)
    record_artefact_shares(layout.slides_manifest, results)
    quarantine_failed(layout, results)
    report("tile", len(results), len(rows), _tiling_summary(results))
    return results


def quarantine_failed(layout: SiteLayout, results: list[TilingResult]) -> None:
    """A slide whose tiling failed is quarantined like any other: status and reason in the
    slide manifest and `quarantine/<slide_id>.json` (a rerun retries it)."""
    from vadflow.tasks.validation.quarantine import QuarantinedSlide, quarantine_slides

    failed = [
        QuarantinedSlide(r.slide_id, f"tiling failed: {r.reason or 'no reason given'}", "tiling")
        for r in results
        if r.status == "failed"
    ]
    if failed and Path(layout.slides_manifest).exists():
        quarantine_slides(failed, layout.quarantine, layout.slides_manifest)


def record_artefact_shares(manifest: Path, results: list[TilingResult]) -> None:
    """Write each tiled slide's QC share of tissue (`artefact_share`) into the slide manifest."""
    import polars as pl

    from vadflow.tasks.manifests import SLIDE_SCHEMA, conform, write_parquet_atomic

    shares = {r.slide_id: r.artefact_share for r in results if r.artefact_share is not None}
    if not shares or not Path(manifest).exists():
        return
    frame = conform(pl.read_parquet(manifest), SLIDE_SCHEMA)
    found = pl.DataFrame(
        {"slide_id": list(shares), "_share": list(shares.values())},
        schema={"slide_id": pl.String, "_share": pl.Float64},
    )
    frame = frame.join(found, on="slide_id", how="left").with_columns(
        pl.coalesce("_share", "artefact_share").alias("artefact_share")
    )
    write_parquet_atomic(conform(frame, SLIDE_SCHEMA), manifest)


def _tiling_summary(results: list[TilingResult]) -> str:
    """`1,204 tiles; 1 no tissue, 1 failed`: the tile stage's last progress line."""
    tiles = sum(r.tiles for r in results if r.status == "ok")
    others = [
        f"{n} {status.replace('_', ' ')}"
        for status in ("no_tissue", "failed")
        if (n := sum(r.status == status for r in results))
    ]
    return "; ".join([f"{tiles:,} tiles", *others])
