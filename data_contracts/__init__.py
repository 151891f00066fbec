"""Data contracts: great-expectations suites for manifests, scores and metrics, and a runner
that reports failures by suite, expectation, column, example rows and slide."""

from vadflow.data_contracts.grid import Grid, Grids
from vadflow.data_contracts.runner import (
    SUITES,
    ContractError,
    ContractResult,
    ExpectationFailure,
    expectation_suite,
    require,
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
