"""ae_ssim: the ae_l2 autoencoder trained with SSIM loss; 1 - local SSIM as the anomaly map."""

from vadflow.tasks.detectors.ae_ssim.detector import AESSIMConfig, AESSIMDetector, SSIMLoss
from vadflow.tasks.detectors.ae_ssim.ssim import local_ssim, ssim_dissimilarity

__all__ = ["AESSIMConfig", "AESSIMDetector", "SSIMLoss", "local_ssim", "ssim_dissimilarity"]
