"""Site files, `vadflow sites check`, prefect.yaml, and deployments on a real Prefect server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vadflow.deployments.deploy import DeploymentConfigError, check_job_variables
from vadflow.deployments.prefect_yaml import render_prefect_yaml
from vadflow.deployments.sites import SITES_DIR, check_site_files, load_site_file
from vadflow.flows.cli import app

ROOT = Path(__file__).resolve().parents[1]
GOOD = """\
name: {name}
domain: industrial
source: {source}
families: [ae_l2]
tiling: {{tile_size: 32, stride: 16, target_mpp: null, heatmap_downsample: 1,
          foreground_mask: false}}
schedule: {{cron: "0 3 * * *", timezone: Europe/Amsterdam}}
detectors: {{ae_l2: {{epochs: 2, base_channels: 8}}}}
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_committed_site_files_are_valid_and_prefect_yaml_is_current() -> None:
    sites, errors = check_site_files(SITES_DIR)
    assert errors == [] and {s.name for s in sites} == {"hospital-a", "line-a"}
    committed = (ROOT / "prefect.yaml").read_text()
    assert committed == render_prefect_yaml(sites), "run `vadflow deploy --write-prefect-yaml`"
    parsed = yaml.safe_load(committed)
    nightly = next(d for d in parsed["deployments"] if d["entrypoint"].endswith(":nightly"))
    assert nightly["schedules"][0]["timezone"] == "Europe/Amsterdam"
    assert nightly["work_pool"]["name"] == "vadflow-process"
    for deployment in parsed["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        assert f"def {func}(" in (ROOT / path).read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[ae_l2]", "[ae_l2, no_such_family]"), "unknown detector family 'no_such_family'"),
        (('"0 3 * * *"', '"61 3 * * *"'), "bad cron expression"),
        (("Europe/Amsterdam", "Mars/Olympus"), "unknown timezone 'Mars/Olympus'"),
        (("domain: industrial", "domain: bakery"), "domain"),
        (("schedule:", "schedul:"), "schedule: Field required"),
    ],
)
def test_sites_check_names_the_bad_field(tmp_path: Path, change, message) -> None:
    text = GOOD.format(name="line-x", source=tmp_path).replace(*change)
    _write(tmp_path / "sites", "line-x", text)
    result = CliRunner().invoke(app, ["sites", "check", "--sites", str(tmp_path / "sites")])
    assert result.exit_code == 1
    assert "line-x.yaml" in result.output and message in " ".join(result.output.split())


def test_missing_source_and_name_mismatch(tmp_path: Path) -> None:
    _write(tmp_path, "a", GOOD.format(name="a", source=tmp_path / "nowhere"))
    _write(tmp_path, "b", GOOD.format(name="other", source=tmp_path))
    sites, errors = check_site_files(tmp_path)
    assert sites == []
    assert any("source folder" in e and "does not exist" in e for e in errors)
    assert any("must match the file name" in e for e in errors)


def test_sites_check_accepts_a_good_file(tmp_path: Path) -> None:
    _write(tmp_path, "line-x", GOOD.format(name="line-x", source=tmp_path))
    result = CliRunner().invoke(app, ["sites", "check", "--sites", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "line-x" in result.output


def test_job_variables_the_pool_does_not_define_are_refused(tmp_path: Path) -> None:
    text = GOOD.format(name="gpu", source=tmp_path) + (
        "work_pool: {name: gpu-pool, job_variables: {gpu_count: 1, gpus: 2}}\n"
    )
    site = load_site_file(_write(tmp_path, "gpu", text))
    template = {"variables": {"properties": {"gpu_count": {}, "image": {}}}}
    with pytest.raises(DeploymentConfigError, match=r"\['gpus'\]"):
        check_job_variables(site, template)
    ok = site.model_copy(
        update={"work_pool": site.work_pool.model_copy(update={"job_variables": {"gpu_count": 2}})}
    )
    check_job_variables(ok, template)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(state_dir: Path):
    """A real `prefect server` on 127.0.0.1 with its own PREFECT_HOME and SQLite database."""
    home = state_dir / "prefect-server"
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
    yield {"url": url, "env": {**env, "PREFECT_API_URL": url}}
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_deploy_two_sites_and_run_one_on_a_process_worker(
    prefect_server, state_dir: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vadflow.deployments.deploy import deploy_site
    from vadflow.tasks.synth.industrial import make_industrial_site

    site_dir = make_industrial_site(
        tmp_path / "data", "line-src", n_train=12, n_test_good=4, n_test_per_defect=2, seed=1
    )
    sites = tmp_path / "sites"
    _write(sites, "line-x", GOOD.format(name="line-x", source=site_dir))
    _write(
        sites,
        "line-y",
        GOOD.format(name="line-y", source=site_dir)
        .replace("Europe/Amsterdam", "Asia/Tokyo")
        .replace('"0 3 * * *"', '"15 1 * * 1-5"'),
    )
    good, errors = check_site_files(sites)
    assert errors == []
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        for site in good:
            deploy_site(site)
        with get_client(sync_client=True) as client:
            x = client.read_deployment_by_name("nightly/line-x")
            y = client.read_deployment_by_name("nightly/line-y")
            assert x.schedules[0].schedule.cron == "0 3 * * *"
            assert x.schedules[0].schedule.timezone == "Europe/Amsterdam"
            assert y.schedules[0].schedule.cron == "15 1 * * 1-5"
            assert y.schedules[0].schedule.timezone == "Asia/Tokyo"
            assert set(x.tags) >= {"vadflow", "site:line-x", "domain:industrial", "job:nightly"}
            assert x.parameters["site"]["name"] == "line-x"
            assert x.parameters["site"]["detectors"] == {"ae_l2": {"epochs": 2, "base_channels": 8}}
            assert x.work_pool_name == "vadflow-process"
            assert x.global_concurrency_limit is not None
        run = run_deployment("nightly/line-x", timeout=0)
        home = tmp_path / "worker-home"
        worker = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                "vadflow-process",
                "--run-once",
            ],
            env={
                **prefect_server["env"],
                "VADFLOW_HOME": str(home),
                "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=420,
        )
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        assert state is not None and state.is_completed(), (
            worker.stdout[-3000:] + worker.stderr[-3000:]
        )
    outputs = home / "outputs" / "line-x"
    assert (outputs / "slides.parquet").exists()
    assert list((outputs / "exports" / "ae_l2").glob("*.png"))
