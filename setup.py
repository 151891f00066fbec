"""The repository root is the `vadflow` package; its top-level folders are its subpackages.

pyproject.toml holds the metadata. This file only maps the import root: `vadflow` -> `.`, so
`vadflow.tasks` is `tasks/` and no other top-level name is installed (editable or not).
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("flows", "tasks", "data_contracts", "deployments")

packages = ["vadflow"] + [
    f"vadflow.{name}"
    for name in find_packages(include=[f"{top}*" for top in SUBPACKAGES])
    if name.split(".")[0] in SUBPACKAGES
]

setup(
    package_dir={"vadflow": "."},
    packages=packages,
    # Patterns are relative to each package's folder: templates/ (no __init__.py) needs its own.
    package_data={
        "vadflow": ["deployments/sites/*.yaml"],
        "": ["*.html", "*.md.j2", "*.j2", "templates/*.j2", "templates/*.css"],
    },
)
