"""Memory banks of normal feature vectors: a bounded uniform sample of a stream of patches
(`PatchReservoir`), outlier patches dropped before the coreset (`knn_outlier_scores`, robust
mode), k-center greedy coreset subsampling, as PatchCore reduces its bank, and the
nearest-neighbour distance to a bank.

patch_knn keeps a bank of normal patch features; the latent density (`latent_density.py`) a
bank of whitened normal latent codes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def k_center_greedy(
    features: torch.Tensor,
    size: int,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    chunk: int = 65536,
) -> torch.Tensor:
    """Indices (size,) of a coreset of `features` (N, C): each pick is the point farthest from
    everything picked so far, so the coreset covers the feature space's extremes (rare normal
    patterns included) instead of its dense middle, as a random subset would.

    Distances are measured after a seeded Gaussian random projection to `projection_dim` dims
    (Johnson-Lindenstrauss: pairwise distances are roughly kept), which makes each of the `size`
    passes over N points cheap. The first pick is a seeded random point.
    """
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    if size < 1:
        raise ValueError(f"coreset size must be >= 1, got {size}")
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if 0 < projection_dim < points.shape[1]:
        matrix = torch.randn(points.shape[1], projection_dim, generator=generator)
        matrix = (matrix / math.sqrt(projection_dim)).to(points.device)
        points = torch.cat([p @ matrix for p in points.split(chunk)])  # (N, d)
    squared = (points * points).sum(dim=1)  # (N,)
    first = int(torch.randint(n, (1,), generator=generator))
    picked = torch.empty(size, dtype=torch.long)
    picked[0] = first
    with _one_cpu_thread(points.device):
        # Squared distance of every point to its nearest pick so far.
        nearest = (squared - 2 * points @ points[first] + squared[first]).clamp_min_(0)
        for i in range(1, size):
            index = int(torch.argmax(nearest))
            picked[i] = index
            distance = (squared - 2 * points @ points[index] + squared[index]).clamp_min_(0)
            torch.minimum(nearest, distance, out=nearest)
    return picked


def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 8192
) -> torch.Tensor:
    """Euclidean distance of each query (M, C) to its nearest bank row (K, C), or the mean over
    its `k` nearest: (M,) float32. Computed in float32 in chunks, so memory stays M/chunk-bound.
    """
    bank = bank.float()
    bank_sq = (bank * bank).sum(dim=1)  # (K,)
    out = []
    for part in queries.float().split(chunk):
        squared = (part * part).sum(dim=1, keepdim=True) - 2 * part @ bank.T + bank_sq  # (m, K)
        nearest = squared.topk(min(k, bank.shape[0]), dim=1, largest=False).values  # (m, k)
        out.append(nearest.clamp_min(0).sqrt().mean(dim=1))
    return torch.cat(out)


class PatchReservoir:
    """A uniform random sample, without replacement, of at most `capacity` rows of a stream of
    (m, C) batches, so the training patches never have to be in memory at once.

    Bottom-k sampling: every row gets a seeded uniform key and the `capacity` smallest keys
    are kept, which is a uniform sample of the whole stream whatever its batching. Peak memory
    is (capacity + one batch) rows. While the stream is no longer than `capacity`, every row
    is kept, in arrival order.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._rows: torch.Tensor | None = None  # (k, C)
        self._keys = torch.empty(0)  # (k,) uniform keys
        self._order = torch.empty(0, dtype=torch.long)  # (k,) position in the stream

    def add(self, rows: torch.Tensor) -> None:
        """Offer a batch of rows (m, C) to the sample."""
        m = rows.shape[0]
        keys = torch.rand(m, generator=self._generator)
        order = torch.arange(self.seen, self.seen + m)
        self.seen += m
        rows = rows.detach().cpu()
        if self._rows is None:
            self._rows, self._keys, self._order = rows[:0].clone(), keys[:0], order[:0]
        all_rows = torch.cat([self._rows, rows])  # (k + m, C)
        all_keys = torch.cat([self._keys, keys])
        all_order = torch.cat([self._order, order])
        if len(all_keys) > self.capacity:
            keep = all_keys.topk(self.capacity, largest=False).indices
            all_rows, all_keys, all_order = all_rows[keep], all_keys[keep], all_order[keep]
        self._rows, self._keys, self._order = all_rows, all_keys, all_order

    def sample(self) -> torch.Tensor:
        """The kept rows (k, C), in the order they arrived."""
        if self._rows is None:
            raise ValueError("the patch reservoir is empty: no training patches were given")
        return self._rows[self._order.argsort()]


def knn_outlier_scores(
    points: torch.Tensor,
    k: int,
    *,
    reference_size: int = 8192,
    seed: int = 0,
    chunk: int = 4096,
) -> torch.Tensor:
    """How isolated each point (N, C) is: its mean distance to its `k` nearest points among a
    seeded random reference subset of at most `reference_size` points (itself left out): (N,).

    Robust mode's score (SoftPatch, Jiang et al. 2022, drops such patches from the bank before
    the coreset): normal patches sit in dense regions, anomalous ones that slipped into the
    training tiles in sparse ones. A group of anomalous patches larger than `k` reference
    points looks dense, so `k` should be about the share of suspect patches times the
    reference size (patch_knn: `contamination` x `reference_size`).
    """
    n = points.shape[0]
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randperm(n, generator=generator)[: min(reference_size, n)]
    bank = points[reference].float()
    k = max(1, min(k, len(reference) - 1))
    is_reference = torch.full((n,), -1, dtype=torch.long)
    is_reference[reference] = torch.arange(len(reference))
    bank_sq = (bank * bank).sum(dim=1)  # (R,)
    out = []
    for start in range(0, n, chunk):
        part = points[start : start + chunk].float()  # (m, C)
        squared = (part * part).sum(dim=1, keepdim=True) - 2 * part @ bank.T + bank_sq  # (m, R)
        self_index = is_reference[start : start + chunk]
        rows = torch.nonzero(self_index >= 0).squeeze(1)
        squared[rows, self_index[rows]] = float("inf")  # a point is not its own neighbour
        nearest = squared.topk(k, dim=1, largest=False).values  # (m, k)
        out.append(nearest.clamp_min(0).sqrt().mean(dim=1))
    return torch.cat(out)


def drop_outliers(
    points: torch.Tensor, contamination: float, *, reference_size: int = 8192, seed: int = 0
) -> torch.Tensor:
    """Indices of the points (N, C) kept when the `contamination` fraction with the highest
    `knn_outlier_scores` is dropped (k = contamination x the reference size)."""
    if not 0.0 < contamination < 1.0:
        raise ValueError(f"contamination must be in (0, 1), got {contamination}")
    reference = min(reference_size, points.shape[0])
    k = math.ceil(contamination * reference)
    scores = knn_outlier_scores(points, k, reference_size=reference_size, seed=seed)
    keep = points.shape[0] - int(contamination * points.shape[0])
    return scores.topk(max(keep, 1), largest=False).indices.sort().values


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the loop's thousands of small steps on one thread.

    Each step is a matrix-vector product of well under a millisecond; splitting it over threads
    costs more than it saves, and on a busy machine (other processes on the cores) the thread
    hand-offs made the loop 20x slower.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
