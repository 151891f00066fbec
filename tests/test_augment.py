"""Training-time augmentation: exact symmetries, colour jitter that stays in range and does what
it says, identity at zero strength, and no augmentation anywhere on the scoring path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vadflow.tasks.detectors.base import to_tensor
from vadflow.tasks.detectors.components.augment import (
    Augmentation,
    brightness_contrast,
    hed_jitter,
    hed_to_rgb,
    hsv_jitter,
    random_dihedral,
    rgb_to_hed,
    rgb_to_hsv,
)
from vadflow.tasks.detectors.components.training import Trainer, TrainSettings
from vadflow.tasks.detectors.registry import create_detector
from vadflow.tasks.site import AugmentationConfig

STRONG = Augmentation(
    flips=True, rot90=True, hed_jitter=0.2, hsv_jitter=0.2, brightness=0.2, contrast=0.5
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 64, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=_gen(seed))  # (n, 3, size, size) in [0, 1]


def _symmetries(tile: torch.Tensor) -> list[torch.Tensor]:
    """The eight symmetries of a square tile (3, H, W)."""
    turns = [torch.rot90(tile, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def test_flips_and_quarter_turns_are_exact_symmetries_and_reach_all_eight() -> None:
    batch = _batch()
    out = random_dihedral(batch, _gen(1), flips=True, rot90=True)
    seen = set()
    for before, after in zip(batch, out, strict=True):
        matches = [k for k, s in enumerate(_symmetries(before)) if torch.equal(s, after)]
        assert matches, "an output tile is not a symmetry of its input"
        seen.add(matches[0])
        # A permutation of the pixels: same values, same multiset per channel.
        assert torch.equal(before.flatten(1).sort().values, after.flatten(1).sort().values)
    assert seen == set(range(8))


def test_flips_alone_never_turn_and_quarter_turns_keep_non_square_shapes() -> None:
    batch = _batch()
    out = random_dihedral(batch, _gen(2), flips=True, rot90=False)
    for before, after in zip(batch, out, strict=True):
        flips = [before, before.flip(-1), before.flip(-2), before.flip(-1).flip(-2)]
        assert any(torch.equal(f, after) for f in flips)
    wide = torch.rand(16, 3, 4, 8, generator=_gen(3))
    assert random_dihedral(wide, _gen(4), flips=True, rot90=True).shape == wide.shape


@pytest.mark.parametrize(
    "jitter",
    [
        lambda x, g: hed_jitter(x, 0.5, g),
        lambda x, g: hsv_jitter(x, 0.5, g),
        lambda x, g: brightness_contrast(x, 0.5, 0.9, g),
        lambda x, g: STRONG(x, g),
    ],
    ids=["hed", "hsv", "brightness-contrast", "all"],
)
def test_jitter_keeps_range_shape_and_changes_each_tile_differently(jitter) -> None:
    batch = torch.cat([_batch(30), torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)])
    out = jitter(batch, _gen(5))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    change = (out - batch)[:30].abs().flatten(1).mean(1)  # (30,)
    assert (change > 1e-3).all()  # every tile was changed ...
    assert change.std() > 1e-4  # ... each by its own draw
    # Seeded: the same draws give the same tiles, to a quarter of an 8-bit step; another seed
    # moves them by far more. Not bitwise, nor to float32 rounding: CI has seen two identical
    # HED calls differ by up to 4e-5 (in 15 % of the values, on 2 cores, after ~300 other
    # tests), which this machine never reproduced, although float32 against float64 differs by
    # 6e-7 at most here. Cause unknown; the property that matters for training is the seed.
    again = jitter(batch, _gen(5))
    assert (again - out).abs().max() < 1e-3
    assert (jitter(batch, _gen(6)) - out).abs().max() > 1e-2


def test_zero_strength_is_the_identity_and_colour_spaces_round_trip() -> None:
    batch = _batch()
    g = _gen(7)
    assert torch.equal(hed_jitter(batch, 0.0, g), batch)
    assert torch.equal(hsv_jitter(batch, 0.0, g), batch)
    assert torch.equal(brightness_contrast(batch, 0.0, 0.0, g), batch)
    off = Augmentation.off()
    assert not off and torch.equal(off(batch, g), batch)
    assert not TrainSettings(augment=False).augment
    # The conversions the jitters go through lose nothing (above HED's one-step OD floor).
    lit = batch.clamp(1.0 / 255.0, 1.0)
    assert torch.allclose(hed_to_rgb(rgb_to_hed(lit)), lit, atol=1e-5)
    from vadflow.tasks.detectors.components.augment import hsv_to_rgb

    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(batch)), batch, atol=1e-5)


def test_hed_jitter_moves_stain_amounts_within_its_bounds() -> None:
    """A tile of known haematoxylin and eosin amounts: after jitter s, each amount a lies in
    [a(1-s) - s, a(1+s) + s], and DAB (what H and E do not explain) is untouched."""
    s = 0.1
    amounts = torch.tensor([0.8, 0.4, 0.0]).view(1, 3, 1, 1).expand(32, 3, 4, 4)
    tiles = hed_to_rgb(amounts)
    measured = rgb_to_hed(hed_jitter(tiles, s, _gen(8)))  # (32, 3, 4, 4)
    for channel, a in ((0, 0.8), (1, 0.4)):
        values = measured[:, channel]
        assert values.min() >= a * (1 - s) - s - 1e-4 and values.max() <= a * (1 + s) + s + 1e-4
        assert values.std() > 0.01  # it did move
    assert measured[:, 2].abs().max() < 1e-4


def test_hsv_jitter_turns_hue_by_at_most_its_strength_and_keeps_value() -> None:
    s = 0.05
    batch = _batch().clamp(0.05, 0.95)
    before, after = rgb_to_hsv(batch), rgb_to_hsv(hsv_jitter(batch, s, _gen(9)))
    coloured = before[:, 1] > 0.2  # hue is meaningless for greys
    turn = (after[:, 0] - before[:, 0] + 0.5) % 1.0 - 0.5  # signed, on the circle
    assert turn[coloured].abs().max() <= s + 1e-4
    assert torch.allclose(after[:, 2], before[:, 2], atol=1e-5)


def test_settings_accept_true_false_and_a_site_block_and_name_bad_keys() -> None:
    assert TrainSettings().augment == Augmentation()  # True: flips only, as before
    config = create_detector("ae_l2", augment={"rot90": True, "hed_jitter": 0.03}).config
    settings = TrainSettings.from_config(config)
    assert settings.augment == Augmentation(rot90=True, hed_jitter=0.03)
    with pytest.raises(TypeError, match="'jitter'.*valid: flips, rot90"):
        TrainSettings(augment={"jitter": 0.1})
    with pytest.raises(ValueError, match="hed_jitter must be in"):
        TrainSettings(augment={"hed_jitter": 0.9})


def test_the_site_block_has_the_trainers_fields_and_defaults() -> None:
    site_defaults = AugmentationConfig().model_dump()
    assert site_defaults == Augmentation().as_dict()
    assert Augmentation.from_setting(AugmentationConfig(hed_jitter=0.5).model_dump()).hed_jitter
    for name, too_big in (("hed_jitter", 0.6), ("contrast", 1.0), ("brightness", 0.6)):
        with pytest.raises(ValueError):
            AugmentationConfig(**{name: too_big})
        with pytest.raises(ValueError):
            Augmentation(**{name: too_big})
    names = {f.name for f in dataclasses.fields(Augmentation)}
    assert names == set(AugmentationConfig.model_fields)


def test_training_batches_are_augmented_and_validation_and_scoring_are_not() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    detector = create_detector(
        "ae_l2",
        tile_size=32,
        base_channels=8,
        bottleneck=4,
        epochs=1,
        batch_size=40,
        device="cpu",
        augment=STRONG.as_dict(),
    )
    trainer = Trainer(
        detector.model,
        lambda m, b: ((m(b) - b) ** 2).flatten(1).mean(1),
        TrainSettings.from_config(detector.config),
        torch.device("cpu"),
    )
    plain = to_tensor(tiles)  # (40, 3, 32, 32)
    (val_batch,) = trainer._batches(tiles, shuffle=False)
    assert torch.equal(val_batch, plain)
    (train_batch,) = trainer._batches(tiles, shuffle=True)
    # One batch holds every tile, in index order: only the augmentation can tell them apart.
    assert not torch.allclose(train_batch, plain, atol=0.02)

    detector.fit(tiles[:32], tiles[32:])
    first, again = detector.score(tiles), detector.score(tiles)
    with torch.no_grad():
        direct_map, direct_score = detector._score_batch(plain)
    assert torch.equal(first.tile_score, again.tile_score)
    assert torch.allclose(first.tile_score, direct_score)
    assert torch.allclose(first.anomaly_map, direct_map)
