"""Parts the detector families share; none of them is a family.

`training.py` (the training loop, `TrainingConfig` and `TrainSettings`), `augment.py` (training
batch augmentation), `backbones.py` (patch features of patch_knn and padim), `gan_parts.py`
(DCGAN networks, latent search, the GAN trainer), `latent_density.py` (latent-code scores) and
`memory_bank.py` (k-center coreset and nearest-neighbour distances). Importing this package
imports none of them.
"""
