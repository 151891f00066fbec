"""The detector interface every family implements.

Flows, the CLI and tests never import a family directly: they call `create_detector("ae_l2")`
or `load_detector(model_dir)` (`registry.py`), so adding a family is one folder plus one
`@register` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"

EpochCallback = Callable[[int, float, float], None]


@dataclass(frozen=True)
class ScoreOutput:
    """What `Detector.score` returns: a per-pixel map and one score per tile, both on the CPU."""

    anomaly_map: torch.Tensor  # (B, 1, H, W) float32, same H, W as the input tiles
    tile_score: torch.Tensor  # (B,) float32


@dataclass
class FitReport:
    """Summary of one training run.

    Epochs are 1-based and, like the loss lists and `seconds`, include the part of the run
    before a resume. `diverged` is only ever True on the report a DivergedError carries.
    """

    epochs: int
    best_epoch: int
    train_loss: list[float]
    val_loss: list[float]
    seconds: float
    device: str
    diverged: bool = False
    stopped_early: bool = False


class DivergedError(RuntimeError):
    """Training produced a NaN/inf loss or gradient.

    The detector keeps its best weights so far; `report` holds the history up to the failure and
    `checkpoint` the last good checkpoint file, if checkpointing was on.
    """

    def __init__(
        self, message: str, *, report: FitReport | None = None, checkpoint: Path | None = None
    ) -> None:
        super().__init__(message)
        self.report = report
        self.checkpoint = checkpoint


def resolve_device(spec: str) -> torch.device:
    """Turn a config's `device` field ("auto", "cpu", "cuda", "cuda:1") into a torch device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={spec!r} was asked for but this torch build sees no CUDA device; "
                "use device='auto' or 'cpu'"
            )
        return torch.device(spec)
    raise ValueError(f"unknown device {spec!r}: use 'auto', 'cpu' or 'cuda[:N]'")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_tensor(
    images: np.ndarray | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Tiles as the pipeline holds them -> float32 (B, 3, H, W) in [0, 1].

    Accepts uint8 (N, H, W, 3) numpy arrays or tensors (the tile cache), float (N, H, W, 3)
    numpy arrays already in [0, 1] (e.g. after stain normalisation), or float (B, 3, H, W)
    tensors, which pass through. uint8 is moved to `device` before the conversion, so a GPU
    copy moves a quarter of the bytes.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected numpy images shaped (N, H, W, 3), got {images.shape}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise TypeError(f"expected uint8 or float images, got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
        channels_last = True
    elif isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected a 4-d image tensor, got shape {tuple(images.shape)}")
        channels_last = images.dtype == torch.uint8
        if not channels_last and images.shape[1] != 3:
            raise ValueError(
                f"expected float tensors shaped (B, 3, H, W), got {tuple(images.shape)}"
            )
        if channels_last and images.shape[-1] != 3:
            raise ValueError(f"expected uint8 tensors shaped (B, H, W, 3), got {images.shape}")
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images).__name__}")

    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and images.device.type == "cpu":
            images = images.pin_memory()
        images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0).contiguous()
    return images.float().contiguous()


ConfigT = TypeVar("ConfigT")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_seeded(seed: int, build: Callable[[], ModuleT]) -> ModuleT:
    """`build()` with torch's RNG seeded to `seed`, the caller's RNG state restored afterwards:
    a family's initial weights depend on its config's seed alone, and building a detector does
    not move anyone else's random numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_config(config_cls: type[ConfigT], family: str, fields: dict[str, Any]) -> ConfigT:
    """Build a family's config, refusing unknown field names with the list of valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls)]  # type: ignore[arg-type]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise TypeError(
            f"{family} has no config field(s) {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(valid)}"
        )
    # JSON turns tuples into lists; frozen configs should stay hashable.
    cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return config_cls(**cleaned)


class Detector(ABC):
    """One anomaly detector family: a frozen config, a torch module, fit/score/save/load.

    Subclasses set `config_cls`, build `self.model` in `__init__`, implement `fit` and
    `_score_batch`; batching, device moves, no_grad and persistence live here.
    """

    family: ClassVar[str]
    config_cls: ClassVar[type]
    # What a family learns from, so callers know which training entry point to use:
    # "none": normal tiles only, `fit(train, val)` (the unsupervised families);
    # "tile": tiles labelled tumour/normal from annotations, `fit_labelled(...)`;
    # "slide": slide labels only, each slide's tiles as one bag, `fit_bags(...)`.
    # Labelled families refuse `fit`, and a site without labels skips them.
    supervision: ClassVar[str] = "none"
    # The tile scores a family can give, [low, high]; the tile-score data contract holds each
    # family to its own (distances and residuals are >= 0, classifier logits are any real).
    score_range: ClassVar[tuple[float, float]] = (0.0, math.inf)
    # Config fields added after a family was first saved, with the value that reproduces what a
    # model saved before them did: `load` fills them in where config.json lacks them, so an old
    # model scores as it did rather than under today's defaults.
    fields_before: ClassVar[dict[str, Any]] = {}
    config: Any
    model: nn.Module

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.config_cls()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{self.family} expects a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.device = resolve_device(getattr(config, "device", "auto"))

    @abstractmethod
    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        on_epoch: EpochCallback | None = None,
        slides: np.ndarray | None = None,
    ) -> FitReport:
        """Train on normal tiles only; `val` (normal too) drives early stopping. `slides`
        (N,), when known, names the slide each training tile comes from: the feature families'
        robust mode then holds each slide out in turn to find lesions on an unlabelled tumour
        slide; the other families do not use it."""

    @abstractmethod
    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 3, H, W) float on `self.device` -> ((b, 1, H, W) map, (b,) score)."""

    def score(
        self, images: np.ndarray | torch.Tensor, *, batch_size: int | None = None
    ) -> ScoreOutput:
        """Anomaly maps and tile scores for a batch of tiles, computed in chunks in eval mode."""
        n = len(images)
        if n == 0:
            raise ValueError(f"{self.family}.score got no images")
        size = batch_size or getattr(self.config, "batch_size", 64)
        maps, scores = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for chunk in _chunks(images, size):
                    batch = to_tensor(chunk, self.device)  # (b, 3, H, W)
                    amap, tscore = self._score_batch(batch)
                    maps.append(amap.float().cpu())
                    scores.append(tscore.float().cpu())
        finally:
            self.model.train(was_training)
        anomaly_map = torch.cat(maps)  # (B, 1, H, W)
        tile_score = torch.cat(scores)  # (B,)
        height, width = batch.shape[-2:]
        if anomaly_map.shape != (n, 1, height, width) or tile_score.shape != (n,):
            raise RuntimeError(
                f"{self.family} returned map {tuple(anomaly_map.shape)} and score "
                f"{tuple(tile_score.shape)} for {n} tiles of {height}x{width}"
            )
        return ScoreOutput(anomaly_map=anomaly_map, tile_score=tile_score)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to score; families with extra fitted tensors register buffers."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
        self.model.to(self.device)

    def save(self, directory: Path) -> Path:
        """Write `config.json` (family + config fields) and `weights.pt` (a state_dict)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"family": self.family, **dataclasses.asdict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save(state, directory / WEIGHTS_FILE)
        return directory

    @classmethod
    def load(cls, directory: Path, *, device: str | None = None) -> Detector:
        """Rebuild a saved detector; `device` overrides the saved config's device field."""
        directory = Path(directory)
        fields = read_config(directory)
        family = fields.pop("family")
        if family != cls.family:
            raise ValueError(
                f"{directory / CONFIG_FILE} holds a {family!r} model, not {cls.family!r}; "
                "use load_detector() to dispatch on the family"
            )
        if device is not None:
            fields["device"] = device
        fields = {**cls.fields_before, **fields}
        detector = cls(make_config(cls.config_cls, family, fields))
        state = load_tensors(directory / WEIGHTS_FILE)
        detector.load_state_dict(state)
        return detector


def _chunks(images: np.ndarray | torch.Tensor, size: int) -> Iterator[np.ndarray | torch.Tensor]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def load_tensors(path: Path, what: str = "weights") -> Any:
    """`torch.load(path)` of tensors only (`weights_only=True`): a file that holds other Python
    objects, which unpickling would run, is refused with a ValueError naming the file, and so
    is a damaged one. Never falls back to a full unpickle."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: refused to load these {what}: the file holds Python objects besides "
            "tensors, and loading it would run code from it. Save a state_dict instead "
            "(torch.save(module.state_dict(), path)), or retrain so vadflow writes it"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: cannot read these {what} ({first}); the file is damaged or not a torch file"
        ) from None


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: is this a saved model folder?")
    fields = json.loads(path.read_text())
    if "family" not in fields:
        raise ValueError(f"{path} has no 'family' key, so the detector family is unknown")
    return fields


def gaussian_smooth(anomaly_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps with reflected borders; sigma <= 0 is a no-op.

    Single-pixel residual noise (texture the model cannot reproduce exactly) averages out,
    while a defect several pixels wide keeps its height.
    """
    if sigma <= 0:
        return anomaly_map
    height, width = anomaly_map.shape[-2:]
    radius = min(math.ceil(3 * sigma), height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, device=anomaly_map.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(anomaly_map.dtype)
    padded = F.pad(anomaly_map, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))  # (B, 1, H + 2r, W)
    return F.conv2d(out, kernel.view(1, 1, -1, 1))  # (B, 1, H, W)


def check_tile_size(family: str, tile_size: int, **arrays: np.ndarray) -> None:
    """Refuse tiles of another size than the config's, naming the array and the setting."""
    for name, tiles in arrays.items():
        if tiles.ndim == 4 and tiles.shape[1:3] != (tile_size, tile_size):
            raise ValueError(
                f"{name} tiles are {tiles.shape[1]}x{tiles.shape[2]} but this {family} is "
                f"configured for tile_size={tile_size}"
            )


def top_fraction_mean(anomaly_map: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the highest `fraction` of each map's pixels, (B, 1, H, W) -> (B,).

    fraction 0 (or anything below one pixel) gives the plain maximum.
    """
    flat = anomaly_map.flatten(1)  # (B, H * W)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    if k == 1:
        return flat.amax(dim=1)
    return flat.topk(k, dim=1).values.mean(dim=1)
