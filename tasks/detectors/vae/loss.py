"""The VAE objective (negative ELBO) and the reconstruction log-likelihood used for scoring."""

from __future__ import annotations

import torch
from torch import nn


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-element negative log-likelihood of x under N(mean, sigma^2), up to a constant.

    The constant (log sigma + log(2 pi) / 2) is left out so the loss stays >= 0: the trainer's
    relative early-stopping test (val < best * (1 - min_delta)) assumes positive losses, and a
    constant changes neither gradients nor the ranking of tiles.
    """
    return 0.5 * ((x.float() - mean.float()) / sigma) ** 2


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent element, same shape as mu."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar)


class ELBOLoss:
    """Per-tile negative ELBO (b,), divided by the tile's number of values (3 H W).

    Reconstruction: Gaussian decoder with a fixed `recon_sigma` (the pixel noise the model may
    leave unexplained; smaller weighs reconstruction over the KL term). KL weight: `beta`
    (beta-VAE), scaled by `kl_scale` during training, which the trainer ramps from 0 to 1 over
    the KL warm-up so the decoder learns to use the latent before the KL term can collapse the
    posterior onto the prior. In eval mode (validation) the full `beta` always applies, so
    early stopping compares epochs on one objective rather than on a moving one.
    Dividing by the number of values keeps losses comparable across tile sizes; it rescales
    the whole ELBO, so the balance between its two terms is unchanged.
    """

    def __init__(self, *, beta: float, recon_sigma: float) -> None:
        self.beta = beta
        self.recon_sigma = recon_sigma
        self.kl_scale = 1.0

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = model(batch)  # (b, 3, H, W), (b, *latent), (b, *latent)
        nll = gaussian_nll(batch, recon, self.recon_sigma).flatten(1).sum(dim=1)  # (b,)
        kl = kl_to_standard_normal(mu, logvar).flatten(1).sum(dim=1)  # (b,)
        weight = self.beta * (self.kl_scale if model.training else 1.0)
        return (nll + weight * kl) / batch[0].numel()  # (b,)
