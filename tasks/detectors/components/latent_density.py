"""Latent-density scores for the families with an encoder (ae_l2, vae, spatial_vae, fanogan).

A residual score asks "can the model draw this tile?". Tissue that is *easier* to draw than
normal tissue (dense, regular nuclei against fibrous stroma, fat and glass gaps) passes that test
and is ranked below normal: worse than chance. The encoder's code for such a tile still lies
away from the codes of normal tiles, so a density of the normal codes catches it. A family's
config field `score` picks:

- "residual": the family's own reconstruction score (the default; nothing changes);
- "latent": the distance of the tile's code to the nearest normal code, below;
- "combined": both, each standardised on the normal validation tiles (a robust z-score), summed.

The density: nearest-neighbour distance, in the metric of the normal codes' covariance, to a
coreset of normal codes. One code per tile for a dense latent (vae, fanogan), one per latent
cell for a spatial one (ae_l2, spatial_vae), pooled over cells because position within a tile
carries no meaning. Fitting streams the training tiles once: it accumulates the codes' mean and
covariance (shrunk by OAS, Chen et al. 2010, so it inverts even with few codes or dead latent
dimensions) and keeps a seeded uniform sample of at most `max_codes` codes; the sample is then
whitened (x -> (x - mean) L with L L^T the inverse covariance, so Euclidean distance there is
Mahalanobis distance) and reduced to `coreset_size` by patch_knn's k-center greedy.

Why this and not a single Gaussian (Mahalanobis distance to the mean, as PaDiM): a tile that is
easier to reconstruct than normal tissue is often *simpler* than it (smoother, more uniform), and
its code falls near the average of the normal codes, the densest point of a Gaussian. On the
fibre texture of tests/test_latent_density.py (ae_l2, seeds 0-2) the Gaussian gave smoothed
regions tile AUROC 0.09-0.65 and crossing fibres 0.90-1.00; nearest-neighbour distance gave
0.95-1.00 and 1.00, since no normal code lies where the smoothed ones do. Why whitened rather
than raw codes: code dimensions have arbitrary scales, and on the tiny hard synthetic site
(141 training tiles) whitened nearest-neighbour distance gave tile AUROC 0.90 (ae_l2), 0.83 (vae)
and 0.95 (fanogan), against 0.89, 0.64 and 0.88 with per-dimension standardisation (and 0.81,
0.75 and 0.93 for the single Gaussian).

Why a spatial code's tile score is the mean over the whole tile (`latent_top_fraction` 1) where
the residual's is the top 10 %: a normal tile's few most unusual cells (a tissue edge, two
touching nuclei) are as far from the bank as an anomaly's, so the top cells are noise, while a
region of another texture moves many cells. On the fibre texture the mean scored 1.00 on
crossing fibres and 0.95-1.00 on smoothed regions, the top 10 % 0.86-0.97 and 0.60-0.88; on the
hard site 0.90 against 0.87. Small defects stay the residual's job, which "combined" keeps.
"""

from __future__ import annotations

import contextlib
import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vadflow.tasks.detectors.base import FitReport, to_tensor
from vadflow.tasks.detectors.components.anomaly_maps import (
    AutoencoderConfig,
    check_fraction,
    map_and_score,
)
from vadflow.tasks.detectors.components.backbones import upsample_map
from vadflow.tasks.detectors.components.memory_bank import k_center_greedy, nearest_distances
from vadflow.tasks.detectors.components.training import TrainedDetector

SCORE_OPTIONS = ("residual", "latent", "combined")
DENSITY_PREFIX = "latent_density."


def check_score_option(score: str) -> None:
    """Refuse an unknown `score` config value, naming the valid ones."""
    if score not in SCORE_OPTIONS:
        raise ValueError(f"score must be one of {SCORE_OPTIONS}, got {score!r}")


@dataclass(frozen=True)
class LatentScoredConfig(AutoencoderConfig):
    """The autoencoder fields plus the choice of score (ae_l2, vae, spatial_vae)."""

    # "residual" (the family's reconstruction score), "latent" (distance of the tile's code to
    # the nearest normal code) or "combined" (both, standardised on the validation tiles).
    score: str = "residual"
    # Spatial latents: latent tile score = mean of this top fraction of the latent map.
    latent_top_fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_score_option(self.score)
        check_fraction("latent_top_fraction", self.latent_top_fraction)


def oas_shrinkage(covariance: torch.Tensor, n: int) -> float:
    """OAS shrinkage towards a scaled identity (Chen et al. 2010, eq. 23, as scikit-learn's
    `OAS`), from the biased empirical covariance (C, C) of `n` samples alone."""
    channels = covariance.shape[0]
    if channels == 1:
        return 0.0
    alpha = float((covariance**2).mean())
    mu = float(torch.trace(covariance)) / channels
    numerator = alpha + mu * mu
    denominator = (n + 1) * (alpha - mu * mu / channels)
    return 1.0 if denominator <= 0 else min(numerator / denominator, 1.0)


class LatentDensity(nn.Module):
    """Normal latent codes: whitening, a whitened coreset, and the standardisation of scores.

    Buffers (saved with the detector's weights): `mean` (C,), `whitener` (C, C), `bank` (K, C)
    whitened normal codes (K = 0 until fitted), `count` (codes seen in fitting), `shrinkage`,
    and `residual_stats` / `latent_stats`: (centre, scale) of each tile score on the normal
    validation tiles.
    """

    mean: torch.Tensor
    whitener: torch.Tensor
    bank: torch.Tensor
    count: torch.Tensor
    shrinkage: torch.Tensor
    residual_stats: torch.Tensor
    latent_stats: torch.Tensor

    def __init__(
        self, channels: int, *, coreset_size: int = 4096, max_codes: int = 65536, seed: int = 0
    ) -> None:
        super().__init__()
        if coreset_size < 1 or max_codes < 1:
            raise ValueError(
                f"coreset_size and max_codes must be >= 1, got {coreset_size}, {max_codes}"
            )
        self.channels = channels
        self.coreset_size = coreset_size
        self.max_codes = max_codes
        self.seed = seed
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("whitener", torch.eye(channels))
        self.register_buffer("bank", torch.zeros(0, channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("shrinkage", torch.zeros(()))
        self.register_buffer("residual_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("latent_stats", torch.tensor([0.0, 1.0]))

    @property
    def fitted(self) -> bool:
        return self.bank.shape[0] > 0

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit on normal code batches, (b, C) or (b, C, h, w), in one streaming pass."""
        total = torch.zeros(self.channels, dtype=torch.float64)
        moments = torch.zeros(self.channels, self.channels, dtype=torch.float64)
        n = 0
        generator = torch.Generator().manual_seed(self.seed)
        # A uniform sample of at most max_codes codes: each code gets a random key and the
        # smallest keys so far are kept (reservoir sampling by keys).
        keys = torch.empty(0)
        sample = torch.empty(0, self.channels)
        for codes in batches:
            vectors = _vectors(codes, self.channels).detach().float().cpu()  # (m, C)
            if not torch.isfinite(vectors).all():
                raise ValueError(
                    "the encoder produced NaN/inf latent codes for normal tiles; the model "
                    "diverged or the tiles hold NaN/inf: retrain or check the tiles"
                )
            wide = vectors.double()
            total += wide.sum(dim=0)
            moments += wide.T @ wide
            n += len(vectors)
            keys = torch.cat([keys, torch.rand(len(vectors), generator=generator)])
            sample = torch.cat([sample, vectors])
            if len(keys) > self.max_codes:
                keys, kept = keys.topk(self.max_codes, largest=False)
                sample = sample[kept]
        if n < 2:
            raise ValueError(f"a latent density needs at least 2 code vectors, got {n}")
        mean = total / n  # (C,)
        covariance = moments / n - torch.outer(mean, mean)  # (C, C), biased as OAS expects
        covariance = (covariance + covariance.T) / 2  # rounding can leave it slightly skewed
        shrinkage = oas_shrinkage(covariance, n)
        target = float(torch.trace(covariance)) / self.channels
        eye = torch.eye(self.channels, dtype=torch.float64)
        shrunk = (1 - shrinkage) * covariance + shrinkage * target * eye
        # A floor for the all-dead case (every code dimension constant: trace 0).
        shrunk += max(target, 1.0) * 1e-9 * eye
        # precision = L L^T, so ||(x - y) L|| is the Mahalanobis distance between x and y.
        whitener = torch.linalg.cholesky(torch.linalg.inv(shrunk)).float().contiguous()  # (C, C)
        whitened = (sample - mean.float()) @ whitener  # (M, C)
        device = self.mean.device
        picked = k_center_greedy(
            whitened.to(device), self.coreset_size, seed=self.seed
        ).cpu()  # (K,)
        self.mean = mean.float().to(device)
        self.whitener = whitener.to(device)
        self.bank = whitened[picked].contiguous().to(device)
        self.count = torch.tensor(n, device=device)
        self.shrinkage = torch.tensor(shrinkage, dtype=torch.float32, device=device)

    def distance(self, codes: torch.Tensor) -> torch.Tensor:
        """Whitened distance to the nearest normal code.

        (b, C) dense codes -> (b,); (b, C, h, w) spatial codes -> (b, 1, h, w), one per cell.
        """
        if not self.fitted:
            raise RuntimeError(
                "the latent density is not fitted: fit the detector (or load a model trained "
                "since latent scores exist), or use score='residual'"
            )
        guard = (
            torch.autocast(device_type="cuda", enabled=False)
            if codes.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with guard:  # float32: bf16 would swamp the small distances between normal codes
            whitened = (_vectors(codes, self.channels).float() - self.mean) @ self.whitener
            distance = nearest_distances(whitened, self.bank)  # (m,)
        if codes.ndim == 2:
            return distance
        b, _, h, w = codes.shape
        return distance.view(b, h, w).unsqueeze(1)  # (b, 1, h, w)

    def calibrate(self, residual: torch.Tensor, latent: torch.Tensor) -> None:
        """Record centre and scale of both tile scores (B,) on normal validation tiles.

        Robust statistics (median, interquartile range / 1.349, the standard deviation of a
        normal sample): normal validation tiles include folds, fat and tissue edges, and a few
        such tiles should not decide how much each score counts.
        """
        for name, scores in (("residual_stats", residual), ("latent_stats", latent)):
            scores = scores.double().reshape(-1)
            if not torch.isfinite(scores).all():
                raise ValueError(f"non-finite {name.split('_')[0]} scores on the validation tiles")
            centre = float(scores.median())
            q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype))
            scale = float(q3 - q1) / 1.349
            if scale <= 1e-12 and len(scores) > 1:  # most tiles tie: fall back to the std
                scale = float(scores.std())
            if scale <= 1e-12:  # one tile, or all equal: the centre's magnitude
                scale = max(abs(centre), 1e-12)
            setattr(self, name, torch.tensor([centre, scale], device=self.mean.device))

    def standardise(self, scores: torch.Tensor, which: str) -> torch.Tensor:
        """(scores - centre) / scale with the validation statistics of "residual" or "latent"."""
        centre, scale = getattr(self, f"{which}_stats").to(scores.device).unbind()
        return (scores.float() - centre) / scale


class LatentScoredDetector(TrainedDetector):
    """A family whose encoder gives a latent code: residual, latent-density or combined scores.

    Subclasses implement `_residual_batch` (their reconstruction map and tile score) and
    `_codes` (the encoder's code for a batch), and build `self.density` with `init_density` in
    `__init__`; `after_fit` fits the density once the weights are trained (a family with its
    own `fit` ends it with `return self.fit_density(train, val, report)`). It is fitted
    whatever `score` says, so one trained model can be rescored in every mode; its tensors
    are saved beside the model's under `latent_density.`.
    """

    density: LatentDensity

    def init_density(self, channels: int) -> None:
        """Build the (unfitted) density for codes with `channels` channels or dimensions."""
        self.density = LatentDensity(channels, seed=self.config.seed).to(self.device)

    @abstractmethod
    def _residual_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 3, H, W) -> the family's reconstruction map (b, 1, H, W) and tile score (b,)."""

    @abstractmethod
    def _codes(self, batch: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> latent codes, (b, C) dense or (b, C, h, w) spatial, float32."""

    def _latent_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance map (b, 1, H, W) and tile score (b,).

        A spatial code's cells are upsampled to the tile and smoothed like the residual map; the
        tile score is the mean of the map's top `latent_top_fraction` (the whole map by
        default). A dense code's one distance is broadcast, and is the tile score.
        """
        distance = self.density.distance(self._codes(batch))
        size = batch.shape[-2:]
        if distance.ndim == 1:  # dense: one code per tile
            return distance[:, None, None, None].expand(-1, 1, *size).contiguous(), distance
        cfg = self.config
        return map_and_score(
            upsample_map(distance, size), cfg.map_smoothing_sigma, cfg.latent_top_fraction
        )  # (b, 1, H, W), (b,)

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self.config.score
        if mode == "residual":
            return self._residual_batch(batch)
        latent_map, latent_score = self._latent_batch(batch)
        if mode == "latent":
            return latent_map, latent_score
        residual_map, residual_score = self._residual_batch(batch)
        # The same affine map for a tile's map and its score, so heatmap and tile score stay
        # in one unit: standard deviations above normal validation tiles.
        density = self.density
        anomaly_map = density.standardise(residual_map, "residual") + density.standardise(
            latent_map, "latent"
        )
        tile_score = density.standardise(residual_score, "residual") + density.standardise(
            latent_score, "latent"
        )
        return anomaly_map, tile_score

    def after_fit(self, train: np.ndarray, val: np.ndarray, report: FitReport) -> FitReport:
        return self.fit_density(train, val, report)

    def fit_density(self, train: np.ndarray, val: np.ndarray, report: FitReport) -> FitReport:
        """Fit the density on the codes of `train` and the score standardisation on `val`
        (both normal tiles); returns `report` with the seconds this took added."""
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.density.fit(self._codes(batch) for batch in self._batches(train))
                residual, latent = [], []
                for batch in self._batches(val):
                    residual.append(self._residual_batch(batch)[1].float())
                    latent.append(self._latent_batch(batch)[1].float())
                self.density.calibrate(torch.cat(residual), torch.cat(latent))
        finally:
            self.model.train(was_training)
        report.seconds += time.perf_counter() - started
        return report

    def _batches(self, tiles: np.ndarray) -> Iterator[torch.Tensor]:
        size = self.config.batch_size
        for start in range(0, len(tiles), size):
            yield to_tensor(tiles[start : start + size], self.device)  # (b, 3, H, W)

    def state_dict(self) -> dict[str, torch.Tensor]:
        density = {DENSITY_PREFIX + k: v for k, v in self.density.state_dict().items()}
        return {**self.model.state_dict(), **density}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load model and density; a model saved before latent scores existed has no density,
        which only the residual score can do without."""
        model_state = {k: v for k, v in state.items() if not k.startswith(DENSITY_PREFIX)}
        density_state = {
            k[len(DENSITY_PREFIX) :]: v for k, v in state.items() if k.startswith(DENSITY_PREFIX)
        }
        super().load_state_dict(model_state)
        if density_state:
            # The bank's size is only known from the file: size the buffer before loading.
            self.density.bank = torch.empty_like(density_state["bank"]).to(self.device)
            self.density.load_state_dict(density_state)
            self.density.to(self.device)
        elif self.config.score != "residual":
            raise ValueError(
                f"these {self.family} weights hold no latent density (saved before latent "
                f"scores existed), so score={self.config.score!r} cannot be used: refit the "
                "model, or load it with score='residual'"
            )


def _vectors(codes: torch.Tensor, channels: int) -> torch.Tensor:
    """(b, C) or (b, C, h, w) codes -> (m, C) vectors, one per tile or per latent cell."""
    if codes.ndim == 4:
        codes = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])  # (b * h * w, C)
    if codes.ndim != 2 or codes.shape[1] != channels:
        raise ValueError(
            f"expected latent codes (b, {channels}) or (b, {channels}, h, w), got "
            f"{tuple(codes.shape)}"
        )
    return codes


__all__ = [
    "DENSITY_PREFIX",
    "SCORE_OPTIONS",
    "LatentDensity",
    "LatentScoredConfig",
    "LatentScoredDetector",
    "check_score_option",
    "oas_shrinkage",
]
