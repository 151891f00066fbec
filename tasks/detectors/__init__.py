"""Anomaly detector families behind one interface, found by name through a registry.

Importing this package imports every family subpackage (each folder here with an
`__init__.py`), whose `@register` decorators fill the registry; a new family needs no edit here.
"""

import importlib
import pkgutil

from vadflow.tasks.detectors.base import (
    Detector,
    DivergedError,
    FitReport,
    ScoreOutput,
    autocast_for,
    available_families,
    create_detector,
    detector_class,
    gaussian_smooth,
    load_detector,
    register,
    resolve_device,
    to_tensor,
    top_fraction_mean,
)
from vadflow.tasks.detectors.training import Trainer, TrainSettings

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Detector",
    "DivergedError",
    "FitReport",
    "ScoreOutput",
    "TrainSettings",
    "Trainer",
    "autocast_for",
    "available_families",
    "create_detector",
    "detector_class",
    "gaussian_smooth",
    "load_detector",
    "register",
    "resolve_device",
    "to_tensor",
    "top_fraction_mean",
]
