"""Memory banks of normal feature vectors: a bounded uniform sample of a stream of patches
(`PatchReservoir`), the whitening patch_knn measures in, outlier patches dropped before the
coreset (robust mode: rows far from every other training slide's, `cross_slide_inliers`, or
isolated ones, `knn_outlier_scores`), k-center greedy coreset subsampling, as PatchCore
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

    def positions(self) -> torch.Tensor:
        """Where in the stream (row number, from 0) each row of `sample` came from: (k,)."""
        return self._order.sort().values


WHITEN_RIDGE = 1e-4  # added to the covariance's diagonal, relative to its mean variance


def whitening_transform(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (C,) and matrix W (C, C) with W @ cov @ W.T = I for patch rows (M, C): Euclidean
    distance after `(x - centre) @ W.T` is the Mahalanobis distance under the rows' Gaussian.

    The covariance gets a small ridge (WHITEN_RIDGE) so it is invertible; W is the inverse of
    its Cholesky factor. Computed in float64: feature channels can be near collinear.
    """
    x = rows.double()
    centre = x.mean(dim=0)
    covariance = torch.cov(x.T)  # (C, C)
    ridge = WHITEN_RIDGE * covariance.diagonal().mean().clamp_min(1e-12)
    covariance = covariance + ridge * torch.eye(len(covariance), dtype=x.dtype, device=x.device)
    factor = torch.linalg.cholesky(covariance)
    whitening = torch.linalg.solve_triangular(
        factor, torch.eye(len(covariance), dtype=x.dtype, device=x.device), upper=False
    )
    return centre.float(), whitening.float()


MAX_FOLDS = 5  # cross-slide trimming holds out at most this many groups of slides in turn


def held_out_distances(
    rows: torch.Tensor,
    slides: torch.Tensor,
    *,
    coreset_size: int = 4096,
    projection_dim: int = 64,
    reference_size: int = 65536,
    seed: int = 0,
) -> torch.Tensor:
    """How much farther each training patch row (M, C) lies from the patches of the *other*
    training slides than its own slide's lower quartile does: (M,). `slides` (M,) says which
    slide each row comes from (at least two slides).

    The slides are dealt into at most MAX_FOLDS folds; each fold's rows are measured against
    a whitened k-center coreset of (a seeded sample of at most `reference_size` of) the other
    folds' rows, the same nearest-neighbour distance patch_knn scores with. Normal tissue
    occurs on every slide, so its rows find close neighbours elsewhere; a lesion on an
    unlabelled tumour slide is on that slide only, so its rows do not, however many of them
    cluster together (which hides them from a density rule such as `knn_outlier_scores`).
    Each slide's lower-quartile distance is then subtracted: a whole slide can lie far from
    the others (stain, thickness), and its rows are not suspect for that. The quartile, not
    the median, so that a slide three quarters lesion is still measured from its normal
    tissue.

    Measured on the medium hard site with one of four training slides an unlabelled tumour
    slide: at seeds 1 / 3 its lesion rows lie at a median 8.6 / 8.6 from the other slides, its
    lesion-free rows at 3.2 / 3.5; at seed 2 one normal slide's rows lie at a median 13.1 (the
    others' 3.2-5.0), and dropping the 10 % farthest rows without the subtraction dropped 43 %
    of that slide and 7 % of the lesion rows (padim tile AUROC 0.714), with the median
    subtracted 88 % of the lesion rows (0.966; clean 0.985).
    """
    slides = torch.as_tensor(slides).long().cpu()
    names = slides.unique()
    if len(names) < 2:
        raise ValueError("cross-slide distances need training rows from at least two slides")
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(int(names.max()) + 1, dtype=torch.long)
    fold_of[names[torch.randperm(len(names), generator=generator)]] = torch.arange(
        len(names)
    ) % min(MAX_FOLDS, len(names))
    fold = fold_of[slides]  # (M,)
    out = torch.empty(rows.shape[0], dtype=torch.float32)
    for f in fold.unique():
        mine = (fold == f).to(rows.device)
        others = rows[~mine]
        if len(others) > reference_size:
            others = others[torch.randperm(len(others), generator=generator)[:reference_size]]
        centre, whitening = whitening_transform(others)
        reference = (others.float() - centre) @ whitening.T
        picked = k_center_greedy(
            reference, coreset_size, projection_dim=projection_dim, seed=seed
        ).to(rows.device)
        queries = (rows[mine].float() - centre) @ whitening.T
        out[mine.cpu()] = nearest_distances(queries, reference[picked]).cpu()
    for name in names:
        own = slides == name
        out[own] -= torch.quantile(out[own], 0.25)
    return out


OUTLIER_Z = 3.0  # padim's cross-slide trimming: rows this many robust SDs above the median


def held_out_outliers(excess: torch.Tensor, contamination: float) -> torch.Tensor:
    """Boolean mask (..., M), True where a row is dropped: its `held_out_distances` excess
    (..., M) lies more than OUTLIER_Z robust standard deviations (1.4826 x the median absolute
    deviation) above the median along the last axis, and among the `contamination` fraction
    largest (a cap, not a quota).

    padim's rule. Normal rows' excess sits near 0 on every slide, so only what no other slide
    has is cut, and a clean training set loses little. Measured on the medium hard site at
    seed 4: the clean set lost 4.4 % of its rows (the quota 10 %), the set with an unlabelled
    tumour slide 10.4 % before the cap, with 91 % of the lesion rows; padim's slide AUC on the
    clean site, seeds 0-4, went from the quota's 0.88 / 0.80 / 1.00 / 0.80 / 0.92 to 0.96 /
    0.80 / 1.00 / 0.76 / 0.92 (plain 0.96 / 0.80 / 1.00 / 0.76 / 0.96), and with the tumour
    slide it stayed as with the quota (0.92 / 0.76 / 1.00 / 0.84 / 0.84).
    """
    if not 0.0 < contamination < 1.0:
        raise ValueError(f"contamination must be in (0, 1), got {contamination}")
    median = excess.median(dim=-1, keepdim=True).values
    spread = 1.4826 * (excess - median).abs().median(dim=-1, keepdim=True).values
    beyond = excess > median + OUTLIER_Z * spread.clamp_min(1e-12)
    cap = int(contamination * excess.shape[-1])
    if cap < 1:
        return torch.zeros_like(beyond)
    largest = excess.topk(cap, dim=-1).indices
    capped = torch.zeros_like(beyond).scatter_(-1, largest, True)
    return beyond & capped


def cross_slide_inliers(
    rows: torch.Tensor, slides: torch.Tensor, contamination: float, **settings: int
) -> torch.Tensor:
    """Boolean mask (M,): the rows kept when the `contamination` fraction farthest from the
    other slides' patches, beyond their own slide's typical row (`held_out_distances`,
    `settings` passed on), is dropped: a quota, patch_knn's rule. A memory bank answers with
    its nearest entry, so the few lesion rows an outlier cut leaves in call a lesion normal:
    with `held_out_outliers` instead, patch_knn's tile AUROC with an unlabelled tumour slide
    fell 0.962 / 0.881 / 0.950 / 0.864 -> 0.938 / 0.841 / 0.945 / 0.819 (medium hard site,
    seeds 0-3)."""
    if not 0.0 < contamination < 1.0:
        raise ValueError(f"contamination must be in (0, 1), got {contamination}")
    distances = held_out_distances(rows, slides, **settings)
    keep = torch.zeros(len(distances), dtype=torch.bool)
    kept = max(1, len(distances) - int(contamination * len(distances)))
    keep[distances.topk(kept, largest=False).indices] = True
    return keep


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
