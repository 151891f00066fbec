"""A small patch classifier: RGB tile -> one tumour logit. A pure nn.Module, shared with mil."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("none", "group")
LEAK = 0.1  # negative slope of the leaky ReLUs


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, dividing `channels`."""
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


def _conv(c_in: int, c_out: int, stride: int, norm: str) -> nn.Sequential:
    if norm == "none":
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
            nn.LeakyReLU(LEAK, inplace=True),
        )
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.LeakyReLU(LEAK, inplace=True),
    )


class PatchClassifier(nn.Module):
    """`stages` conv stages, each halving the tile, then mean + max pooling and a linear head.

    Max pooling next to the mean lets a lesion that fills only a corner of the tile still
    decide its logit. Any tile size of at least 2^stages px works (the pooling is global).

    `norm`: "none" (default) or "group". Never BatchNorm, so a tile's probability does not
    depend on the other tiles in its batch. GroupNorm takes out each tile's own mean activation,
    and with it much of how dark or dense the tile is, which is half of what tells a lesion: on
    the synthetic site of tests/test_baselines.py (measured with plain ReLUs) mil with GroupNorm
    found the lesions after 8-12 epochs or not within 12 (1 seed of 4), without a norm after
    3-9 (8 seeds of 8). A net this shallow trains well without one, given He init.
    """

    def __init__(
        self,
        base_channels: int = 16,
        stages: int = 4,
        dropout: float = 0.2,
        norm: str = "none",
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if stages < 1 or base_channels < 1:
            raise ValueError(
                f"stages and base_channels must be >= 1, got {stages}, {base_channels}"
            )
        widths = [min(base_channels * 2**i, max_channels) for i in range(stages)]
        layers: list[nn.Module] = []
        c_in = 3
        for width in widths:
            # Downsample first: the full-resolution tile costs only one cheap 3-channel conv.
            layers += [_conv(c_in, width, 2, norm), _conv(width, width, 1, norm)]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = 2 * widths[-1]
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, 1))
        # He init for the leaky ReLUs. PyTorch's default shrinks activations about threefold per
        # conv; without a norm to undo that, six convs leave every tile with almost the same
        # logit (a p range of 0.0005 over a whole site), and mil can stall at p = 0.5.
        for module in self.body.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=LEAK, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> pooled features (B, 2 * C)."""
        x = (x - 0.5) / 0.25  # roughly zero-mean, unit-scale input
        fmap = self.body(x)  # (B, C, H / 2^stages, W / 2^stages)
        return torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)  # (B, 2C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> tumour logits (B,)."""
        return self.head(self.features(x)).squeeze(1)  # (B, 1) -> (B,)
