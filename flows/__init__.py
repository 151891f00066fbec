"""Prefect flows and the `vadflow` command line."""

import os

# Idle OpenMP threads sleep instead of spinning. Flows run several tasks (and Prefect, MLflow,
# libvips) side by side; with spinning threads torch slowed ~10x on a shared 2-core machine
# (ae_l2 fit 128 s -> 9 s). Set OMP_WAIT_POLICY yourself to override; it must be set before
# torch loads, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
