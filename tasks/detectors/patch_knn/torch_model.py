"""The patch_knn module: patch features and a memory bank of normal patch features."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vadflow.tasks.detectors.components.backbones import PatchFeatures, window_average
from vadflow.tasks.detectors.components.memory_bank import nearest_distances


class PatchKNNModel(nn.Module):
    """Patch features + `memory_bank` buffer (K, C); forward gives per-patch nearest-neighbour
    distance.

    The bank is a buffer, so it is part of `state_dict()` and saved with the weights; its size
    is only known after fitting, hence `set_bank`. `window` > 1 averages the patch features
    over window x window patches first; `whiten` adds the `centre` (C,) and `whitening` (C, C)
    buffers, applied to every patch before the distance (the bank is stored whitened).
    """

    memory_bank: torch.Tensor
    centre: torch.Tensor
    whitening: torch.Tensor

    def __init__(
        self, features: PatchFeatures, k: int = 1, *, window: int = 1, whiten: bool = False
    ) -> None:
        super().__init__()
        self.features = features
        self.k = k
        self.window = window
        self.whiten = whiten
        self.register_buffer("memory_bank", torch.zeros(0, features.channels))
        if whiten:  # only then: models saved without whitening load as they were
            self.register_buffer("centre", torch.zeros(features.channels))
            self.register_buffer("whitening", torch.eye(features.channels))

    def whitened(self, rows: torch.Tensor) -> torch.Tensor:
        """Patch rows (M, C) in the whitened space the bank lives in (unchanged without it)."""
        if not self.whiten:
            return rows
        return (rows - self.centre) @ self.whitening.T

    def set_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank = bank.detach().float().to(self.memory_bank.device).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1, h, w) patch distances, h = ceil(H / 4)."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("patch_knn has an empty memory bank: fit the detector first")
        features = window_average(self.features(x).float(), self.window)  # (B, C, h, w)
        b, c, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        # Distances in float32 even under CUDA autocast: bf16 would swamp small distances.
        guard = (
            torch.autocast(device_type="cuda", enabled=False)
            if x.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with guard:
            distances = nearest_distances(self.whitened(flat), self.memory_bank, self.k)
        return distances.view(b, 1, h, w)
