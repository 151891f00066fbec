"""One path from a site's settings and the command line to a family's config.

Four layers, later ones winning:
1. `shared`: settings every family takes *if its config has the field* (the site's tile size
   and augmentation; the CLI's `--epochs`, `--seed`, `--device`, `--score`);
2. `domain`: the site's domain's defaults for this family (`DOMAIN_DEFAULTS`): a family's own
   defaults were chosen on tissue, and an industrial line needs others;
3. `site`: the site file's `detectors: {family: {...}}` entry for this family, where every key
   must be one of the family's fields (a typo is an error naming the valid fields); it
   overrides the domain's defaults key by key;
4. `flags`: like `shared`, but applied last (command-line flags beat the site file).

`create_detector(family, **family_settings(...))` is the only way the pipeline, the benchmark
and the CLI build a configured detector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vadflow.tasks.detectors.registry import detector_class

# Per domain and family, the settings a site of that domain starts from (its `detectors:` block
# overrides them key by key). Industrial: the families' own defaults were chosen on tissue (the
# filter bank averages its responses over 48 px, which blurs a weave's threads away; a 12 x 12
# window is a whole tile); on the hard synthetic line (README, "Industrial hard mode") these
# took patch_knn from fabric 0.860 / 0.567 and wood 0.943 / 0.655 (image AUROC / AU-PRO, seed 0)
# to 0.975 / 0.906 and 0.992 / 0.951, and padim from 0.863 / 0.574 and 0.880 / 0.628 to 0.988 /
# 0.903 and 0.912 / 0.940. Pathology keeps the families' own defaults.
DOMAIN_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "pathology": {},
    "industrial": {
        "patch_knn": {"features": "imagenet", "window": 2, "whiten": True, "map_norm": "position"},
        "padim": {"features": "imagenet", "gaussian": "position", "window": 1, "ridge": 0.01},
    },
}


def config_fields(family: str) -> list[str]:
    """The names of the fields of `family`'s config dataclass."""
    return [f.name for f in dataclasses.fields(detector_class(family).config_cls)]


def family_settings(
    family: str,
    *,
    shared: Mapping[str, Any] | None = None,
    domain: str | None = None,
    site: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config overrides for `family` from the four layers (None values are left out;
    `domain` None: no domain defaults)."""
    valid = config_fields(family)
    unknown = sorted(set(site or {}) - set(valid))
    if unknown:
        raise ValueError(
            f"detectors.{family} has no field(s) {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(valid)}"
        )

    def applicable(layer: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (layer or {}).items() if k in valid and v is not None}

    if domain is not None and domain not in DOMAIN_DEFAULTS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAIN_DEFAULTS)}")
    defaults = DOMAIN_DEFAULTS[domain].get(family, {}) if domain is not None else {}
    return {**applicable(shared), **defaults, **dict(site or {}), **applicable(flags)}
