"""Data contracts: great-expectations suites for the manifests, and a runner that reports
failures by suite, expectation, column and slide."""

from data_contracts.runner import (
    ContractError,
    ContractResult,
    ExpectationFailure,
    require,
    validate_slide_manifest,
    validate_tile_manifest,
)

__all__ = [
    "ContractError",
    "ContractResult",
    "ExpectationFailure",
    "require",
    "validate_slide_manifest",
    "validate_tile_manifest",
]
