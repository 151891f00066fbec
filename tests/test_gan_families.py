"""The GAN families (anogan, fanogan, vaegan) and their shared parts, on generated tiles."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from vadflow.tasks.detectors.base import DivergedError
from vadflow.tasks.detectors.components.gan_parts import (
    CollapseGuard,
    GeneratorCollapse,
    gradient_penalty,
    latent_search,
)
from vadflow.tasks.detectors.components.training import NonFiniteStep
from vadflow.tasks.detectors.registry import create_detector

SIZE = 32
STROMA = np.array([0.92, 0.74, 0.82])
NUCLEUS = np.array([0.45, 0.27, 0.60])
CLUMP = np.array([0.26, 0.10, 0.38])
STREAK = np.array([0.50, 0.36, 0.40])
FOREIGN = np.array([0.80, 0.80, 0.62])
DEFECTS = ("clump", "streak", "foreign")


def _blobs(rng: np.random.Generator, n: int, count: int, radius: tuple[float, float], centres):
    """(n, SIZE, SIZE) coverage in [0, 1] of `count` anti-aliased discs per tile."""
    cy, cx = centres  # each (n, count)
    r = rng.uniform(*radius, (n, count))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dist = np.hypot(yy - cy[..., None, None], xx - cx[..., None, None])  # (n, count, S, S)
    return np.clip(r[..., None, None] + 0.5 - dist, 0.0, 1.0).max(axis=1)


def make_tiles(
    rng: np.random.Generator, n: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """H&E-like 32 px tiles: stroma with stain jitter, ~10 scattered nuclei, sensor noise.

    Defects are a few pixels across, as in a real tile: 'clump' a cluster of dark nuclei,
    'streak' a thin dark line, 'foreign' a 9 px square of yellowish striped texture.
    Returns uint8 tiles (n, 32, 32, 3) and the defect masks (n, 32, 32).
    """
    img = np.broadcast_to(STROMA + rng.normal(0, 0.02, (n, 1, 1, 3)), (n, SIZE, SIZE, 3)).copy()
    cover = _blobs(rng, n, 10, (1.2, 2.2), rng.uniform(0, SIZE, (2, n, 10)))[..., None]
    img = img * (1 - cover) + NUCLEUS * cover
    mask = np.zeros((n, SIZE, SIZE), bool)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if defect == "clump":
        centre = rng.uniform(8, SIZE - 8, (2, n, 1)) + rng.normal(0, 2.0, (2, n, 7))
        cover = _blobs(rng, n, 7, (1.6, 2.6), centre)[..., None]
        img = img * (1 - cover) + CLUMP * cover
        mask = cover[..., 0] > 0.5
    elif defect == "streak":
        angle = rng.uniform(0, np.pi, (n, 1, 1))
        shift = rng.uniform(-SIZE / 4, SIZE / 4, (n, 1, 1))
        u, v = xx - SIZE / 2, yy - SIZE / 2
        across = u * np.sin(angle) - v * np.cos(angle) - shift
        along = u * np.cos(angle) + v * np.sin(angle)
        cover = (np.clip(1.5 - np.abs(across), 0, 1) * (np.abs(along) < 9))[..., None]
        img = img * (1 - cover) + STREAK * cover
        mask = cover[..., 0] > 0.5
    elif defect == "foreign":
        side = 9
        stripes = 0.8 + 0.2 * np.sin(xx[:side, :side] * 1.6)[..., None]  # (side, side, 1)
        for tile, tile_mask, (y0, x0) in zip(
            img, mask, rng.integers(0, SIZE - side, (n, 2)), strict=True
        ):
            tile[y0 : y0 + side, x0 : x0 + side] = FOREIGN * stripes
            tile_mask[y0 : y0 + side, x0 : x0 + side] = True
    elif defect is not None:
        raise ValueError(f"unknown defect {defect!r}; use one of {DEFECTS}")
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's many small ops on one thread, then restore the setting.

    On a 2-core machine shared with other jobs, torch's default two OpenMP threads spin-wait for
    each other at every op: a latent-search step measured 150-450 ms on two threads and 8 ms on
    one (with OMP_WAIT_POLICY=PASSIVE, 5 ms on two). One thread keeps these timings honest.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tile_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    normal = make_tiles(rng, 60)[0]
    anomalous = np.concatenate([make_tiles(rng, 20, kind)[0] for kind in DEFECTS])
    return {
        "train": make_tiles(rng, 512)[0],
        "val": make_tiles(rng, 64)[0],
        "test": np.concatenate([normal, anomalous]),
        "labels": np.r_[np.zeros(len(normal)), np.ones(len(anomalous))],
    }


def _aurocs(labels: np.ndarray, scores: np.ndarray) -> tuple[float, dict[str, float]]:
    """Tile AUROC over all defects, and per defect kind (each against all normal tiles)."""
    normal = scores[labels == 0]
    per_kind = {}
    for i, kind in enumerate(DEFECTS):
        kind_scores = scores[labels == 1][20 * i : 20 * (i + 1)]
        kind_labels = np.r_[np.zeros(len(normal)), np.ones(len(kind_scores))]
        per_kind[kind] = roc_auc_score(kind_labels, np.r_[normal, kind_scores])
    return roc_auc_score(labels, scores), per_kind


# Small nets, 32 px tiles, batches of 32: enough steps for a GAN on this texture in well under a
# minute of 2 CPU cores. Validation (a latent search per epoch) is shortened to save time.
SMALL = {"tile_size": SIZE, "base_channels": 16, "batch_size": 32, "device": "cpu"}
QUICK_VAL = {"val_tiles": 32, "val_search_steps": 10}
TRAINING = {
    "anogan": {"epochs": 10, "lr": 5e-4, "latent_steps": 50, **QUICK_VAL},
    # n_critic = 1 instead of WGAN-GP's 5: the critic keeps up on this simple texture, and the
    # generator gets five times the updates in the same time.
    "fanogan": {"epochs": 8, "encoder_epochs": 8, "lr": 1e-3, "n_critic": 1, **QUICK_VAL},
    "vaegan": {"epochs": 12},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TRAINING))
def test_gan_family_ranks_planted_anomalies_above_normal_tiles(
    family: str, tile_sets: dict[str, np.ndarray]
):
    detector = create_detector(family, **SMALL, **TRAINING[family])
    untrained = detector.score(tile_sets["test"]).tile_score.numpy()
    started = time.perf_counter()
    report = detector.fit(tile_sets["train"], tile_sets["val"])
    fitted = time.perf_counter()
    scores = detector.score(tile_sets["test"]).tile_score.numpy()
    scored = time.perf_counter()

    auroc, per_kind = _aurocs(tile_sets["labels"], scores)
    before, _ = _aurocs(tile_sets["labels"], untrained)
    kinds = ", ".join(f"{kind} {value:.3f}" for kind, value in per_kind.items())
    print(
        f"{family}: tile AUROC {auroc:.3f} ({kinds}; untrained {before:.3f}); "
        f"{report.epochs} epochs, fit {fitted - started:.1f}s, "
        f"score {len(scores)} tiles {scored - fitted:.2f}s"
    )
    assert not report.diverged
    assert auroc >= 0.8
    assert before < auroc - 0.2  # the training, not the architecture, separates them


def test_fanogan_scores_far_faster_than_anogan_latent_search():
    """One encoder pass against n_steps optimisation steps: the reason f-AnoGAN exists."""
    tiles = make_tiles(np.random.default_rng(3), 32)[0]
    fanogan = create_detector("fanogan", **SMALL)
    anogan = create_detector("anogan", **SMALL, latent_steps=100)
    fanogan.score(tiles[:4])  # warm up the kernels before timing
    anogan_seconds = _seconds(lambda: anogan.score(tiles, batch_size=32))
    # The best of several runs: a loaded machine can only make a short run look slower.
    fanogan_seconds = min(_seconds(lambda: fanogan.score(tiles, batch_size=32)) for _ in range(5))
    ratio = anogan_seconds / fanogan_seconds
    print(
        f"scoring 32 tiles: anogan {anogan_seconds:.3f}s, "
        f"fanogan {fanogan_seconds:.4f}s, ratio {ratio:.0f}x"
    )
    assert ratio >= 10


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


# -- guards ---------------------------------------------------------------------------------


def _constant_output(generator: nn.Module):
    """A generator forward that ignores z: every sample is the same flat colour, yet it still
    depends on the weights, so the generator step can backpropagate."""

    def forward(z: torch.Tensor) -> torch.Tensor:
        colour = torch.sigmoid(generator.to_rgb.bias).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        return colour.expand(len(z), 3, generator.tile_size, generator.tile_size)

    return forward


def test_collapsed_generator_raises_diverged_error_and_keeps_the_good_state(tmp_path: Path):
    tiles = make_tiles(np.random.default_rng(4), 96)[0]
    detector = create_detector(
        "anogan", **{**SMALL, "batch_size": 8}, epochs=3, collapse_patience=4, val_search_steps=2
    )
    generator = detector.model.generator
    kept: dict[str, torch.Tensor] = {}

    def collapse_after_epoch_1(epoch: int, train_loss: float, val_loss: float) -> None:
        if epoch == 1:
            kept.update({k: v.clone() for k, v in detector.model.state_dict().items()})
            generator.forward = _constant_output(generator)

    with pytest.raises(DivergedError, match="epoch 2.*collapse") as info:
        detector.fit(
            tiles[:64], tiles[64:], on_epoch=collapse_after_epoch_1, checkpoint_dir=tmp_path
        )
    error = info.value
    assert error.report is not None and error.report.diverged and error.report.epochs == 1
    assert error.checkpoint == tmp_path / "last.pt" and error.checkpoint.is_file()
    # Epoch 1 was the only, hence best, epoch: its weights are back, not the collapsed ones.
    for key, value in detector.model.state_dict().items():
        torch.testing.assert_close(value, kept[key])


def test_collapse_guard_counts_consecutive_low_variance_batches():
    real = torch.rand(8, 3, 8, 8)
    flat = torch.full((8, 3, 8, 8), 0.5)
    guard = CollapseGuard(min_ratio=0.05, patience=3)
    assert guard.check(flat, real) == 0.0
    assert guard.check(flat, real) == 0.0
    assert guard.check(real.flip(0), real) == pytest.approx(1.0)  # a varied batch resets it
    guard.check(flat, real)
    guard.check(flat, real)
    with pytest.raises(GeneratorCollapse, match="3 consecutive"):
        guard.check(flat, real)
    # Too few samples, or real tiles that do not vary, cannot tell.
    assert CollapseGuard().check(flat[:1], real[:1]) is None
    assert CollapseGuard().check(flat, flat) is None


def test_collapse_guard_stops_at_once_on_nan_samples():
    generated = torch.rand(4, 3, 8, 8)
    generated[1, 0, 2, 2] = math.nan
    with pytest.raises(NonFiniteStep, match="NaN"):
        CollapseGuard(patience=100).check(generated, torch.rand(4, 3, 8, 8))


def test_nan_tiles_stop_gan_training_with_diverged_error():
    tiles = make_tiles(np.random.default_rng(5), 48)[0].astype(np.float32) / 255
    tiles[2, 3, 3, 1] = np.nan
    detector = create_detector("vaegan", **SMALL, epochs=2)
    with pytest.raises(DivergedError, match=r"epoch 1, step 1: .*nan"):
        detector.fit(tiles[:32], tiles[32:])


# -- pieces -----------------------------------------------------------------------------------


class _LinearCritic(nn.Module):
    """D(x) = <w, x>: its gradient is w everywhere, so the penalty is (||w|| - 1)^2."""

    def __init__(self, norm: float) -> None:
        super().__init__()
        weight = torch.randn(3 * 4 * 4)
        self.weight = nn.Parameter(weight / weight.norm() * norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1) @ self.weight, x  # (B,), unused features


@pytest.mark.parametrize(("norm", "penalty"), [(1.0, 0.0), (2.0, 1.0), (0.5, 0.25)])
def test_gradient_penalty_is_squared_distance_of_gradient_norm_from_one(norm, penalty):
    real, fake = torch.rand(6, 3, 4, 4), torch.rand(6, 3, 4, 4)
    value = gradient_penalty(_LinearCritic(norm), real, fake)
    assert value.item() == pytest.approx(penalty, abs=1e-5)
    assert value.requires_grad  # it trains the critic


def test_latent_search_of_a_tile_does_not_depend_on_its_batch_mates():
    detector = create_detector("anogan", **SMALL)
    model = detector.model.eval()
    tiles = torch.rand(3, 3, SIZE, SIZE)
    kwargs = {"steps": 15, "lr": 0.05, "discriminator": model.discriminator, "feature_weight": 0.1}
    with_b = latent_search(model.generator, tiles[[0, 1]], **kwargs)
    with_c = latent_search(model.generator, tiles[[0, 2]], **kwargs)
    torch.testing.assert_close(with_b.loss[0], with_c.loss[0])
    torch.testing.assert_close(with_b.reconstruction[0], with_c.reconstruction[0])
    assert with_b.loss[0] != with_b.loss[1]
    # The objective was minimised: it is lower than at the random start.
    start = latent_search(model.generator, tiles[[0, 1]], **{**kwargs, "steps": 0})
    assert (with_b.loss < start.loss).all()
    assert all(p.grad is None for p in model.parameters())  # only z was differentiated


def test_fanogan_resumes_both_phases_from_checkpoints(tmp_path: Path):
    tiles = make_tiles(np.random.default_rng(6), 48)[0]
    settings = {**SMALL, "epochs": 1, "encoder_epochs": 1, "val_tiles": 8, "val_search_steps": 2}
    first = create_detector("fanogan", **settings)
    report = first.fit(tiles[:32], tiles[32:], checkpoint_dir=tmp_path)
    assert report.epochs == 2 and len(report.train_loss) == len(report.val_loss) == 2
    assert (tmp_path / "gan" / "last.pt").is_file()
    assert (tmp_path / "encoder" / "last.pt").is_file()

    # Both phases were finished, so resuming trains nothing and restores the same model.
    again = create_detector("fanogan", **settings)
    seen: list[int] = []
    resumed = again.fit(
        tiles[:32], tiles[32:], resume_from=tmp_path, on_epoch=lambda e, t, v: seen.append(e)
    )
    assert seen == [] and resumed.train_loss == report.train_loss
    torch.testing.assert_close(again.score(tiles[:4]).tile_score, first.score(tiles[:4]).tile_score)


def test_anogan_resume_continues_as_if_never_stopped(tmp_path: Path):
    """Both optimisers, the data order and the z draws come back from the checkpoint."""
    tiles = make_tiles(np.random.default_rng(7), 48)[0]
    settings = {**SMALL, "batch_size": 16, "val_tiles": 8, "val_search_steps": 2, "patience": 9}
    create_detector("anogan", **settings, epochs=2).fit(
        tiles[:32], tiles[32:], checkpoint_dir=tmp_path
    )
    resumed = create_detector("anogan", **settings, epochs=4).fit(
        tiles[:32], tiles[32:], resume_from=tmp_path
    )
    straight = create_detector("anogan", **settings, epochs=4).fit(tiles[:32], tiles[32:])
    np.testing.assert_allclose(resumed.train_loss, straight.train_loss, rtol=1e-5)
    np.testing.assert_allclose(resumed.val_loss, straight.val_loss, rtol=1e-5)
