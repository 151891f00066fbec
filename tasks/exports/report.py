"""A per-run HTML report: one self-contained file with the metrics, the plots and the slides.

Images are embedded as base64 PNG (``data:`` URIs), shrunk to a readable size first, so the
file can be mailed, attached to an MLflow run or opened offline with nothing beside it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; border: 1px solid #ddd; }
section.slide { border-top: 1px solid #ccc; margin-top: 1.5em; }
.pair { display: flex; gap: 0.5em; align-items: flex-start; flex-wrap: wrap; }
.pair figure { margin: 0; max-width: 49%; }
.call-anomalous { color: #b00; font-weight: bold; }
.call-normal { color: #070; font-weight: bold; }
"""


@dataclass(frozen=True)
class SlideSection:
    """One slide's part of the report: the call, its probability, its strongest regions, and
    the slide thumbnail beside its overlay."""

    slide_id: str
    call: str  # "anomalous", "normal", or why there is none
    score: float  # the slide score the call is on
    peak_raw: float | None  # the strongest location's raw score
    probability: float | None  # ... and its calibrated probability (None: none)
    top_regions: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    thumbnail: str = ""
    overlay: str = ""


def _slide_section(section: SlideSection) -> str:
    sid = html.escape(section.slide_id)
    css = f"call-{section.call}" if section.call in ("anomalous", "normal") else ""
    if section.probability is not None:
        peak = f"probability {section.probability:.3f} (raw score {section.peak_raw:.4g})"
    elif section.peak_raw is not None:
        peak = f"raw score {section.peak_raw:.4g} (no calibrated probability)"
    else:
        peak = "nothing scored"
    parts = [
        f'<section class="slide" id="slide-{html.escape(section.slide_id, quote=True)}">',
        f"<h3>{sid}</h3>",
        f'<p>Call: <span class="{css}">{html.escape(section.call)}</span> '
        f"(slide score {_cell(section.score)[0]}). Strongest location: {peak}.</p>",
    ]
    if section.top_regions:
        columns = ["rank", "anomaly_probability", "raw_score", "x", "y", "area_um2"]
        parts += ["<p>Top regions (level-0 pixels):</p>", _table(section.top_regions, columns)]
    else:
        parts.append("<p>No region above the prediction level.</p>")
    images = {"slide": section.thumbnail, "overlay": section.overlay}
    shown = {k: v for k, v in images.items() if v and Path(v).is_file()}
    if shown:
        parts.append(f'<div class="pair">{_figures(shown, 512, photo=True)}</div>')
    parts.append("</section>")
    return "\n".join(parts)


def _cell(value: Any) -> tuple[str, bool]:
    """HTML text of a table value, and whether it is a number (right-aligned)."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return str(value).lower(), False
    if isinstance(value, int):
        return str(value), True
    if isinstance(value, float):
        return ("n/a" if math.isnan(value) else f"{value:.4g}"), True
    return html.escape(str(value)), False


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            text, numeric = _cell(row.get(column))
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_data_uri(path: str | Path, max_edge_px: int = 800, photo: bool = False) -> str:
    """A ``data:`` URI of an image file, shrunk to ``max_edge_px``: PNG (plots, line art), or
    with ``photo`` JPEG (slide overlays: a tenth of the bytes, and no PNG optimisation pass,
    which took 0.6 s per 512 px texture overlay)."""
    with Image.open(path) as image:
        image = image.convert("RGBA") if image.mode not in ("RGB", "RGBA") else image.copy()
    image.thumbnail((max_edge_px, max_edge_px))
    buffer = io.BytesIO()
    if photo:
        image.convert("RGB").save(buffer, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures(images: Mapping[str, str | Path], max_edge_px: int, photo: bool = False) -> str:
    out = []
    for caption, path in images.items():
        uri = png_data_uri(path, max_edge_px, photo)
        alt = html.escape(caption, quote=True)
        out.append(
            f'<figure><img src="{uri}" alt="{alt}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>"
        )
    return "\n".join(out)


def write_html_report(
    out_html: str | Path,
    title: str,
    slides: pl.DataFrame | Sequence[Mapping[str, Any]],
    metrics: Mapping[str, float],
    plots: Mapping[str, str | Path] | None = None,
    overlays: Mapping[str, str | Path] | None = None,
    notes: Sequence[str] = (),
    sections: Sequence[SlideSection] = (),
) -> Path:
    """Write the run report: metrics table, plots, the table of slides, then one section per
    slide (``sections``: the call, the probability, the top regions, thumbnail | overlay)
    and any further ``overlays``.

    ``slides`` is the per-slide table (a DataFrame or rows), shown as is; ``plots`` and
    ``overlays`` map a caption (e.g. "ROC", a slide id) to a PNG file, embedded inline.
    ``notes`` are short paragraphs (where the outputs are, which threshold was used).
    """
    rows = slides.to_dicts() if isinstance(slides, pl.DataFrame) else [dict(r) for r in slides]
    columns: list[str] = (
        list(slides.columns)
        if isinstance(slides, pl.DataFrame)
        else list(dict.fromkeys(k for r in rows for k in r))
    )
    metric_rows = [{"metric": k, "value": v} for k, v in metrics.items()]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {stamp}.</p>",
        *(f"<p>{html.escape(n)}</p>" for n in notes),
        '<h2 id="metrics">Metrics</h2>',
        _table(metric_rows, ["metric", "value"]),
    ]
    if plots:
        parts += ['<h2 id="plots">Curves</h2>', _figures(plots, 800)]
    parts += [f'<h2 id="slides">Slides ({len(rows)})</h2>', _table(rows, columns)]
    if sections:
        parts.append('<h2 id="calls">Per slide: call, probability, top regions</h2>')
        parts += [_slide_section(s) for s in sections]
    if overlays:
        parts += ['<h2 id="overlays">Heatmap overlays</h2>', _figures(overlays, 512, photo=True)]
    parts.append("</body></html>")
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
