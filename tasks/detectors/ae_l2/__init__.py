"""ae_l2: convolutional autoencoder, L2 reconstruction residual as the anomaly map."""

from vadflow.tasks.detectors.ae_l2.detector import AEL2Config, AEL2Detector
from vadflow.tasks.detectors.ae_l2.torch_model import ConvAutoencoder

__all__ = ["AEL2Config", "AEL2Detector", "ConvAutoencoder"]
