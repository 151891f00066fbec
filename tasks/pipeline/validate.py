"""The data contracts at the pipeline's boundaries, as tasks: manifests before training,
scores after scoring, metrics after evaluation (`vadflow.tasks.validation`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from vadflow.tasks.progress import advance
from vadflow.tasks.records import Evaluated, SlideScore
from vadflow.tasks.site import SiteConfig, SiteLayout

if TYPE_CHECKING:
    from vadflow.tasks.validation import BoundaryCheck


def _reporting(site: SiteConfig, layout: SiteLayout, run: str) -> dict[str, Any]:
    """Where every check of run `run` reports: its contracts folder and a Prefect artifact."""
    from vadflow.tasks.validation import report_folder

    return {
        "report_dir": report_folder(layout.reports, run),
        "markdown_artifact": create_markdown_artifact,
        "artifact_key": f"contracts-{site.name}",
    }


def _checked(what: str, check: BoundaryCheck) -> BoundaryCheck:
    """Count one boundary's checks on the run's contracts line; returns `check`."""
    aside = len(check.quarantined_ids)
    advance("contracts", None, f"{what}: {f'{aside} slides set aside' if aside else 'passed'}")
    return check


@task(name="validate-manifests")
def validate_manifests_task(
    slides_path: str,
    tile_paths: list[str],
    site: SiteConfig,
    layout: SiteLayout,
    run: str,
    force: bool = False,
) -> BoundaryCheck:
    """Slide and tile manifest contracts before training: strict stops, quarantine drops.
    Manifests identical to ones that passed before are not checked again unless `force`."""
    # Imported here, like every stage: great-expectations itself loads only when a suite runs.
    from vadflow.tasks.validation import check_manifests

    check = check_manifests(
        slides_path,
        tile_paths,
        tiling=site.tiling,
        mode=site.contracts,
        quarantine_dir=layout.quarantine,
        reuse=not force,
        **_reporting(site, layout, run),
    )
    return _checked("manifests", check)


@task(name="validate-scores")
def validate_scores_task(
    family: str,
    scores: list[SlideScore],
    slides_path: str,
    tile_paths: list[str],
    site: SiteConfig,
    layout: SiteLayout,
    run: str,
) -> BoundaryCheck:
    """Tile and slide score contracts of one family's scored slides."""
    from vadflow.tasks.validation import check_scores
    from vadflow.tasks.validation.boundaries import declared_score_range

    check = check_scores(
        family,
        scores,
        slides_path,
        tile_paths,
        expected_slides=[s.slide_id for s in scores],
        # `ae_l2/bottle` (one category's model) declares the range of its family, `ae_l2`
        score_range=declared_score_range(family.split("/", 1)[0]),
        mode=site.contracts,
        quarantine_dir=layout.quarantine,
        **_reporting(site, layout, run),
    )
    return _checked(f"{family} scores", check)


@task(name="validate-metrics")
def validate_metrics_task(
    family: str, evaluation: Evaluated, site: SiteConfig, layout: SiteLayout, run: str
) -> BoundaryCheck:
    """The metrics contract of one family's evaluation (ranges, NaN where not allowed)."""
    from vadflow.tasks.validation import check_metrics

    check = check_metrics(
        family,
        evaluation.all_metrics,
        **_reporting(site, layout, run),
    )
    return _checked(f"{family} metrics", check)
