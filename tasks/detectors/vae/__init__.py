"""vae: dense-bottleneck variational autoencoder; residual or reconstruction-probability map."""

from vadflow.tasks.detectors.vae.detector import (
    KLWarmupTrainer,
    VAEConfig,
    VAEConfigBase,
    VAEDetector,
)
from vadflow.tasks.detectors.vae.loss import ELBOLoss, gaussian_nll, kl_to_standard_normal
from vadflow.tasks.detectors.vae.torch_model import DenseVAE, GaussianVAE

__all__ = [
    "DenseVAE",
    "ELBOLoss",
    "GaussianVAE",
    "KLWarmupTrainer",
    "VAEConfig",
    "VAEConfigBase",
    "VAEDetector",
    "gaussian_nll",
    "kl_to_standard_normal",
]
