"""The metrics record contract: AUROC-like values in [0, 1], counts that are whole and
non-negative, and no more anomalous test slides than test slides.

A record (``tasks/evaluation/evaluate.py``'s metrics plus its FROC points) is a flat mapping of
names to numbers whose keys vary by site, so it is validated in long form: one row per metric,
with its ``kind`` derived from its name. A metric may be NaN where it is undefined (no normal
test slide: no specificity); NaN is allowed except for the required counts.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import polars as pl

from vadflow.data_contracts.rules import (
    Rule,
    Where,
    at_least,
    between,
    compound_unique,
    equal,
    finite,
    not_null,
    schema,
)

SUITE_NAME = "metrics"
COLUMNS = ("record", "metric", "value", "kind")
REQUIRED = ("n_test_slides", "n_test_anomalous")
# A name split on "_" holding one of these is a rate or an area under a curve: in [0, 1].
UNIT_TOKENS = frozenset(
    {"auroc", "aupr", "aupro", "pro", "f1", "froc", "sens", "sensitivity", "specificity"}
    | {"precision", "recall", "accuracy", "iou", "dice", "tpr", "fpr"}
)


def metric_kind(name: str) -> str:
    """'count' for n_*, 'unit' for AUROC-like rates, 'other' (threshold, losses) otherwise."""
    if name.startswith("n_"):
        return "count"
    if UNIT_TOKENS & set(name.lower().split("_")):
        return "unit"
    return "other"


def metrics_rules() -> list[Rule]:
    """Rules for ``validation_frame(metrics)``."""
    rules = schema(COLUMNS, "metrics column")
    rules.append(compound_unique(("record", "metric"), "a metric is reported once per record"))
    rules.append(
        not_null("value", Where("metric", "in", REQUIRED), "the record has its test-slide counts")
    )
    rules.append(finite("value", description="metrics are finite"))
    rules.append(
        between("value", 0.0, 1.0, where=Where("kind", "==", "unit"), description="in [0, 1]")
    )
    rules.append(
        between("value", 0, None, where=Where("kind", "==", "count"), description="count >= 0")
    )
    rules.append(
        equal(
            "value",
            "value_rounded",
            Where("kind", "==", "count"),
            "counts are whole numbers",
        )
    )
    rules.append(
        at_least(
            "n_test_slides",
            "value",
            where=Where("metric", "==", "n_test_anomalous"),
            description="n_test_anomalous <= n_test_slides",
        )
    )
    return rules


def validation_frame(
    metrics: Mapping[str, float] | pl.DataFrame, record: str = "metrics"
) -> pl.DataFrame:
    """Long form: record, metric, value, kind, value_rounded, and the record's n_test_slides.

    ``metrics`` is one record (name -> value), or a frame already in long form with columns
    record, metric, value. Required counts that are missing become null values.
    """
    if isinstance(metrics, pl.DataFrame):
        frame = metrics
    else:
        values = {**dict.fromkeys(REQUIRED), **dict(metrics)}
        frame = pl.DataFrame(
            {
                "record": [record] * len(values),
                "metric": list(values),
                "value": [_number(k, v) for k, v in values.items()],
            },
            schema={"record": pl.String, "metric": pl.String, "value": pl.Float64},
        )
    if not {"record", "metric", "value"} <= set(frame.columns):
        return frame
    frame = frame.with_columns(
        pl.col("value").cast(pl.Float64),
        pl.col("metric").map_elements(metric_kind, return_dtype=pl.String).alias("kind"),
    )
    totals = frame.filter(pl.col("metric") == "n_test_slides").select(
        "record", pl.col("value").alias("n_test_slides")
    )
    return frame.with_columns(value_rounded=pl.col("value").round(0)).join(
        totals.unique(subset="record", keep="first"), on="record", how="left", maintain_order="left"
    )


def _number(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"metric {name!r} must be a number, not {value!r}")
    return float(value)
