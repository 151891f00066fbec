"""The command line as a newcomer meets it, and the rules that keep `make demo` from breaking.

`vadflow demo` once called the `synth` commands as Python functions, and typer's `OptionInfo`
defaults leaked into the library as `--mode`. Three checks make that class of break
impossible: every command's defaults are plain values, no function of `flows/cli/` calls a
registered command (an AST check), and at run time no call into the library receives an
`OptionInfo` (a profile hook while real commands run).
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.models import ParameterInfo
from typer.testing import CliRunner

import vadflow
from vadflow.flows.cli import app
from vadflow.flows.cli.results import backend_lines, metric_lines, print_summary
from vadflow.flows.env import StatePaths
from vadflow.tasks.records import FamilyResult, NightlySummary, SlideResult

ROOT = Path(__file__).resolve().parents[1]
CLI_DIR = ROOT / "flows" / "cli"


def _callbacks(typer_app: typer.Typer) -> Iterator[Callable]:
    """Every function typer calls for `typer_app`: commands and group callbacks, nested."""
    if typer_app.registered_callback is not None:
        yield typer_app.registered_callback.callback
    for command in typer_app.registered_commands:
        yield command.callback
    for group in typer_app.registered_groups:
        yield from _callbacks(group.typer_instance)


def _command_paths() -> list[list[str]]:
    """Every command path of the real click tree, e.g. ["synth", "pathology"]."""
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(group, prefix: list[str]) -> None:
        for name, command in group.commands.items():
            paths.append([*prefix, name])
            if hasattr(command, "commands"):
                walk(command, [*prefix, name])

    walk(root, [])
    return paths


COMMANDS = [c for c in _callbacks(app) if c.__name__.endswith("_command")]


def _run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    """`vadflow ARGS` in a fresh interpreter (as the console script runs it), timed."""
    code = "from vadflow.flows.cli import app; app()"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT.parent), **(env or {})},
    )
    return done, time.perf_counter() - started


# -- (a) defaults are plain values ----------------------------------------------------------


def test_every_command_has_plain_python_defaults() -> None:
    callbacks = list(_callbacks(app))
    assert len(COMMANDS) >= 15  # every command is found, not an empty loop
    for callback in callbacks:
        for name, parameter in inspect.signature(callback).parameters.items():
            assert not isinstance(parameter.default, ParameterInfo), (
                f"{callback.__module__}.{callback.__name__}({name}=...) has a typer default; "
                "use Annotated[T, typer.Option(...)] = value"
            )


# -- (b) no command calls a command --------------------------------------------------------


def _called_names(tree: ast.AST) -> Iterator[tuple[str, str, int]]:
    """(calling function, called name, line) for every call inside a function."""
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(function):
                if isinstance(node, ast.Call):
                    target = node.func
                    name = target.id if isinstance(target, ast.Name) else None
                    if isinstance(target, ast.Attribute):
                        name = target.attr
                    if name:
                        yield function.name, name, node.lineno


def test_no_function_in_the_cli_calls_a_command() -> None:
    commands = {c.__name__ for c in COMMANDS}
    assert all(c.__module__.startswith("vadflow.flows.cli.") for c in COMMANDS)
    # Every command follows the naming rule, so a call to one is visible by name alone.
    assert {c.__name__ for c in _callbacks(app)} - commands == {"main_callback"}
    offenders = []
    for path in sorted(CLI_DIR.glob("*.py")):
        for caller, called, line in _called_names(ast.parse(path.read_text())):
            if called in commands:
                offenders.append(f"{path.name}:{line} {caller} calls the command {called}")
    assert offenders == [], "commands call the library, never another command"


def test_the_ast_check_sees_a_command_calling_a_command() -> None:
    source = "def demo_command():\n    x = 1\n    synth_pathology_command(x, mode='easy')\n"
    called = [name for _, name, _ in _called_names(ast.parse(source))]
    assert "synth_pathology_command" in called


# -- (c) at run time no library call receives a typer default ------------------------------


def _profiled(invoke: Callable[[], object]) -> tuple[object, list[str]]:
    """Run `invoke` while recording every call into vadflow.tasks / vadflow.flows (outside
    flows/cli) that receives an OptionInfo or ArgumentInfo."""
    leaks: list[str] = []
    library_calls: list[str] = []

    def hook(frame, event, _arg) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(("vadflow.tasks", "vadflow.flows")):
            return
        if module.startswith("vadflow.flows.cli"):
            return
        library_calls.append(f"{module}.{frame.f_code.co_name}")
        for name, value in frame.f_locals.items():
            if isinstance(value, ParameterInfo):
                leaks.append(f"{module}.{frame.f_code.co_name}({name}={type(value).__name__})")

    sys.setprofile(hook)
    try:
        result = invoke()
    finally:
        sys.setprofile(None)
    assert library_calls, "the commands never reached the library: nothing was checked"
    return result, leaks


def test_cheap_commands_pass_plain_values_to_the_library(tmp_path: Path) -> None:
    runner = CliRunner()
    runs = [
        ["synth", "industrial", str(tmp_path), "--train", "2", "--test-good", "1"]
        + ["--per-defect", "1", "--image-size", "32", "--mode", "hard"],
        ["synth", "pathology", str(tmp_path), "--width", "512", "--height", "512"]
        + ["--train-normal", "1", "--test-normal", "0", "--test-tumor", "1"],
        ["validate", str(tmp_path / "line-a"), "--home", str(tmp_path / "home")],
        ["export", str(tmp_path)],
    ]
    for args in runs:
        result, leaks = _profiled(lambda args=args: runner.invoke(app, args))
        assert leaks == [], f"vadflow {' '.join(args)}: {leaks}"
        assert result.exit_code in (0, 2), result.output  # validate/export: nothing to check yet
    assert (tmp_path / "line-a" / "site.yaml").exists() and (tmp_path / "site-a").is_dir()


def test_the_profile_hook_catches_a_leaked_option() -> None:
    from vadflow.tasks.site import SiteLayout

    def leak() -> None:
        with pytest.raises(TypeError):  # what the library makes of it, far from the cause
            SiteLayout("/tmp", typer.Option("site"))

    _, leaks = _profiled(leak)
    assert leaks and "OptionInfo" in leaks[0]


# -- conventions: --version, -h, choices ---------------------------------------------------


def test_version_and_short_help(tmp_path: Path) -> None:
    done, seconds = _run_cli(["--version"], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"vadflow {vadflow.__version__}"
    assert seconds < 5, f"--version took {seconds:.1f} s"
    runner = CliRunner()
    paths = _command_paths()
    assert ["synth", "pathology"] in paths and ["benchmark-detectors"] in paths
    for path in [[], *paths]:
        result = runner.invoke(app, [*path, "-h"])
        assert result.exit_code == 0 and "Usage" in result.output, (path, result.output)


@pytest.mark.parametrize(
    ("path", "option", "choices"),
    [
        (["demo"], "--domain", ["pathology", "industrial"]),
        (["synth", "pathology"], "--mode", ["easy", "hard"]),
        (["synth", "industrial"], "--mode", ["easy", "hard"]),
        (["benchmark-detectors"], "--device", ["auto", "cpu", "cuda"]),
        (["benchmark-detectors"], "--score", ["residual", "latent", "combined"]),
        (["run"], "--family", None),
        (["evaluate"], "--family", None),
        (["benchmark-detectors"], "--family", None),
    ],
)
def test_help_lists_the_choices(path: list[str], option: str, choices: list[str] | None) -> None:
    from vadflow.tasks.detectors.registry import family_names

    result = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if option in line)
    for choice in choices or family_names():
        assert choice in line, f"{option} of {path}: {choice} not in {line!r}"


def test_unknown_family_and_missing_folder_fail_fast_in_one_line(tmp_path: Path) -> None:
    """Exit 2, one line, well under the 2 s budget (5 s here: shared CI machines), before any
    heavy library loads."""
    probe = (
        "import sys\n"
        "from vadflow.flows.cli import app\n"
        "try:\n    app(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    heavy = [m for m in ('torch', 'prefect', 'mlflow') if m in sys.modules]\n"
        "    print('HEAVY', heavy, file=sys.stderr)\n    raise\n"
    )
    (tmp_path / "site").mkdir()
    cases = [
        (["run", str(tmp_path / "site"), "--family", "no_such_family"], "no_such_family"),
        (["run", str(tmp_path / "nowhere")], "does not exist"),
        (["evaluate", str(tmp_path / "site"), "--family", "nope"], "nope"),
        (["demo", "--domain", "bakery"], "bakery"),
    ]
    for args, message in cases:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT.parent)},
        )
        seconds = time.perf_counter() - started
        errors = [line for line in done.stderr.splitlines() if not line.startswith("HEAVY")]
        assert done.returncode == 2, done.stderr
        assert len(errors) == 1 and message in errors[0] and "error" in errors[0], errors
        assert "HEAVY []" in done.stderr, done.stderr
        assert seconds < 5, f"vadflow {' '.join(args)} took {seconds:.1f} s"
        assert done.stdout == ""
    assert not (tmp_path / ".vadflow").exists()


def test_a_folder_that_is_not_a_site_is_exit_2_naming_the_file(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.yaml").write_text("name: s\nfamilies: [ae_l2\n  tiling: {a: 1}\n")
    result = CliRunner().invoke(app, ["run", str(site), "--home", str(tmp_path / "home")])
    assert result.exit_code == 2
    assert "site.yaml" in result.output and "line 3" in result.output
    assert not (tmp_path / "home").exists()  # refused before any state was made
    (site / "site.yaml").write_text("domain: pathology\ntiling: {tile_sizee: 3}\n")
    result = CliRunner().invoke(app, ["validate", str(site)])
    assert result.exit_code == 2
    assert "site.yaml" in result.output and "tile_sizee" in result.output


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    from vadflow.deployments.sites import SiteFileError, load_site_file
    from vadflow.tasks.site import load_site

    (tmp_path / "site.yaml").write_text("domain: [pathology\n")
    with pytest.raises(ValueError, match=r"site\.yaml: line 2, column 1: not valid YAML"):
        load_site(tmp_path)
    (tmp_path / "site.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="site.yaml: expected a mapping"):
        load_site(tmp_path)
    bad = tmp_path / "line-x.yaml"
    bad.write_text("name: line-x\n  bad: [\n")
    with pytest.raises(SiteFileError, match=r"line-x\.yaml: line 2, column 6: not valid YAML"):
        load_site_file(bad)


def test_sites_check_and_a_refused_deploy_leave_no_state(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "line-x.yaml").write_text(
        f"name: line-x\ndomain: industrial\nsource: {tmp_path}\nfamilies: [ae_l2]\n"
        "tiling: {target_mpp: null, heatmap_downsample: 1}\n"
        'schedule: {cron: "0 3 * * *", timezone: Europe/Amsterdam}\n'
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "line-y.yaml").write_text("name: line-y\n  oops: [\n")
    work = tmp_path / "cwd"
    work.mkdir()
    env = {"VADFLOW_HOME": ""}
    checked, _ = _run_cli(["sites", "check", "--sites", str(good)], work, env)
    assert checked.returncode == 0 and "line-x" in checked.stdout, checked.stderr
    refused, _ = _run_cli(["deploy", "--sites", str(bad)], work, env)
    assert refused.returncode == 1 and "line-y.yaml" in refused.stdout, refused.stderr
    unknown, _ = _run_cli(["deploy", "--sites", str(good), "--site", "nope"], work, env)
    assert unknown.returncode == 2 and "no site file for --site nope" in unknown.stdout
    assert list(work.iterdir()) == []  # no stray ./.vadflow


# -- where things are ----------------------------------------------------------------------


def test_where_lines_name_the_backends_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StatePaths(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    local = "\n".join(backend_lines(state, f"sqlite:///{tmp_path}/mlflow/mlflow.db"))
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow/mlflow.db" in local
    assert f"PREFECT_HOME={tmp_path / 'prefect'} prefect server start" in local

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    remote = "\n".join(backend_lines(state, "http://mlflow.example:5000"))
    assert "MLflow server:           http://mlflow.example:5000" in remote
    assert "Prefect API:             http://prefect.example:4200/api" in remote
    assert "http://prefect.example:4200\n" in remote + "\n"
    assert "sqlite" not in remote and "PREFECT_HOME" not in remote


# -- Prefect's local API start -------------------------------------------------------------


def test_startup_timeout_default_and_the_users_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from vadflow.flows.env import (
        EPHEMERAL_STARTUP_TIMEOUT_S,
        STARTUP_TIMEOUT_SETTING,
        api_start_failure,
        quiet_environment,
    )

    monkeypatch.delenv(STARTUP_TIMEOUT_SETTING, raising=False)
    quiet_environment()
    assert os.environ[STARTUP_TIMEOUT_SETTING] == str(EPHEMERAL_STARTUP_TIMEOUT_S)
    monkeypatch.setenv(STARTUP_TIMEOUT_SETTING, "7")
    quiet_environment()
    assert os.environ[STARTUP_TIMEOUT_SETTING] == "7"
    # The name is Prefect's own: its settings model reads it.
    from prefect.settings import Settings

    assert Settings().server.ephemeral.startup_timeout_seconds == 7

    prefect_error = RuntimeError(
        "Timed out while attempting to connect to ephemeral Prefect API server."
    )
    try:
        try:
            raise prefect_error
        except RuntimeError as exc:
            raise ValueError("wrapped") from exc
    except ValueError as wrapped:
        line = api_start_failure(wrapped)
    assert line is not None and "\n" not in line
    assert f"{STARTUP_TIMEOUT_SETTING}" in line and "PREFECT_API_URL" in line and "7 s" in line
    assert api_start_failure(RuntimeError("something else")) is None


@pytest.mark.slow
def test_an_api_that_does_not_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A zero start-up timeout makes Prefect give up at once: the CLI says what to do."""
    from vadflow.tasks.synth.industrial import make_industrial_site

    site = make_industrial_site(tmp_path, "line-a", n_train=4, n_test_good=1, n_test_per_defect=1)
    env = {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0",
        "PREFECT_API_URL": "",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    done, _ = _run_cli(["run", str(site), "--home", str(tmp_path / "home")], tmp_path, env)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0]
    assert "PREFECT_API_URL" in errors[0]
    assert "Traceback" not in done.stdout + done.stderr


# -- no metric silently missing ------------------------------------------------------------


def _summary(metrics: dict[str, float]) -> NightlySummary:
    table = (
        SlideResult("t1", "test", "normal", "normal", 0.1, False),
        SlideResult("t2", "test", "normal", "normal", math.nan, None),
    )
    result = FamilyResult(
        family="ae_l2",
        metrics=metrics,
        table=table,
        exports_dir="/out/s/exports/ae_l2",
        report="",
        model_dir="/out/s/models/ae_l2/1",
        diverged=False,
        promotion=None,
        spooled=False,
        mlflow_run_id="r",
    )
    return NightlySummary(
        site="s",
        version="1",
        families={"ae_l2": result},
        skipped={},
        outputs="/out/s",
        quarantined=(),
        no_tissue=(),
        contracts_report="",
        tracking_uri="sqlite:////x/mlflow.db",
        parent_run_id="p",
    )


def test_every_metric_is_printed_and_nan_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nan = math.nan
    metrics = {
        "n_test_slides": 2.0,
        "n_test_anomalous": 0.0,
        "threshold": nan,
        "slide_auroc": nan,
        "slide_f1_max": nan,
        "extra_metric": 0.25,
    }
    print_summary(_summary(metrics), StatePaths(tmp_path), domain="pathology", froc_itc_um=275)
    out = " ".join(capsys.readouterr().out.split())
    assert "test slides: 2, 0 tumour" in out
    assert "slide AUROC n/a (needs tumour and normal test slides (no tumour among 2))" in out
    assert "pixel AUROC n/a (no ground-truth masks" in out
    assert "FROC n/a (no ground-truth masks" in out
    assert "threshold n/a (no held-out normal slides scored" in out
    assert "sensitivity n/a (no held-out normal slides" in out
    assert "extra_metric 0.2500" in out
    assert "│ t2 │ normal │ n/a │ - │" in out  # a NaN slide score is n/a too

    # Masks exist but every lesion is below the isolated-tumour-cell size: FROC says so.
    lines = {
        line.key: line
        for line in metric_lines({"pixel_auroc": 0.9, "threshold": 0.5}, "pathology", 275.0)
    }
    assert lines["froc"].shown() == "n/a (no annotated lesion at or above froc_itc_um (275 um))"
    assert lines["pixel_auroc"].shown() == "0.9000"


def test_industrial_runs_print_pro_and_say_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = {
        "n_test_slides": 4.0,
        "n_test_anomalous": 2.0,
        "threshold": 0.3,
        "slide_auroc": 0.75,
        "pixel_auroc": 0.8,
        "pro": 0.6,
    }
    print_summary(_summary(metrics), StatePaths(tmp_path), domain="industrial")
    out = " ".join(capsys.readouterr().out.split())
    assert "test images: 4, 2 defective" in out and "image AUROC 0.7500" in out
    assert "PRO 0.6000" in out and "FROC" not in out
    assert "slide" not in out.replace("slide_id", "")
    assert "image F1-max n/a (not computed by this run)" in out  # both classes were there
    keys = [line.key for line in metric_lines(metrics, "industrial")]
    assert "pro" in keys and "froc" not in keys


def test_result_reading_is_in_one_module() -> None:
    """Only flows/cli/results.py indexes the flows' result dictionaries (so a typed record
    replaces them in one place)."""
    keys = {"families", "metrics", "record", "quarantined", "no_tissue", "tracking_uri"}
    offenders = []
    for path in sorted(CLI_DIR.glob("*.py")):
        if path.name == "results.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            constant = isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            if constant and node.slice.value in keys:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
