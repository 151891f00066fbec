"""One path from a site's settings and the command line to a family's config.

Three layers, later ones winning:
1. `shared`: settings every family takes *if its config has the field* (the site's tile size
   and augmentation; the CLI's `--epochs`, `--seed`, `--device`, `--score`);
2. `site`: the site file's `detectors: {family: {...}}` entry for this family, where every key
   must be one of the family's fields (a typo is an error naming the valid fields);
3. `flags`: like `shared`, but applied last (command-line flags beat the site file).

`create_detector(family, **family_settings(...))` is the only way the pipeline, the benchmark
and the CLI build a configured detector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vadflow.tasks.detectors.registry import detector_class


def config_fields(family: str) -> list[str]:
    """The names of the fields of `family`'s config dataclass."""
    return [f.name for f in dataclasses.fields(detector_class(family).config_cls)]


def family_settings(
    family: str,
    *,
    shared: Mapping[str, Any] | None = None,
    site: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config overrides for `family` from the three layers (None values are left out)."""
    valid = config_fields(family)
    unknown = sorted(set(site or {}) - set(valid))
    if unknown:
        raise ValueError(
            f"detectors.{family} has no field(s) {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(valid)}"
        )

    def applicable(layer: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (layer or {}).items() if k in valid and v is not None}

    return {**applicable(shared), **dict(site or {}), **applicable(flags)}
