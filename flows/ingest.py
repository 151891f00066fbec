"""The stages every flow starts with: discover, register, mask + tile, validate.

A plain function that calls tasks, so the nightly and the batch-scoring flows share it
instead of repeating it; and how an ingested site splits into the groups one model each is
trained on (`category_groups`).
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl

from vadflow.tasks.pipeline import (
    discover_task,
    register_task,
    tile_site_task,
    validate_manifests_task,
)
from vadflow.tasks.records import CategoryGroup, Ingested
from vadflow.tasks.site import SiteConfig, SiteLayout
from vadflow.tasks.slides.discover import (
    industrial_category,
    label_gaps,
    nothing_to_train_on,
    train_test_copies,
)


def ingest(
    site: SiteConfig, layout: SiteLayout, run: str, *, train: bool = False, force: bool = False
) -> Ingested:
    """From the site's source to checked manifests; `run` names the contracts report. With
    `train` (the nightly run), a site without normal training or test slides stops here,
    seconds in, before anything is decoded. Unchanged slides and manifests are not hashed,
    opened or checked again unless `force`."""
    sources = discover_task(site)
    if train and (problem := nothing_to_train_on(sources, site.domain)):
        raise ValueError(f"site {site.name} ({site.source}): {problem}")
    manifest = register_task(site, sources, layout, force=force)
    usable = pl.read_parquet(manifest.path).filter(pl.col("status") == "ok").to_dicts()
    # Imported here: registration's module loads scikit-image, which importing a flow must not.
    from vadflow.tasks.slides.register import run_tile_budget_problem

    if problem := run_tile_budget_problem(usable, site.tiling, site.limits):
        raise ValueError(f"site {site.name}: {problem}")
    copies = train_test_copies(usable)
    if copies and site.leakage == "refuse":
        raise ValueError(
            f"site {site.name}: {len(copies)} test slides are byte copies of training slides "
            f"({', '.join(copies[:10])}); remove them, or set `leakage: warn` in site.yaml"
        )
    tiling = tile_site_task(usable, site, layout)
    failed = tuple(t for t in tiling if t.status == "failed")
    tiled = [t for t in tiling if t.status != "failed"]
    checked = validate_manifests_task(
        manifest.path, [t.manifest for t in tiled], site, layout, run, force=force
    )
    dropped = set(checked.quarantined_ids)
    kept = tuple(t for t in tiled if t.slide_id not in dropped)
    gaps = replace(label_gaps(sources), train_test_copies=copies)
    return Ingested(manifest.path, kept, failed, checked, gaps)


def category_groups(site: SiteConfig, data: Ingested) -> list[CategoryGroup]:
    """What each model is trained on: the whole site, or on an industrial site with several
    categories one group per category (the MVTec AD protocol; pooling categories into one
    model is not what any published number measures)."""
    slides = data.slides.filter(pl.col("status") == "ok")
    tiled = {t.slide_id: t.manifest for t in data.tiling}
    every = [r for r in slides.to_dicts() if r["slide_id"] in tiled]
    names: dict[str, list[str]] = {}
    if site.domain == "industrial":
        for row in every:
            names.setdefault(industrial_category(row["uri"]), []).append(row["slide_id"])
    if len(names) <= 1:
        ids = tuple(r["slide_id"] for r in every)
        return [CategoryGroup(None, ids, tuple(data.tile_paths))]
    return [
        CategoryGroup(name, tuple(ids), tuple(tiled[i] for i in ids))
        for name, ids in sorted(names.items())
    ]
