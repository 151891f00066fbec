"""Memory banks of normal feature vectors: k-center greedy coreset subsampling, as PatchCore
reduces its bank, and the nearest-neighbour distance to a bank.

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
