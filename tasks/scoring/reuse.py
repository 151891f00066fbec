"""Reuse an earlier night's scores of an unchanged slide by the same model.

After scoring, the nightly records in the model folder (`scored/<slide_id>.json`) what the
slide's scores came from: its sha256, its tile manifest's bytes, the heatmap downsample and the
scoring code's version, with the SlideScore. A later night scoring the same slide with the same
model folder (an unchanged family reuses it, `tasks/training/reuse.py`) links the earlier
heatmap and tile scores into tonight's folder instead of decoding a pixel. A retrained model
has a new folder with no records, so every slide is scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from functools import cache
from pathlib import Path
from typing import Any

from vadflow.tasks.records import SlideScore

SCORED_DIR = "scored"
PACKAGE = Path(__file__).resolve().parents[2]


@cache
def scoring_code_version() -> str:
    """The package version and a hash of the scoring code: changed heatmap code rescores."""
    from vadflow import __version__

    digest = hashlib.sha256(__version__.encode())
    for path in sorted((PACKAGE / "tasks" / "scoring").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _inputs(slide_row: dict[str, Any], tiles_path: str, heatmap_downsample: int) -> dict:
    tiles = hashlib.sha256(Path(tiles_path).read_bytes()).hexdigest()
    return {
        "slide_sha256": slide_row.get("sha256"),
        "tiles": tiles,
        "heatmap_downsample": heatmap_downsample,
        "code": scoring_code_version(),
    }


def _record_path(model_dir: str | Path, slide_id: str) -> Path:
    return Path(model_dir) / SCORED_DIR / f"{slide_id}.json"


def remember_score(
    model_dir: str | Path,
    slide_row: dict[str, Any],
    tiles_path: str,
    heatmap_downsample: int,
    score: SlideScore,
) -> None:
    """Record what `score` was computed from, in the model folder (written atomically)."""
    path = _record_path(model_dir, score.slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"inputs": _inputs(slide_row, tiles_path, heatmap_downsample), "score": asdict(score)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)


def earlier_score(
    model_dir: str | Path,
    slide_row: dict[str, Any],
    tiles_path: str,
    out_dir: str | Path,
    heatmap_downsample: int,
) -> SlideScore | None:
    """The slide's earlier SlideScore by this model, its files linked (or copied) into
    `out_dir`, when nothing it came from changed; None otherwise (score it)."""
    path = _record_path(model_dir, slide_row["slide_id"])
    if not path.is_file() or not Path(tiles_path).is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record["inputs"] != _inputs(slide_row, tiles_path, heatmap_downsample):
            return None
        earlier = SlideScore(**record["score"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    sources = [Path(earlier.heatmap), Path(earlier.tile_scores)]
    if not all(p.is_file() for p in sources):
        return None  # the earlier run's outputs were cleaned up: score again
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heatmap, tile_scores = (_link(p, out / p.name) for p in sources)
    return replace(earlier, heatmap=str(heatmap), tile_scores=str(tile_scores))


def _link(source: Path, target: Path) -> Path:
    """A hard link where the file system allows (no bytes copied), else a copy."""
    if source.resolve() == target.resolve():
        return target
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target
