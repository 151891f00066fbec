"""The report of a run's contract checks, one folder per run (``report_folder``)::

    <reports>/contracts/<run>/
      index.html        every check of the run: status, failing expectations, example rows,
                        quarantined slides; self-contained, opens offline
      summary.md        the same in Markdown (the Prefect artifact's body)
      <label>.json      one check's result, as data
      <label>.gx.html   great-expectations Data Docs page of that validation

Each check adds its JSON and Data Docs page, then index.html and summary.md are rendered again
from every JSON in the folder (templates in ``templates/``), so the folder is always whole.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vadflow.data_contracts import ContractResult
from vadflow.data_contracts.rendering import render_template

if TYPE_CHECKING:
    from vadflow.tasks.validation.stage import StageValidation

log = logging.getLogger(__name__)

TEMPLATES = "vadflow.tasks.validation"  # the package whose templates/ holds the report's
EXAMPLE_ROWS = 3  # example rows per failing expectation in summary.md (index.html shows all)


def report_folder(reports: str | Path, run: str) -> Path:
    """``<reports>/contracts/<run>``: one report folder per run (run: a version or timestamp)."""
    return Path(reports) / "contracts" / safe_name(run)


def safe_name(text: str) -> str:
    """``text`` as a file name and HTML anchor: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "report"


def write_stage_report(stage: StageValidation, folder: str | Path) -> Path:
    """Write ``<label>.json`` and ``<label>.gx.html`` for one check, then rebuild the folder's
    ``index.html`` and ``summary.md`` from every check in it. Returns index.html."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = safe_name(stage.label)
    gx_page = _write_data_docs(stage.result, folder / f"{name}.gx.html", stage.label)
    record = {
        "label": stage.label,
        "mode": stage.mode,
        "checked_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "outcome": stage.outcome,
        "result": stage.result.to_dict(),
        "quarantined": [vars(q) for q in stage.quarantined],
        "data_docs": gx_page.name if gx_page else None,
    }
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    records = load_report(folder)
    (folder / "summary.md").write_text(_markdown(folder, records))
    index = folder / "index.html"
    index.write_text(_html(folder, records))
    return index


def _write_data_docs(result: ContractResult, path: Path, asset: str = "") -> Path | None:
    """great-expectations' own Data Docs page for the validation (rendered, not site-built:
    no store, no context files), made to open offline (``offline_page``) and naming its data
    asset. A rendering failure costs the page, never the check."""
    if result.gx_result is None:
        return None
    try:
        from great_expectations.render.renderer.page_renderer import (
            ValidationResultsPageRenderer,
        )
        from great_expectations.render.view.view import DefaultJinjaPageView

        name_data_asset(result.gx_result, asset or result.suite)
        document = ValidationResultsPageRenderer().render(result.gx_result)
        path.write_text(offline_page(DefaultJinjaPageView().render(document)))
    except Exception as exc:  # noqa: BLE001 - a report page must never fail the pipeline
        log.warning("could not render Data Docs for %s: %s", result.suite, exc)
        return None
    return path


def name_data_asset(gx_result: Any, fallback: str) -> None:
    """Give a validation result the data asset name its Data Docs page shows.

    GX 1.x keeps the name in ``meta["active_batch_definition"]`` but its page renderer reads
    ``meta["batch_spec"]["data_asset_name"]``, so an in-memory frame's page said "Data asset:
    None"; the name is copied across (``fallback``, the check's label, where there is none).
    """
    meta = gx_result.meta
    definition = meta.get("active_batch_definition") or {}
    asset = definition.get("data_asset_name") if isinstance(definition, dict) else None
    spec = dict(meta.get("batch_spec") or {})
    spec["data_asset_name"] = str(asset or fallback)
    meta["batch_spec"] = spec


_EXTERNAL_TAG = re.compile(
    r"<(?:link|script|img)\b[^>]*\b(?:href|src)\s*=\s*[\"']?(?:https?:)?//[^>]*>"
    r"(?:\s*</script>)?",
    re.IGNORECASE,
)
_EXTERNAL_HREF = re.compile(r"\s(?:href|src)\s*=\s*[\"'](?:https?:)?//[^\"']*[\"']", re.I)
_EXTERNAL_URL = re.compile(r"url\(\s*[\"']?(?:https?:)?//[^)]*\)", re.IGNORECASE)  # CSS
OFFLINE_CSS = "data_docs_offline.css"


def offline_page(page: str) -> str:
    """A Data Docs page that renders with no network: every stylesheet, script and image it
    would fetch from a CDN is dropped (tags, and CSS ``url()`` backgrounds), links out of the
    page lose their target, and our
    own stylesheet (``templates/data_docs_offline.css``, shipped in this package) is inlined
    in their place. Vega charts, which need their script, are not drawn; the tables are."""
    css = resources.files(TEMPLATES).joinpath("templates", OFFLINE_CSS).read_text()
    page = _EXTERNAL_TAG.sub("", page)
    page = _EXTERNAL_HREF.sub("", page)
    page = _EXTERNAL_URL.sub("none", page)
    note = (
        '<div class="vadflow-offline-note">Rendered for offline reading: charts that need '
        "scripts from the internet are left out; every table is here.</div>"
    )
    page = page.replace("</head>", f"<style>{css}</style>\n</head>", 1)
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + note, page, count=1)


def load_report(folder: str | Path) -> list[dict[str, Any]]:
    """Every check recorded in a report folder, oldest first."""
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    return sorted(records, key=lambda r: (r["checked_at"], r["label"]))


def report_markdown(folder: str | Path) -> str:
    """The folder's checks as Markdown: a status table, then each failing contract."""
    return _markdown(Path(folder), load_report(folder))


def _markdown(folder: Path, records: list[dict[str, Any]]) -> str:
    sections = [
        {
            "record": r,
            # The contract's own Markdown (data_contracts' template), so both say it alike.
            "result": ContractResult.from_dict(r["result"]).to_markdown().rstrip(),
            "examples": [
                {"expectation": f["expectation"], "column": f["column"], "row": row}
                for f in r["result"]["failures"]
                for row in f["example_rows"][:EXAMPLE_ROWS]
            ],
        }
        for r in records
        if not r["result"]["success"] or r["result"]["notes"]
    ]
    return render_template(
        TEMPLATES, "summary.md.j2", title=folder.name, records=records, sections=sections
    )


def _html(folder: Path, records: list[dict[str, Any]]) -> str:
    checks = [
        # css: the outcome's first word (passed, quarantined, FAILED) picks its colour.
        {**r, "anchor": safe_name(r["label"]), "css": r["outcome"].split()[0]}
        for r in records
    ]
    return render_template(TEMPLATES, "index.html.j2", title=folder.name, checks=checks)
