"""Exports and reports are written per run, then published as "latest" in one atomic step.

A run writes its overlays, lesion files and report into its own folder,
`<exports|reports>/.runs/<name>/<run>/`, which no other run touches. When the run is complete,
`<exports|reports>/<name>` is pointed at it: a relative symbolic link, replaced with
`os.replace`, so a pathologist opening `exports/ae_l2/` sees one whole run, the previous or the
new, never a folder half redrawn, and a run killed before publishing leaves the latest as it
was. `<run>` is the run's heatmap folder name (`ae_l2-<version>`), unique per run.

A folder left at `<name>` by a version of vadflow from before this scheme is moved into
`.runs/<name>/` once, the first time a run publishes there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from vadflow.tasks.records import SlideScore

_STAMP = re.compile(r"\d{8}T\d{6}.*$")
RUNS = ".runs"  # hidden: listing exports/ shows the latest of each name, not every run
KEEP_RUNS = 10  # per name; older run folders are removed when a newer one is published


def run_key(name: str, scores: Sequence[SlideScore]) -> str:
    """The run's folder name: its heatmap folder's (`ae_l2-<version>`; for a category run
    `ae_l2/bottle` the folder above `heatmaps/ae_l2-<version>/bottle`), else `name`."""
    if not scores:
        return name.replace("/", "-")
    folder = Path(scores[0].heatmap).parent
    for _ in range(name.count("/")):
        folder = folder.parent
    return folder.name


def run_folder(root: str | Path, name: str, run: str) -> Path:
    """`<root>/.runs/<name>/<run>`: where run `run` of `name` writes (`name` may hold a
    category: `ae_l2/bottle`)."""
    return Path(root) / RUNS / name / run


def publish_latest(root: str | Path, name: str, run: str, keep: int = KEEP_RUNS) -> Path:
    """Make `<root>/<name>` show run `run` (its `run_folder`), atomically; returns the link.

    The runs of `name` beyond the `keep` newest (by folder name, which starts with the UTC
    version) are removed, never the one published.
    """
    target = run_folder(root, name, run)
    if not target.is_dir():
        raise FileNotFoundError(f"cannot publish {target}: the run wrote no folder there")
    link = Path(root) / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() and not link.is_symlink():  # written before per-run folders existed
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        link.rename(run_folder(root, name, f"before-{stamp}"))
    staged = link.with_name(f".{link.name}.{os.getpid()}.link")
    staged.unlink(missing_ok=True)
    staged.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    os.replace(staged, link)
    _prune(target.parent, keep, run)
    return link


def _prune(runs: Path, keep: int, published: str) -> None:
    import shutil

    def started(folder: Path) -> str:  # the UTC version in the name (tasks/runs.py)
        found = _STAMP.search(folder.name)
        return found.group(0) if found else ""

    folders = sorted((p for p in runs.iterdir() if p.is_dir()), key=started)
    for old in folders[: max(0, len(folders) - keep)]:
        if old.name != published:
            shutil.rmtree(old, ignore_errors=True)
