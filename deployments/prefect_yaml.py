"""Render `prefect.yaml` from the site files, for users who deploy with Prefect's own CLI.

Work pools and schedules are written once under `definitions` and referenced by YAML anchors,
so the file reads like the sites it came from. `vadflow deploy --write-prefect-yaml` writes it;
a test checks the committed file is what the site files render to.
"""

from __future__ import annotations

import json
from pathlib import Path

import prefect
import yaml

from vadflow.deployments.deploy import deployment_tags
from vadflow.deployments.sites import ENTRYPOINTS, SiteFile

HEADER = """\
# Generated from deployments/sites/*.yaml by `vadflow deploy --write-prefect-yaml`; edit the
# site files, not this. Deploy from the repository root with `prefect deploy --all`.
"""


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _flow(value: object) -> str:
    """A YAML flow-style scalar or collection on one line (JSON is valid YAML)."""
    return json.dumps(value, sort_keys=True)


def render_prefect_yaml(sites: list[SiteFile]) -> str:
    pools = {s.work_pool.name: s.work_pool for s in sites}
    lines = [HEADER, "name: vadflow", f"prefect-version: {prefect.__version__}", ""]
    lines += ["definitions:", "  work_pools:"]
    for name in sorted(pools):
        lines += [f"    {_anchor(name)}: &pool_{_anchor(name)}", f"      name: {name}"]
    lines += ["  schedules:"]
    for site in sites:
        lines += [
            f"    {_anchor(site.name)}: &schedule_{_anchor(site.name)}",
            f"      cron: {_flow(site.schedule.cron)}",
            f"      timezone: {site.schedule.timezone}",
        ]
    lines += ["", "deployments:"]
    for site in sites:
        for job in site.jobs:
            pool = site.work_pool
            lines += [
                f"  - name: {site.name}",
                f"    entrypoint: {ENTRYPOINTS[job]}",
                f"    description: {_flow(f'{job} for site {site.name} ({site.domain})')}",
                f"    tags: {_flow(deployment_tags(site, job))}",
                f"    concurrency_limit: {site.concurrency_limit}",
                "    work_pool:",
                f"      <<: *pool_{_anchor(pool.name)}",
                f"      work_queue_name: {_flow(pool.queue)}",
                f"      job_variables: {_flow(dict(pool.job_variables))}",
                f"    schedules: [*schedule_{_anchor(site.name)}]"
                if job == "nightly"
                else "    schedules: []",
                f"    parameters: {_flow({'site': site.site_config().model_dump(mode='json')})}",
            ]
    text = "\n".join(lines) + "\n"
    yaml.safe_load(text)  # never write a file Prefect cannot read
    return text


def write_prefect_yaml(sites: list[SiteFile], path: Path) -> Path:
    path.write_text(render_prefect_yaml(sites))
    return path
