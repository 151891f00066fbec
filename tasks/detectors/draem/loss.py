"""DRAEM's training loss: focal loss on the synthetic-anomaly mask, plus the reconstruction
error of the normal tile from its corrupted copy. Per tile, as the shared trainer wants."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vadflow.tasks.detectors.draem.synthetic import AnomalySynthesis, synthesise


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017) per pixel, averaged per tile: (B, 1, H, W) -> (B,).

    (1 - p_t)^gamma shrinks the loss of the many easy normal pixels, so the few anomalous
    ones are not drowned out; gamma 0 is plain binary cross-entropy.
    """
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)  # the probability given to the right class
    return ((1.0 - p_true) ** gamma * bce).flatten(1).mean(dim=1)


class DraemLoss:
    """(module, clean batch) -> per-tile loss (b,): corrupt the batch, reconstruct, segment.

    Training batches draw their anomalies from `train_generator` (the trainer's data generator,
    which its checkpoints save, so a resumed run draws on exactly). Validation batches (module
    in eval mode) draw from `val_generator`, which the trainer reseeds before each validation
    pass, so every epoch's validation loss is measured on the same anomalies.
    """

    def __init__(
        self,
        synthesis: AnomalySynthesis,
        *,
        gamma: float,
        recon_weight: float,
        train_generator: torch.Generator,
        val_generator: torch.Generator,
    ) -> None:
        self.synthesis = synthesis
        self.gamma = gamma
        self.recon_weight = recon_weight
        self.train_generator = train_generator
        self.val_generator = val_generator

    def __call__(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        generator = self.train_generator if module.training else self.val_generator
        corrupted, mask = synthesise(batch, self.synthesis, generator)  # (b,3,H,W), (b,1,H,W)
        recon, logits = module(corrupted)
        loss = focal_loss(logits, mask, self.gamma)  # (b,)
        if recon is not None and self.recon_weight > 0:
            squared = (recon.float() - batch.float()) ** 2  # (b, 3, H, W)
            loss = loss + self.recon_weight * squared.flatten(1).mean(dim=1)
        return loss
