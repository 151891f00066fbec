"""patch_knn: PatchCore-style memory bank of normal patch features, nearest-neighbour score."""

from vadflow.tasks.detectors.components.memory_bank import k_center_greedy, nearest_distances
from vadflow.tasks.detectors.patch_knn.detector import PatchKNNConfig, PatchKNNDetector
from vadflow.tasks.detectors.patch_knn.torch_model import PatchKNNModel

__all__ = [
    "PatchKNNConfig",
    "PatchKNNDetector",
    "PatchKNNModel",
    "k_center_greedy",
    "nearest_distances",
]
