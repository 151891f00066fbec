"""mil: top-k multiple-instance learning from slide labels only (Campanella et al. 2019)."""

from vadflow.tasks.detectors.mil.detector import (
    MILConfig,
    MILDetector,
    MILTrainer,
    aggregate_bags,
    bag_offsets,
    top_k_per_bag,
)

__all__ = [
    "MILConfig",
    "MILDetector",
    "MILTrainer",
    "aggregate_bags",
    "bag_offsets",
    "top_k_per_bag",
]
