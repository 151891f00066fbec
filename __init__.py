"""vadflow: unsupervised visual anomaly detection on whole slides and inspection images.

The repository root is the `vadflow` package (see setup.py): `vadflow.flows` (Prefect flows and
the command line), `vadflow.tasks` (the library, by stage), `vadflow.data_contracts` and
`vadflow.deployments`. Importing `vadflow` imports nothing heavy.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vadflow")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
