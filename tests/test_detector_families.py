"""ae_ssim, vae and spatial_vae, and the shared trainer's contamination-robust mode.

The interface contract (shapes, save/load) runs for these families in test_detectors.py, which
is parametrized over the registry; here: the maths of each family, that each one trained on
generated normal texture ranks planted defects above normal tiles, and that the trimmed loss
protects a model from anomalous tiles mixed into its training set.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score
from torch import nn

from vadflow.tasks.detectors.ae_l2.detector import reconstruction_loss
from vadflow.tasks.detectors.ae_ssim import local_ssim, ssim_dissimilarity
from vadflow.tasks.detectors.ae_ssim.ssim import blur_matrix
from vadflow.tasks.detectors.components.training import NonFiniteStep, Trainer, TrainSettings
from vadflow.tasks.detectors.registry import create_detector
from vadflow.tasks.detectors.spatial_vae import SpatialVAE
from vadflow.tasks.detectors.vae import DenseVAE, ELBOLoss, KLWarmupTrainer, kl_to_standard_normal
from vadflow.tasks.synth.texture import texture_tiles

DEFECTS = ("dense", "scratch", "patch")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Train these tiny models on one thread, then restore the setting.

    They are too small for a second thread to pay, and when other processes keep the cores busy
    (tests run side by side on a 2-core machine) torch's spinning OpenMP workers made the same
    training 5-10x slower on two threads than on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted_test_set(
    rng: np.random.Generator, size: int, n_normal: int = 60, per_kind: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Normal tiles then `per_kind` tiles of each defect kind, and their 0/1 labels."""
    normal, _ = texture_tiles(rng, n_normal, size)
    defective = [texture_tiles(rng, per_kind, size, kind)[0] for kind in DEFECTS]
    tiles = np.concatenate([normal, *defective])
    labels = np.r_[np.zeros(n_normal), np.ones(per_kind * len(DEFECTS))]
    return tiles, labels


def tile_auroc(detector, tiles: np.ndarray, labels: np.ndarray) -> float:
    return float(roc_auc_score(labels, detector.score(tiles).tile_score.numpy()))


# -- ae_ssim: the SSIM maths ---------------------------------------------------------------


def test_local_ssim_matches_scikit_image_away_from_the_border():
    rng = np.random.default_rng(0)
    a = rng.random((40, 40))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    _, reference = structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    ours = local_ssim(torch.tensor(a)[None, None].float(), torch.tensor(b)[None, None].float())
    assert ours.shape == (1, 1, 40, 40)
    # Border pixels differ only by the padding convention (theirs symmetric, ours reflect).
    np.testing.assert_allclose(ours[0, 0, 5:-5, 5:-5].numpy(), reference[5:-5, 5:-5], atol=1e-5)


def test_blur_matrix_keeps_constants_so_flat_tiles_compare_as_identical():
    matrix = blur_matrix(16, 11, 1.5, torch.device("cpu"))
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(16))
    flat = torch.full((2, 3, 16, 16), 0.6)
    torch.testing.assert_close(ssim_dissimilarity(flat, flat), torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize("channels", ["gray", "rgb"])
def test_ssim_dissimilarity_is_zero_on_a_copy_and_high_where_structure_changes(channels: str):
    tiles = torch.from_numpy(texture_tiles(np.random.default_rng(3), 2, 32)[0])
    x = tiles.permute(0, 3, 1, 2).float() / 255  # (2, 3, 32, 32)
    same = ssim_dissimilarity(x, x.clone(), channels=channels)
    assert same.shape == (2, 1, 32, 32)
    assert same.abs().max() < 1e-4
    damaged = x.clone()
    damaged[:, :, 8:16, 8:16] = damaged[:, :, 8:16, 8:16].flip(-1).flip(-2)
    dissimilarity = ssim_dissimilarity(x, damaged, channels=channels)[:, 0]
    assert dissimilarity[:, 8:16, 8:16].mean() > 5 * dissimilarity[:, 24:, 24:].mean()


@pytest.mark.parametrize(
    ("field", "value"), [("ssim_channels", "lab"), ("ssim_window", 10), ("ssim_window", 65)]
)
def test_ae_ssim_refuses_a_bad_ssim_setting(field: str, value):
    with pytest.raises(ValueError, match=field):
        create_detector("ae_ssim", **{field: value})


# -- vae and spatial_vae: the pieces -------------------------------------------------------


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(2, 5)
    torch.testing.assert_close(kl_to_standard_normal(zeros, zeros), zeros)
    assert (kl_to_standard_normal(torch.ones(2, 5), torch.full((2, 5), -1.0)) > 0).all()


@pytest.mark.parametrize(
    ("model", "latent"),
    [
        (DenseVAE(tile_size=32, base_channels=8, latent_dim=12, bottleneck=4), (12,)),
        (SpatialVAE(tile_size=32, base_channels=8, latent_channels=6, bottleneck=8), (6, 8, 8)),
    ],
)
def test_vae_shapes_and_posterior_mean_in_eval(model, latent: tuple[int, ...]):
    x = torch.rand(3, 3, 32, 32)
    assert model.latent_shape == latent
    model.eval()
    recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (3, *latent)
    assert recon.min() >= 0 and recon.max() <= 1
    torch.testing.assert_close(model(x)[0], recon)  # eval: z = mu, no sampling
    torch.testing.assert_close(model.decode(mu), recon)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x)[0], recon)  # training: a posterior sample


def test_elbo_is_per_tile_and_validates_at_the_full_kl_weight():
    model = DenseVAE(tile_size=32, base_channels=8, latent_dim=12, bottleneck=4)
    batch = torch.rand(4, 3, 32, 32)
    loss = ELBOLoss(beta=2.0, recon_sigma=0.1)
    model.eval()
    full = loss(model, batch)
    assert full.shape == (4,) and (full > 0).all()
    loss.kl_scale = 0.0  # warm-up applies to training only
    torch.testing.assert_close(loss(model, batch), full)
    recon, mu, logvar = model(batch)
    nll = (0.5 * ((batch - recon) / 0.1) ** 2).flatten(1).sum(1)
    kl = kl_to_standard_normal(mu, logvar).sum(1)
    torch.testing.assert_close(full, (nll + 2.0 * kl) / (3 * 32 * 32))


def test_kl_warmup_ramps_the_weight_from_zero_to_beta():
    loss = ELBOLoss(beta=1.0, recon_sigma=0.1)
    trainer = KLWarmupTrainer(
        DenseVAE(tile_size=32, base_channels=8, latent_dim=4, bottleneck=4),
        loss,
        TrainSettings(),
        torch.device("cpu"),
        warmup_epochs=4,
    )
    scales = []
    for epoch in range(1, 8):
        trainer.begin_epoch(epoch)
        scales.append(loss.kl_scale)
    assert scales == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("family", ["vae", "spatial_vae"])
def test_recon_prob_scores_are_reproducible_and_do_not_depend_on_the_batch(family: str):
    tiles = texture_tiles(np.random.default_rng(4), 10, 32)[0]
    detector = create_detector(
        family, tile_size=32, base_channels=8, device="cpu", score_mode="recon_prob", n_samples=3
    )
    whole = detector.score(tiles, batch_size=10)
    torch.manual_seed(123)  # the global RNG plays no part
    split = detector.score(tiles, batch_size=3)
    torch.testing.assert_close(split.anomaly_map, whole.anomaly_map)
    torch.testing.assert_close(split.tile_score, whole.tile_score)
    # Sampling really happens: n_samples=1 draws differently from the average of three.
    one = dataclasses.replace(detector.config, n_samples=1)
    single = type(detector)(one)
    single.load_state_dict(detector.state_dict())
    assert not torch.allclose(single.score(tiles).tile_score, whole.tile_score)


def test_vae_refuses_an_unknown_score_mode():
    with pytest.raises(ValueError, match="score_mode"):
        create_detector("vae", score_mode="likelihood")


# -- the trainer's robust mode -------------------------------------------------------------


def _trainer(trim: float, warmup: int) -> Trainer:
    settings = TrainSettings(robust_trim_fraction=trim, robust_warmup_epochs=warmup)
    return Trainer(nn.Linear(1, 1), reconstruction_loss, settings, torch.device("cpu"))


def test_trimmed_loss_ignores_the_worst_samples_only_after_the_warmup():
    trainer = _trainer(trim=0.25, warmup=1)
    losses = torch.tensor([1.0, 2.0, 3.0, 100.0], requires_grad=True)

    trainer.begin_epoch(1)
    assert not trainer.trimming
    assert trainer.reduce_loss(losses, trim=trainer.trimming).item() == pytest.approx(26.5)

    trainer.begin_epoch(2)
    assert trainer.trimming
    trimmed = trainer.reduce_loss(losses, trim=trainer.trimming)
    assert trimmed.item() == pytest.approx(2.0)
    trimmed.backward()
    # The outlier gets no gradient: the model is not pulled towards reconstructing it.
    torch.testing.assert_close(losses.grad, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_trimming_keeps_at_least_one_sample():
    trainer = _trainer(trim=0.9, warmup=0)
    trainer.begin_epoch(1)
    assert trainer.reduce_loss(torch.tensor([5.0, 1.0]), trim=True).item() == 1.0


def test_a_non_finite_sample_stops_training_even_if_it_would_be_trimmed():
    trainer = _trainer(trim=0.5, warmup=0)
    with pytest.raises(NonFiniteStep, match="nan"):
        trainer.reduce_loss(torch.tensor([1.0, 2.0, 3.0, float("nan")]), trim=True)


def test_trimming_a_scalar_loss_is_refused():
    with pytest.raises(TypeError, match="per-sample"):
        _trainer(trim=0.1, warmup=0).reduce_loss(torch.tensor(1.0), trim=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("robust_trim_fraction", 1.0), ("robust_trim_fraction", -0.1), ("robust_warmup_epochs", -1)],
)
def test_train_settings_refuse_a_bad_robust_setting(field: str, value):
    with pytest.raises(ValueError, match=field):
        TrainSettings(**{field: value})


def test_ae_l2_per_tile_loss_averages_to_the_batch_mse():
    model = create_detector("ae_l2", tile_size=32, base_channels=8, device="cpu").model
    batch = torch.rand(5, 3, 32, 32)
    per_tile = reconstruction_loss(model, batch)
    assert per_tile.shape == (5,)
    torch.testing.assert_close(per_tile.mean(), ((model(batch) - batch) ** 2).mean())


def test_robust_fit_runs_and_reports_through_the_warmup():
    tiles = texture_tiles(np.random.default_rng(5), 40, 32)[0]
    detector = create_detector(
        "ae_l2",
        tile_size=32,
        base_channels=8,
        epochs=2,
        batch_size=16,
        device="cpu",
        robust_trim_fraction=0.25,
        robust_warmup_epochs=1,
    )
    report = detector.fit(tiles[:32], tiles[32:])
    assert report.epochs == 2 and all(np.isfinite(report.train_loss))


# -- trained on normal texture, they find planted defects ----------------------------------


@pytest.mark.slow
def test_ae_ssim_separates_planted_defects_from_normal_texture():
    rng = np.random.default_rng(0)
    size = 32
    train, _ = texture_tiles(rng, 256, size)
    val, _ = texture_tiles(rng, 32, size)
    tiles, labels = planted_test_set(rng, size)
    detector = create_detector(
        "ae_ssim",
        tile_size=size,
        base_channels=8,
        epochs=10,
        lr=3e-3,
        batch_size=32,
        device="cpu",
    )
    started = time.perf_counter()
    report = detector.fit(train, val)
    auroc = tile_auroc(detector, tiles, labels)
    print(
        f"ae_ssim tile AUROC {auroc:.3f}, {report.epochs} epochs, "
        f"{time.perf_counter() - started:.1f}s"
    )
    assert auroc >= 0.8


@pytest.mark.slow
def test_vae_separates_planted_defects_from_normal_texture():
    # A dense latent has to say where each of the ~10 nuclei of a 32 px tile is, which takes it
    # far longer to learn than a spatial one (tile AUROC 0.65 after 15 epochs, 0.85 after 25,
    # 0.89 after 40): until then its residual sits on every nucleus and hides the defects.
    # An 8 x 8 feature grid before the dense layers learns faster than the default 4 x 4.
    rng = np.random.default_rng(0)
    size = 32
    train, _ = texture_tiles(rng, 256, size)
    val, _ = texture_tiles(rng, 32, size)
    tiles, labels = planted_test_set(rng, size)
    detector = create_detector(
        "vae",
        tile_size=size,
        base_channels=8,
        latent_dim=128,
        bottleneck=8,
        epochs=40,
        patience=40,
        lr=3e-3,
        batch_size=32,
        kl_warmup_epochs=3,
        device="cpu",
    )
    started = time.perf_counter()
    report = detector.fit(train, val)
    residual = tile_auroc(detector, tiles, labels)
    # The same weights, scored by reconstruction probability.
    by_probability = type(detector)(dataclasses.replace(detector.config, score_mode="recon_prob"))
    by_probability.load_state_dict(detector.state_dict())
    recon_prob = tile_auroc(by_probability, tiles, labels)
    print(
        f"vae tile AUROC residual {residual:.3f}, recon_prob {recon_prob:.3f}, "
        f"{report.epochs} epochs, {time.perf_counter() - started:.1f}s"
    )
    assert residual >= 0.8
    assert recon_prob >= 0.8


@pytest.mark.slow
def test_spatial_vae_separates_planted_defects_from_normal_texture():
    rng = np.random.default_rng(0)
    size = 32
    train, _ = texture_tiles(rng, 256, size)
    val, _ = texture_tiles(rng, 32, size)
    tiles, labels = planted_test_set(rng, size)
    detector = create_detector(
        "spatial_vae",
        tile_size=size,
        base_channels=8,
        latent_channels=16,
        epochs=10,
        lr=3e-3,
        batch_size=32,
        kl_warmup_epochs=3,
        device="cpu",
    )
    started = time.perf_counter()
    report = detector.fit(train, val)
    auroc = tile_auroc(detector, tiles, labels)
    print(
        f"spatial_vae tile AUROC {auroc:.3f}, {report.epochs} epochs, "
        f"{time.perf_counter() - started:.1f}s"
    )
    assert auroc >= 0.8


@pytest.mark.slow
def test_robust_mode_loses_less_auroc_to_contaminated_training_data():
    """10 % of the training tiles carry the test's defects; each mode's AUROC drop is its AUROC
    trained on clean tiles minus its AUROC trained on the contaminated ones (same tiles
    otherwise, same seed). Plain training learns to reconstruct the defects it saw, so they
    stand out less; the trimmed loss leaves them out once the warm-up is over."""
    rng = np.random.default_rng(0)
    size, n_train = 32, 256
    clean, _ = texture_tiles(rng, n_train, size)
    val, _ = texture_tiles(rng, 32, size)
    n_bad = n_train // 10
    bad = np.concatenate([texture_tiles(rng, n_bad // 3 + 1, size, kind)[0] for kind in DEFECTS])
    contaminated = clean.copy()
    contaminated[rng.choice(n_train, n_bad, replace=False)] = bad[:n_bad]
    tiles, labels = planted_test_set(rng, size)

    def auroc(train: np.ndarray, trim: float) -> float:
        detector = create_detector(
            "ae_l2",
            tile_size=size,
            base_channels=8,
            latent_channels=32,
            epochs=10,
            lr=3e-3,
            batch_size=32,
            patience=10,
            robust_trim_fraction=trim,
            robust_warmup_epochs=2,
            device="cpu",
        )
        detector.fit(train, val)
        return tile_auroc(detector, tiles, labels)

    started = time.perf_counter()
    plain = auroc(clean, 0.0), auroc(contaminated, 0.0)
    robust = auroc(clean, 0.2), auroc(contaminated, 0.2)
    plain_drop, robust_drop = plain[0] - plain[1], robust[0] - robust[1]
    print(
        f"AUROC clean -> contaminated: plain {plain[0]:.3f} -> {plain[1]:.3f} "
        f"(drop {plain_drop:.3f}), robust {robust[0]:.3f} -> {robust[1]:.3f} "
        f"(drop {robust_drop:.3f}), {time.perf_counter() - started:.1f}s"
    )
    assert robust_drop < plain_drop
    assert robust[1] > plain[1]
