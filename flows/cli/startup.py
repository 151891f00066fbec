"""What a command does before the work: check its input, set up state, and start Prefect.

The checks here run before Prefect, MLflow or torch are imported, so a wrong site folder costs
milliseconds and prints one line; a local Prefect API that does not come up in time prints one
line naming the setting to raise and the alternative, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    """Run a flow; a local Prefect API that does not start becomes one line and exit 1."""
    from vadflow.flows.env import api_start_failure

    try:
        yield
    except Exception as exc:
        message = api_start_failure(exc)
        if message is None:
            raise
        raise fail(message, code=1) from None


def _one_line(exc: BaseException) -> str:
    """pydantic's multi-line ValidationError as `field: message; ...`, anything else joined."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
            for err in exc.errors()
        )
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
