"""What a command does before the work: check its input, set up state, and start Prefect.

The checks here run before Prefect, MLflow or torch are imported, so a wrong site folder costs
milliseconds and prints one line; a local Prefect API that does not come up in time prints one
line naming the setting to raise and the alternative, never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vadflow.flows.cli.options import console

if TYPE_CHECKING:
    from vadflow.tasks.site import SiteConfig


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one red line and return the Exit to raise (2: bad input; 1: the work failed)."""
    console.print(f"[red]error:[/] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def checked_site(site_dir: Path) -> SiteConfig:
    """The site's validated configuration; a folder that is not a usable site exits 2."""
    from pydantic import ValidationError

    from vadflow.tasks.site import SITE_FILE, load_site

    try:
        return load_site(site_dir)
    except ValidationError as exc:  # name the file the fields are in
        settings = site_dir / SITE_FILE
        where = f"{settings}: " if settings.exists() else ""
        raise fail(f"cannot read site {site_dir}: {where}{_one_line(exc)}") from None
    except (FileNotFoundError, ValueError) as exc:
        raise fail(f"cannot read site {site_dir}: {_one_line(exc)}") from None


@contextmanager
def prefect_api() -> Iterator[None]:
    """Run a flow against `$PREFECT_API_URL`, or else a local Prefect API that stops when this
    process ends, however it ends (`flows/local_api.py`); one that does not start, or a site
    another run holds (`tasks/runs.py`), becomes one line and exit 1."""
    from vadflow.flows.env import api_start_failure
    from vadflow.tasks.runs import SiteBusyError

    try:
        with _api_server():
            yield
    except SiteBusyError as exc:  # another run of the site: say who, not a traceback
        raise fail(str(exc), code=1) from None
    except Exception as exc:
        message = api_start_failure(exc)
        if message is None:
            raise
        raise fail(message, code=1) from None


def _api_server() -> AbstractContextManager[object]:
    """Nothing to start when a Prefect server is configured; else the watched local one."""
    from prefect.settings import PREFECT_API_URL

    from vadflow.flows.env import EPHEMERAL_STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_SETTING
    from vadflow.flows.local_api import local_prefect_api

    if PREFECT_API_URL.value():
        return nullcontext()
    home = Path(os.environ.get("VADFLOW_HOME") or ".vadflow")
    timeout = float(os.environ.get(STARTUP_TIMEOUT_SETTING) or EPHEMERAL_STARTUP_TIMEOUT_S)
    return local_prefect_api(home, timeout)


def _one_line(exc: BaseException) -> str:
    """pydantic's multi-line ValidationError as `field: message; ...`, anything else joined."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
            for err in exc.errors()
        )
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
