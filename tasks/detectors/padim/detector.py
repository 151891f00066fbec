"""padim: a Gaussian of normal patch features, Mahalanobis distance as the anomaly map.

Fit: get the patch features ready and standardise them (backbones.py, as for patch_knn: the
fixed texture filter bank by default, or a CNN or pretrained network), keep a seeded random
subset of `n_features` feature channels, average each patch's features over a `window` x
`window` neighbourhood of patches, and fit a Gaussian to the normal training tiles' patches.
Score: Mahalanobis distance of each (window-averaged) patch to the Gaussian, upsampled to the
tile and lightly smoothed; the tile score is the map's mean (`score_top_fraction` 1.0).

Two layouts (`gaussian`):
- "shared" (the default): one Gaussian for every position. Tissue and surface textures are
  stationary, so every position's patches are samples of the same distribution, and the
  Gaussian is fitted on P times as many patches as a per-position one;
- "position": PaDiM's (Defard et al. 2020) one Gaussian per position of the feature grid, for
  aligned objects. Each position's covariance is shrunk towards the covariance pooled over all
  positions (`shrinkage`).
A small ridge (`ridge`, relative to the mean variance) keeps the covariance invertible.

Why these defaults, measured on the medium hard synthetic pathology site (seed 0, filter-bank
features, tile AUROC): PaDiM as published here (per position, no window, ridge 0.01, tile
score the map's maximum) 0.870; ridge 1e-4 0.938 (the larger ridge drowned the low-variance
directions in which lesions differ); one shared Gaussian 0.924 -> 0.971 with a 4 x 4 window
(a lesion is a region's make-up: denser, larger nuclei and no stroma, which one 4 px patch
cannot show); 0.974 with whole windows only (`window_average`); 0.981 with 8 x 8 and 0.985
with 12 x 12 (seeds 0-4 at 12 x 12: 0.985 / 0.979 / 0.985 / 0.979 / 0.970, against 0.974 /
0.966 / 0.978 / 0.966 / 0.952 at 4 x 4; the whole 16 x 16 tile: 0.982 and 0.973 at seeds 1
and 4). The larger window also localised better there (pixel AUROC 0.961 against 0.945,
FROC 0.65 against 0.61 at 4 x 4): at 64 px tiles a 12 x 12 window is 48 px. A window is
capped at the tile's patch grid, so on 32 px industrial tiles it is the whole tile; give
`window` a smaller value where maps must localise within a tile.

Robust mode (`robust`, for training tiles that may hold anomalies): a trimmed Gaussian. The
training patches (at each position, in the "position" layout) that lie far from the other
training slides' patches, as outliers of that distance and at most the `contamination`
fraction, are left out and the mean and covariance are fitted on the rest
(`held_out_distances`, `held_out_outliers`: a lesion on an unlabelled tumour slide is on that
slide alone, however densely its patches cluster). When `fit` is not told the tiles' slides,
or they are all from one, the `contamination` fraction left out is the one farthest from the
first fit's Gaussian, one concentration step of the minimum covariance determinant estimator
(Rousseeuw 1999), which a lesion cluster large enough to pull the Gaussian towards itself
escapes. Measured with one of four training slides an unlabelled tumour slide (medium hard
site, `--contamination 0.1 --robust`): see the README's contamination table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vadflow.tasks.detectors.base import EpochCallback, FitReport, check_tile_size
from vadflow.tasks.detectors.components.backbones import (
    PatchFeatureDetector,
    PatchScoreConfig,
    new_features,
)
from vadflow.tasks.detectors.components.memory_bank import (
    held_out_distances,
    held_out_outliers,
)
from vadflow.tasks.detectors.padim.torch_model import PadimModel
from vadflow.tasks.detectors.registry import register

GAUSSIANS = ("position", "shared")


@dataclass(frozen=True)
class PadimConfig(PatchScoreConfig):
    """Hyperparameters of padim (backbone, pretext and map fields from PatchScoreConfig)."""

    tile_size: int = 64  # tiles of another size are refused
    n_features: int = 64  # random subset of the feature channels (all when there are fewer)
    gaussian: str = "shared"  # "shared": one Gaussian for every position; "position": PaDiM's
    window: int = 12  # patch features averaged over window x window patches (the tile's grid
    # at most) before the Gaussian
    shrinkage: float = 0.5  # "position": weight of the pooled covariance in each position's
    ridge: float = 1e-4  # added to the diagonal, relative to the mean variance
    score_top_fraction: float = 1.0  # tile score = mean of this top fraction of the map; 0 = max

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gaussian not in GAUSSIANS:
            raise ValueError(f"gaussian must be one of {GAUSSIANS}, got {self.gaussian!r}")
        if self.tile_size < 8 or self.tile_size % 4:
            raise ValueError(f"tile_size must be a multiple of 4 and >= 8, got {self.tile_size}")
        if self.n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")


@register("padim")
class PadimDetector(PatchFeatureDetector):
    """A Gaussian (shared, or one per patch position) of window-averaged patch features over
    random feature channels; Mahalanobis anomaly map."""

    config_cls = PadimConfig
    fields_before = {"gaussian": "position", "window": 1}  # PaDiM's layout, as saved then
    config: PadimConfig
    model: PadimModel

    def __init__(self, config: PadimConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        grid = math.ceil(cfg.tile_size / 4)  # patch features are on a 1/4 grid
        self.model = PadimModel(
            new_features(cfg),
            grid,
            cfg.n_features,
            shared=cfg.gaussian == "shared",
            window=cfg.window,
        )
        self.model.to(self.device)

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        slides: np.ndarray | None = None,
    ) -> FitReport:
        """Pretext-train (or load) the backbone, then fit the Gaussian(s)."""
        check_tile_size(self.family, self.config.tile_size, train=train, val=val)
        if len(train) < 2:
            raise ValueError(f"padim needs at least 2 training tiles, got {len(train)}")
        return super().fit(train, val, on_epoch=on_epoch, slides=slides)

    def fit_normal_patches(
        self, features: torch.Tensor, train: np.ndarray, slides: torch.Tensor | None
    ) -> float:
        """Fit the shared Gaussian, or one per feature-grid position; returns the mean
        Mahalanobis distance of (up to 256) training tiles' patches to it."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        d = self.model.channels.numel()
        channels = torch.randperm(features.shape[1], generator=generator)[:d].sort().values
        # `features` come window-averaged (`fit_patch_features`).
        x = features[:, channels].flatten(2).permute(2, 0, 1).double()  # (P, N, d)
        if cfg.gaussian == "shared":  # every position's patches are samples of one Gaussian
            x = x.reshape(1, -1, d)  # (1, P * N, d)
        kept = None  # every patch, unless robust mode leaves some out
        if cfg.robust and x.shape[1] >= 2:
            if slides is not None:
                # How far each patch lies from the other training slides' patches; the
                # outliers among them (at most the contamination fraction) are left out.
                row_slides = slides[None, :].expand(features.shape[2] * features.shape[3], -1)
                outlying = held_out_distances(
                    x.reshape(-1, d).float().to(self.device),
                    row_slides.reshape(-1),
                    seed=cfg.seed,
                ).view(x.shape[0], x.shape[1])  # (P, N)
                kept = ~held_out_outliers(outlying, cfg.contamination)
            else:  # one slide (or unknown): the contamination fraction farthest from a first fit
                mean, precision = self._gaussians(x)
                diff = x - mean[:, None]  # (P, N, d)
                outlying = torch.einsum("pnd,pde,pne->pn", diff, precision, diff)  # (P, N)
                keep = max(2, x.shape[1] - int(cfg.contamination * x.shape[1]))
                kept = torch.zeros_like(outlying, dtype=torch.bool)
                kept.scatter_(1, outlying.topk(keep, dim=1, largest=False).indices, True)
        mean, precision = self._gaussians(x, kept)
        self.model.channels.copy_(channels)
        self.model.mean.copy_(mean.float())
        self.model.precision.copy_(precision.float())
        return float(self.score(train[:256]).anomaly_map.mean())

    def _gaussians(
        self, x: torch.Tensor, kept: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position mean (P, d) and precision (P, d, d) of patches x (P, N, d), or of those
        `kept` (P, N) at each position (at least two), each covariance shrunk towards the
        pooled one and ridged."""
        cfg = self.config
        d = x.shape[2]
        if kept is None:
            count = torch.full((x.shape[0],), float(x.shape[1]), dtype=x.dtype)
            mean = x.mean(dim=1)  # (P, d)
            centred = x - mean[:, None]
        else:
            weight = kept.to(x.dtype)[..., None]  # (P, N, 1)
            count = weight.sum(dim=1)[:, 0].clamp_min(2)  # (P,)
            mean = (weight * x).sum(dim=1) / count[:, None]
            centred = (x - mean[:, None]) * weight  # the rows left out become zeros
        covariance = centred.transpose(1, 2) @ centred / (count - 1)[:, None, None]  # (P, d, d)
        pooled = covariance.mean(dim=0, keepdim=True)  # (1, d, d)
        covariance = (1 - cfg.shrinkage) * covariance + cfg.shrinkage * pooled
        scale = pooled.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-12)
        covariance = covariance + cfg.ridge * scale * torch.eye(d, dtype=covariance.dtype)
        return mean, torch.linalg.inv(covariance)
