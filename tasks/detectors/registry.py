"""The registry of detector families: register, list, get.

A family is one folder here with an `__init__.py` whose `@register("name")` class decorator
adds it. Listing names (`family_names`, `check_family`) reads the folder names and imports
nothing, so the CLI and site validation can reject a typo in milliseconds, before torch loads;
`detector_class` imports the one family it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from vadflow.tasks.detectors.base import Detector

PACKAGE = __name__.rpartition(".")[0]
NOT_FAMILIES = frozenset({"components"})  # shared parts live beside the families

_REGISTRY: dict[str, type[Detector]] = {}

DetectorT = TypeVar("DetectorT", bound="type[Detector]")


class UnknownFamilyError(KeyError, ValueError):
    """A family name that no folder of `tasks/detectors/` registers (a ValueError too, so a
    site file naming one fails pydantic validation with the field named)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register(name: str) -> Callable[[DetectorT], DetectorT]:
    """Class decorator: make a Detector subclass available as `create_detector(name)`."""

    def decorator(cls: DetectorT) -> DetectorT:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"detector family {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return decorator


@cache
def family_names() -> tuple[str, ...]:
    """The families shipped here, by folder name, without importing any of them."""
    here = Path(__file__).parent
    return tuple(
        sorted(
            p.name
            for p in here.iterdir()
            if (p / "__init__.py").is_file() and p.name not in NOT_FAMILIES
        )
    )


def check_family(name: str) -> str:
    """`name` if it is a family (shipped or registered at run time); else UnknownFamilyError."""
    if name in _REGISTRY or name in family_names():
        return name
    known = sorted({*family_names(), *_REGISTRY})
    raise UnknownFamilyError(f"unknown detector family {name!r}; available: {', '.join(known)}")


def detector_class(name: str) -> type[Detector]:
    """The class registered as `name`, importing its folder on first use."""
    if name not in _REGISTRY:
        check_family(name)
        importlib.import_module(f"{PACKAGE}.{name}")
    return _REGISTRY[name]


def available_families() -> list[str]:
    """Every family, imported and registered (shipped ones plus any registered at run time)."""
    for name in family_names():
        detector_class(name)
    return sorted(_REGISTRY)


def create_detector(name: str, **overrides: Any) -> Detector:
    """A fresh detector of family `name`, its config defaults replaced by `overrides`."""
    from vadflow.tasks.detectors.base import make_config

    cls = detector_class(name)
    return cls(make_config(cls.config_cls, name, overrides))


def load_detector(directory: Path, *, device: str | None = None) -> Detector:
    """Load any saved detector: the family named in its `config.json` picks the class."""
    from vadflow.tasks.detectors.base import read_config

    family = read_config(Path(directory))["family"]
    return detector_class(family).load(directory, device=device)
