"""Turn site files into Prefect deployments: one per site and job kind.

Flows are named by entrypoint string (`flows/nightly.py:nightly`), as Prefect does, so this
module never imports them. Job variables are checked against the work pool's base job template
first: Prefect drops a variable the template does not define without a word, and a GPU request
that silently vanishes is the worst kind of failure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound

from vadflow.deployments.sites import ENTRYPOINTS, LOCAL_POOL, SiteFile

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_POOL_TYPE = "process"


class DeploymentConfigError(ValueError):
    """A site's deployment settings do not fit the work pool they name."""


@dataclass(frozen=True)
class Deployed:
    site: str
    job: str
    name: str  # "<flow name>/<deployment name>"
    deployment_id: UUID


def deployment_tags(site: SiteFile, job: str) -> list[str]:
    return ["vadflow", f"site:{site.name}", f"domain:{site.domain}", f"job:{job}", *site.tags]


def check_job_variables(site: SiteFile, template: dict) -> None:
    """Refuse job variables the pool's base job template does not define."""
    defined = set(template.get("variables", {}).get("properties", {}))
    unknown = sorted(set(site.work_pool.job_variables) - defined)
    if unknown:
        raise DeploymentConfigError(
            f"site {site.name}: work pool {site.work_pool.name!r} does not define job "
            f"variables {unknown} (it defines {sorted(defined)}); Prefect would drop them "
            "silently. Fix the site file or the pool's base job template (see infra/)."
        )


def ensure_pool(site: SiteFile) -> dict:
    """The site's work pool's base job template; the local process pool is created if absent."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(site.work_pool.name)
        except ObjectNotFound:
            if site.work_pool.name != LOCAL_POOL:
                raise DeploymentConfigError(
                    f"site {site.name}: work pool {site.work_pool.name!r} does not exist; "
                    f"create it first, e.g. `prefect work-pool create {site.work_pool.name} "
                    "--type kubernetes --base-job-template infra/k8s-gpu-job-template.json`"
                ) from None
            pool = client.create_work_pool(
                WorkPoolCreate(name=site.work_pool.name, type=LOCAL_POOL_TYPE)
            )
        return pool.base_job_template


def deploy_site(site: SiteFile, root: Path = REPO_ROOT, name: str | None = None) -> list[Deployed]:
    """Register (or update) this site's deployments against the configured Prefect API.

    `name` overrides the deployment name (default: the site's), e.g. for a one-off batch run
    on another pool that must not replace the site's own deployment.
    """
    name = name or site.name
    template = ensure_pool(site)
    check_job_variables(site, template)
    out = []
    with _working_directory(root):  # runs start from the project root on process workers
        for job in site.jobs:
            deployment = RunnerDeployment.from_entrypoint(
                ENTRYPOINTS[job],
                name=name,
                schedules=[site.schedule.to_prefect()] if job == "nightly" else None,
                parameters={"site": site.site_config().model_dump(mode="json")},
                tags=deployment_tags(site, job),
                concurrency_limit=site.concurrency_limit,
                description=f"{job} for site {site.name} ({site.domain})",
                work_pool_name=site.work_pool.name,
                work_queue_name=site.work_pool.queue,
                job_variables=dict(site.work_pool.job_variables),
            )
            deployment_id = deployment.apply()
            out.append(Deployed(site.name, job, f"{deployment.flow_name}/{name}", deployment_id))
    return out


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
