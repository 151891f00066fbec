"""Contract reports from jinja2 templates shipped inside a package's ``templates/`` folder.

One environment per package, created on first use: ``*.html.j2`` templates are autoescaped,
Markdown ones are not (Markdown has its own escaping: the ``markdown_cell`` filter). Blocks
swallow their own line (``trim_blocks``, ``lstrip_blocks``) so a template's layout is the
output's layout.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jinja2


def markdown_cell(value: Any) -> str:
    """``value`` as one cell of a Markdown table: pipes escaped, line breaks flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


@cache
def _environment(package: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field is an error, not a blank cell
    )
    env.filters["markdown_cell"] = markdown_cell
    env.filters["repr"] = repr
    # Key order kept (jinja's own tojson sorts keys): example rows read identifiers first.
    env.filters["json"] = lambda value: json.dumps(value, default=str)
    return env


def render_template(package: str, name: str, **context: Any) -> str:
    """Render ``<package>/templates/<name>`` with ``context``."""
    return _environment(package).get_template(name).render(**context)
