"""draem: the synthetic anomalies it trains on, its network and loss, and that trained on
normal texture alone it ranks planted defects above normal tiles.

The interface contract (shapes, tensor input, save/load through the registry) runs for draem in
test_detectors.py, which is parametrized over every registered family.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadflow.tasks.detectors.base import to_tensor
from vadflow.tasks.detectors.components.training import TrainingConfig, TrainSettings
from vadflow.tasks.detectors.draem import AnomalySynthesis, DraemConfig, DraemNet, synthesise
from vadflow.tasks.detectors.draem.loss import focal_loss
from vadflow.tasks.detectors.draem.synthetic import (
    SOURCES,
    match_mean_colour,
    perlin_masks,
    perlin_noise,
)
from vadflow.tasks.detectors.registry import create_detector, detector_class, load_detector
from vadflow.tasks.synth.texture import texture_tiles

DEFECTS = ("dense", "scratch", "patch")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread for these small models (see test_detector_families.py), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return to_tensor(texture_tiles(np.random.default_rng(0), 12, 32)[0])  # (12, 3, 32, 32)


def _od(x: torch.Tensor) -> torch.Tensor:
    return -torch.log(x.clamp(1 / 255, 1))


# -- the synthetic anomalies ---------------------------------------------------------------


def test_perlin_noise_is_zero_on_the_lattice_and_smooth_between():
    noise = perlin_noise(32, 32, 4, 4, torch.Generator().manual_seed(0))
    assert noise.shape == (32, 32)
    lattice = noise[::8, ::8]  # 4 cells of 8 px: every 8th pixel is a corner
    torch.testing.assert_close(lattice, torch.zeros_like(lattice))
    assert noise.abs().max() > 0.2  # not flat
    # Neighbouring pixels differ far less than the field's range: smooth, not white noise.
    assert (noise[:, 1:] - noise[:, :-1]).abs().max() < 0.25 * (noise.max() - noise.min())


def test_masks_are_binary_and_their_size_follows_the_threshold():
    low = perlin_masks(16, 32, 32, (-0.1, -0.1), torch.Generator().manual_seed(1))
    high = perlin_masks(16, 32, 32, (0.4, 0.4), torch.Generator().manual_seed(1))
    assert low.shape == (16, 1, 32, 32)
    assert set(low.unique().tolist()) <= {0.0, 1.0}
    # The same noise fields cut higher: every high-threshold pixel is in the low one too.
    assert (high <= low).all() and high.sum() < 0.5 * low.sum()


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_changes_only_the_masked_pixels(batch: torch.Tensor, source: str):
    settings = AnomalySynthesis(
        probability=1.0, sources=(source,), max_blend=0.0, edge_softness=0.0
    )
    corrupted, mask = synthesise(batch, settings, torch.Generator().manual_seed(2))
    assert corrupted.shape == batch.shape and mask.shape == (12, 1, 32, 32)
    assert corrupted.min() >= 0 and corrupted.max() <= 1
    outside = (mask == 0).expand_as(batch)
    torch.testing.assert_close(corrupted[outside], batch[outside])
    assert mask.sum() > 0
    inside = (mask == 1).expand_as(batch)
    assert (corrupted[inside] - batch[inside]).abs().mean() > 0.02  # really changed


def test_soft_edges_blend_just_outside_the_mask_and_nowhere_far(batch: torch.Tensor):
    hard = AnomalySynthesis(probability=1.0, sources=("stain",), edge_softness=0.0)
    soft = dataclasses.replace(hard, edge_softness=1.5)
    sharp, mask = synthesise(batch, hard, torch.Generator().manual_seed(2))
    blurred, same_mask = synthesise(batch, soft, torch.Generator().manual_seed(2))
    torch.testing.assert_close(mask, same_mask)  # the target stays the binary mask
    near = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1) - mask  # 1 px ring
    far = torch.nn.functional.max_pool2d(mask, 19, stride=1, padding=9) == 0
    ring = (near == 1).expand_as(batch)
    assert (blurred[ring] - batch[ring]).abs().mean() > (sharp[ring] - batch[ring]).abs().mean()
    torch.testing.assert_close(blurred[far.expand_as(batch)], batch[far.expand_as(batch)])


def test_probability_zero_leaves_every_tile_normal(batch: torch.Tensor):
    settings = AnomalySynthesis(probability=0.0)
    corrupted, mask = synthesise(batch, settings, torch.Generator().manual_seed(3))
    torch.testing.assert_close(corrupted, batch)
    assert mask.sum() == 0


def test_synthesis_is_reproducible_from_the_generator(batch: torch.Tensor):
    first = synthesise(batch, AnomalySynthesis(), torch.Generator().manual_seed(4))
    again = synthesise(batch, AnomalySynthesis(), torch.Generator().manual_seed(4))
    other = synthesise(batch, AnomalySynthesis(), torch.Generator().manual_seed(5))
    torch.testing.assert_close(first[0], again[0])
    torch.testing.assert_close(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_colour_matching_moves_the_source_onto_the_hosts_mean_colour(batch: torch.Tensor):
    darker = torch.exp(-2.0 * _od(batch.flip(0)))  # twice the stain, other tiles
    matched = match_mean_colour(darker, batch)
    before = (_od(darker).mean((2, 3)) - _od(batch).mean((2, 3))).abs().max()
    after = (_od(matched).mean((2, 3)) - _od(batch).mean((2, 3))).abs().max()
    # Not exact: a pixel cannot get lighter than white (OD 0), so a few clip.
    assert before > 0.1 and after < 0.1 * before
    # The texture stays: the matched tile still differs from its host pixel by pixel.
    assert (matched - batch).abs().mean() > 0.02


def test_dense_source_holds_more_dark_pixels_than_its_tile(batch: torch.Tensor):
    from vadflow.tasks.detectors.draem.synthetic import dense_source

    dense = dense_source(batch, torch.Generator().manual_seed(6))
    dark = _od(batch).sum(1) > 1.0  # nuclei
    assert (_od(dense).sum(1) > 1.0).sum() > 1.5 * dark.sum()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("anomaly_sources", ("foreign", "glitter")),
        ("anomaly_sources", ()),
        ("anomaly_probability", 1.5),
        ("anomaly_max_blend", -0.1),
        ("anomaly_threshold", (0.5, 0.2)),
        ("recon_weight", -1.0),
        ("depth", 0),
    ],
)
def test_a_bad_setting_is_refused_at_construction(field: str, value):
    with pytest.raises(ValueError, match=field.removeprefix("anomaly_")):
        create_detector("draem", **{field: value})


# -- network, loss, config -----------------------------------------------------------------


def test_config_extends_the_shared_training_base_and_feeds_the_trainer():
    assert issubclass(DraemConfig, TrainingConfig)
    config = DraemConfig(epochs=4, lr=5e-4, batch_size=8, seed=3, augment=False)
    settings = TrainSettings.from_config(config)
    assert (settings.epochs, settings.lr, settings.batch_size, settings.seed) == (4, 5e-4, 8, 3)
    assert not settings.augment
    assert detector_class("draem").supervision == "none"


@pytest.mark.parametrize("reconstruction", [True, False])
def test_network_shapes_and_batch_independence(reconstruction: bool):
    model = DraemNet(tile_size=32, base_channels=8, depth=3, reconstruction=reconstruction).eval()
    x = torch.rand(5, 3, 32, 32)
    recon, logits = model(x)
    assert logits.shape == (5, 1, 32, 32)
    assert (recon is not None) == reconstruction
    if recon is not None:
        assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    # GroupNorm, never BatchNorm: a tile's map does not depend on the rest of its batch.
    torch.testing.assert_close(model(x[:2])[1], logits[:2], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="32px"):
        model(torch.rand(1, 3, 64, 64))


def test_focal_loss_is_bce_at_gamma_zero_and_down_weights_easy_pixels():
    logits = torch.tensor([[[[4.0, -4.0], [0.0, 2.0]]]])  # (1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(focal_loss(logits, target, 0.0), bce.reshape(1))
    focal = focal_loss(logits, target, 2.0)
    assert focal.shape == (1,) and 0 < focal.item() < bce.item()


def test_validation_loss_is_the_same_anomalies_every_epoch():
    tiles = texture_tiles(np.random.default_rng(7), 24, 32)[0]
    detector = create_detector("draem", tile_size=32, base_channels=8, device="cpu", lr=0.0)
    trainer = detector.make_trainer()
    first, second = trainer.evaluate(tiles), trainer.evaluate(tiles)
    assert first == second  # lr 0: same weights, and the validation draws are reseeded


# -- trained on normal texture, it finds planted defects -----------------------------------


def test_save_and_load_give_the_same_scores(tmp_path: Path):
    tiles = texture_tiles(np.random.default_rng(8), 40, 32)[0]
    detector = create_detector(
        "draem", tile_size=32, base_channels=8, epochs=1, batch_size=16, device="cpu"
    )
    detector.fit(tiles[:32], tiles[32:])
    out = detector.score(tiles[:6], batch_size=4)
    loaded = load_detector(detector.save(tmp_path / "draem"))
    assert loaded.config == detector.config
    again = loaded.score(tiles[:6])
    torch.testing.assert_close(again.anomaly_map, out.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(again.tile_score, out.tile_score, rtol=0, atol=0)
    # The tile score is the maximum of the smoothed map.
    torch.testing.assert_close(out.tile_score, out.anomaly_map.flatten(1).amax(1))


def test_training_is_reproducible_from_the_seed():
    tiles = texture_tiles(np.random.default_rng(9), 40, 32)[0]

    def trained(seed: int) -> torch.Tensor:
        detector = create_detector(
            "draem", tile_size=32, base_channels=8, epochs=1, batch_size=16, device="cpu", seed=seed
        )
        detector.fit(tiles[:32], tiles[32:])
        return detector.score(tiles[:4]).tile_score

    torch.testing.assert_close(trained(0), trained(0), rtol=0, atol=0)
    assert not torch.equal(trained(0), trained(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("reconstruction", "epochs", "bar", "kind_bar"),
    [
        # Measured (32 px texture, seed 0): the segmenter alone 0.93-0.94 after 8 epochs (worst
        # defect kind 0.84-0.86); with the reconstructive subnetwork, which it must learn to
        # read first, 0.57 after 8 epochs, and after 16 it swings with the seed and with
        # last-bit changes to the synthetic anomalies' colour maths: 0.707 / 0.835 / 0.665 /
        # 0.664 at detector seeds 0-3 (0.785 at seed 0 before the HED conversion went
        # elementwise). The bar is under the worst of those, still well clear of chance.
        (False, 8, 0.85, 0.75),
        (True, 16, 0.62, 0.0),
    ],
)
def test_draem_ranks_planted_defects_above_normal_texture(
    reconstruction: bool, epochs: int, bar: float, kind_bar: float
):
    rng = np.random.default_rng(0)
    size = 32
    train, _ = texture_tiles(rng, 256, size)
    val, _ = texture_tiles(rng, 32, size)
    normal, _ = texture_tiles(rng, 60, size)
    defective = [texture_tiles(rng, 20, size, kind)[0] for kind in DEFECTS]
    tiles = np.concatenate([normal, *defective])
    labels = np.r_[np.zeros(60), np.ones(20 * len(DEFECTS))]
    detector = create_detector(
        "draem",
        tile_size=size,
        base_channels=8,
        epochs=epochs,
        batch_size=32,
        reconstruction=reconstruction,
        device="cpu",
    )
    started = time.perf_counter()
    report = detector.fit(train, val)
    scores = detector.score(tiles).tile_score.numpy()
    auroc = float(roc_auc_score(labels, scores))
    per_kind = [
        float(roc_auc_score(labels[:60].tolist() + [1] * 20, np.r_[scores[:60], part]))
        for part in np.split(scores[60:], len(DEFECTS))
    ]
    print(
        f"draem (reconstruction={reconstruction}) tile AUROC {auroc:.3f}, per defect "
        f"{dict(zip(DEFECTS, np.round(per_kind, 3), strict=True))}, {report.epochs} epochs, "
        f"{time.perf_counter() - started:.1f}s"
    )
    assert auroc >= bar
    assert min(per_kind) >= kind_bar


def test_untrained_draem_does_not_rank_the_defects():
    """The trained test's bar means something: the same untrained network is near chance."""
    rng = np.random.default_rng(0)
    normal, _ = texture_tiles(rng, 60, 32)
    defective = np.concatenate([texture_tiles(rng, 20, 32, kind)[0] for kind in DEFECTS])
    detector = create_detector("draem", tile_size=32, base_channels=8, device="cpu")
    scores = detector.score(np.concatenate([normal, defective])).tile_score.numpy()
    auroc = roc_auc_score(np.r_[np.zeros(60), np.ones(60)], scores)
    assert auroc < 0.8


def test_config_round_trips_through_dataclass_replace():
    config = DraemConfig(anomaly_sources=("enlarge", "dense"))
    assert dataclasses.replace(config, epochs=3).synthesis().sources == ("enlarge", "dense")
