"""Passing contract results, remembered so that an unchanged manifest is not checked again.

A result is keyed by the content hash of the files checked (sha256 of their bytes), the
check's parameters (suite names, tiling grid, mode) and the code that decides it (the package
version and a hash of ``data_contracts/``'s sources). Only passing results are remembered: a
failing check, or one whose inputs changed in any byte, runs again. The record is one JSON file
beside the run reports (``<reports>/contracts/passed.json``), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

PASSED_FILE = "passed.json"
KEEP = 64  # newest passing results kept: enough for every site's boundaries over weeks


@cache
def contracts_code_hash() -> str:
    """sha256 of the contract suites' sources and the package version: a new rule (or a
    changed one) makes every remembered result stale."""
    from vadflow import __version__, data_contracts

    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(data_contracts.__file__).parent.rglob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def contract_key(paths: Iterable[str | Path], params: Mapping[str, Any]) -> str:
    """The key of one check: its input files' content, its parameters and the contracts code.
    File order is kept (the slide manifest first, then the tile manifests)."""
    body = {
        "files": [file_digest(p) for p in paths],
        "params": params,
        "code": contracts_code_hash(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class PassedResults:
    """The remembered passing results in ``folder``/passed.json: key -> the run that passed."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / PASSED_FILE
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            loaded = json.loads(self.path.read_text())
            self.entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}  # none yet, or damaged: the checks run, nothing is skipped wrongly

    def passed_in(self, key: str) -> str | None:
        """The run whose identical check passed, or None."""
        entry = self.entries.get(key)
        return entry.get("run") if isinstance(entry, dict) else None

    def record(self, key: str, run: str, report_dir: str | Path) -> None:
        """Remember a passing check and write the file atomically (newest ``KEEP`` kept)."""
        self.entries.pop(key, None)
        self.entries[key] = {"run": run, "report": str(report_dir)}
        kept = dict(list(self.entries.items())[-KEEP:])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".passed.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(kept, handle, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.entries = kept
