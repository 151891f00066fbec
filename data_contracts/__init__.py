"""Data contracts: great-expectations suites for manifests, scores and metrics, and a runner
that reports failures by suite, expectation, column, example rows and slide.

The lowest floor of the package: nothing here imports ``vadflow.tasks`` or ``vadflow.flows``
(tests/test_contracts_layering.py holds that). By job:

- ``schemas``: the manifest and tile-score schemas the suites are written against;
- ``rules``, ``grid`` and one module per suite (``slide_manifest``, ``tile_manifest``,
  ``tile_scores``, ``slide_scores``, ``metrics``): what each boundary's frames must satisfy;
- ``runner``: great-expectations runs a suite; ``results``: what it found, as typed records;
- ``rendering`` and ``templates/``: jinja2 rendering of results (and of reports built on them).
"""

from vadflow.data_contracts.grid import Grid, Grids
from vadflow.data_contracts.results import (
    ContractError,
    ContractResult,
    ExpectationFailure,
    require,
)
from vadflow.data_contracts.runner import (
    SUITES,
    expectation_suite,
    run_suite,
    suite_rules,
    validate_metrics,
    validate_slide_manifest,
    validate_slide_scores,
    validate_tile_manifest,
    validate_tile_scores,
)

__all__ = [
    "SUITES",
    "ContractError",
    "ContractResult",
    "ExpectationFailure",
    "Grid",
    "Grids",
    "expectation_suite",
    "require",
    "run_suite",
    "suite_rules",
    "validate_metrics",
    "validate_slide_manifest",
    "validate_slide_scores",
    "validate_tile_manifest",
    "validate_tile_scores",
]
