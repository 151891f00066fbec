"""The contracts' floor: ``data_contracts/`` imports nothing from ``vadflow.tasks`` or
``vadflow.flows`` (imports run CLI -> flows -> tasks -> data_contracts), the validate stage
imports nothing from ``vadflow.flows``, and the report templates ship in the wheel."""

from __future__ import annotations

import ast
import glob
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the vadflow package


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` (the text of ``module``) imports, relative
    imports resolved, whether at the top or inside a function."""
    package = module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def upward_imports(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """module path -> the forbidden modules it imports, for every module under ``folder``."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(("vadflow", *relative.parts))
        if path.name == "__init__.py":
            module += ".__init__"  # so a relative import resolves against the package itself
        bad = sorted(
            name
            for name in imported_modules(path.read_text(), module)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        )
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


UPWARD_FROM_CONTRACTS = ("vadflow.tasks", "vadflow.flows", "tasks", "flows")


def test_data_contracts_import_nothing_above_them() -> None:
    assert upward_imports("data_contracts", UPWARD_FROM_CONTRACTS) == {}


def test_the_validate_stage_imports_no_flow() -> None:
    assert upward_imports("tasks/validation", ("vadflow.flows", "flows")) == {}


def test_the_suites_the_runner_loads_are_contracts_too() -> None:
    """The runner imports each suite by name; those names are imports the AST scan cannot see."""
    from vadflow.data_contracts import SUITES

    assert SUITES and all(m.startswith("vadflow.data_contracts.") for m, _ in SUITES.values())


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from vadflow.tasks.manifests import TILE_SCHEMA", "vadflow.data_contracts.tile_manifest"),
        ("import vadflow.flows.nightly", "vadflow.data_contracts.runner"),
        ("def f():\n    from ..tasks import manifests", "vadflow.data_contracts.runner"),
        ("from ...flows import cli", "vadflow.data_contracts.sub.module"),
    ],
)
def test_the_scan_sees_an_upward_import(source: str, module: str) -> None:
    names = imported_modules(source, module)
    assert any(n.startswith(("vadflow.tasks", "vadflow.flows")) for n in names), names


def test_report_templates_are_package_data() -> None:
    """Every jinja2 template is matched by setup.py's package_data (patterns are relative to
    each package's folder, so a templates/ folder needs its own pattern)."""
    setup = ast.parse((ROOT / "setup.py").read_text())
    package_data = next(
        ast.literal_eval(k.value)
        for k in ast.walk(setup)
        if isinstance(k, ast.keyword) and k.arg == "package_data"
    )
    templates = sorted(ROOT.glob("**/templates/*.j2"))
    assert {p.parent.parent.name for p in templates} >= {"data_contracts", "validation"}
    for template in templates:
        package = template.parent.parent
        shipped = {
            Path(p) for pattern in package_data[""] for p in glob.glob(str(package / pattern))
        }
        assert template in shipped, f"{template.relative_to(ROOT)} is not in package_data"
