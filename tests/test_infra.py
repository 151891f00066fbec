"""The team stack in infra/ cannot run here (no Docker engine): keep it correct by linting it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_builds_files_that_exist() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (INFRA / service["build"]["context"]).resolve()
            dockerfile = context / service["build"]["dockerfile"]
            assert dockerfile.exists(), f"{name}: {dockerfile} missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: mounts missing {source}"


def test_dockerfiles_copy_what_the_repo_has() -> None:
    for dockerfile in INFRA.glob("Dockerfile*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"


def test_ports_and_urls_agree() -> None:
    services = _compose()["services"]

    def published(name: str) -> set[str]:
        return {p.split(":")[-1] for p in services[name].get("ports", [])}

    prefect_port = services["prefect-server"]["command"][-1]
    assert prefect_port in published("prefect-server")
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == f"http://prefect-server:{prefect_port}/api"
    mlflow_cmd = services["mlflow"]["command"]
    mlflow_port = mlflow_cmd[mlflow_cmd.index("--port") + 1]
    assert mlflow_port in published("mlflow")
    assert worker_env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    assert worker_env["MLFLOW_S3_ENDPOINT_URL"].endswith(":9000") and "9000" in published("minio")
    # Every database a connection string names is created by the init script.
    init = (INFRA / "postgres-init.sql").read_text()
    for url in [
        services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"],
        mlflow_cmd[mlflow_cmd.index("--backend-store-uri") + 1],
    ]:
        assert f"CREATE DATABASE {url.rsplit('/', 1)[1]};" in init


def _placeholders(value) -> set[str]:
    return set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(value)))


def test_work_pool_templates_define_every_placeholder() -> None:
    for path in INFRA.glob("*-job-template.json"):
        template = json.loads(path.read_text())
        defined = set(template["variables"]["properties"])
        used = _placeholders(template["job_configuration"])
        assert used <= defined, f"{path.name}: undefined {used - defined}"


def test_gpu_template_asks_for_gpus() -> None:
    template = json.loads((INFRA / "k8s-gpu-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "{{ gpu_count }}"
