"""The train stage: which tiles each family learns from, the stain reference, and the fit.

- `sampling.py`: `training_tiles`, `labelled_training_tiles`, `training_bags`
- `stain.py`: the stain reference fitted on normal tiles and saved with the model
- `train.py`: `train_family` (supervision dispatch, settings, fit, save, fit report)
"""
