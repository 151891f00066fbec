"""Detector interface, registry, shared trainer and the ae_l2 family, on generated tiles."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadflow.tasks.detectors.base import (
    DivergedError,
    FitReport,
    gaussian_smooth,
    to_tensor,
    top_fraction_mean,
)
from vadflow.tasks.detectors.registry import (
    available_families,
    create_detector,
    detector_class,
    load_detector,
)
from vadflow.tasks.synth.texture import texture_tiles

# Small, fast settings; each family takes the ones its config has.
FAST = {"tile_size": 32, "epochs": 1, "batch_size": 16, "base_channels": 8, "device": "cpu"}


def fast_detector(name: str, **extra):
    fields = {f.name for f in dataclasses.fields(detector_class(name).config_cls)}
    return create_detector(name, **{k: v for k, v in {**FAST, **extra}.items() if k in fields})


def tile_size_of(detector) -> int:
    return getattr(detector.config, "tile_size", FAST["tile_size"])


@pytest.fixture(scope="module")
def small_tiles() -> np.ndarray:
    return texture_tiles(np.random.default_rng(1), 40, 32)[0]


# -- every registered family --------------------------------------------------------------


def test_registry_is_filled_on_import():
    assert "ae_l2" in available_families()


@pytest.mark.parametrize("family", available_families())
def test_family_contract(family: str, tmp_path: Path):
    detector = fast_detector(family)
    size = tile_size_of(detector)
    tiles, _ = texture_tiles(np.random.default_rng(2), 40, size)
    labels = np.arange(40) % 2 == 0
    supervision = getattr(detector, "supervision", "none")
    if supervision == "tile":  # labelled tiles
        report = detector.fit_labelled(tiles[:32], labels[:32], tiles[32:], labels[32:])
    elif supervision == "slide":  # bags of tiles with slide labels
        report = detector.fit_bags([tiles[i : i + 8] for i in range(0, 32, 8)], [1, 0, 1, 0])
    else:
        report = detector.fit(tiles[:32], tiles[32:])
    assert isinstance(report, FitReport) and report.epochs >= 1

    out = detector.score(tiles[:5])
    assert out.anomaly_map.shape == (5, 1, size, size)
    assert out.tile_score.shape == (5,)
    assert out.anomaly_map.dtype == out.tile_score.dtype == torch.float32
    assert out.anomaly_map.device.type == out.tile_score.device.type == "cpu"
    assert torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.tile_score).all()

    # A float (B, 3, H, W) tensor in [0, 1] is the same input as uint8 NHWC.
    as_tensor = detector.score(to_tensor(tiles[:5]))
    torch.testing.assert_close(as_tensor.tile_score, out.tile_score)

    saved = detector.save(tmp_path / "model")
    config = json.loads((saved / "config.json").read_text())
    assert config["family"] == family
    assert (saved / "weights.pt").is_file()
    for loaded in (load_detector(saved), type(detector).load(saved)):
        again = loaded.score(tiles[:5])
        torch.testing.assert_close(again.anomaly_map, out.anomaly_map, rtol=0, atol=0)
        torch.testing.assert_close(again.tile_score, out.tile_score, rtol=0, atol=0)
        assert loaded.config == detector.config


@pytest.mark.parametrize("family", available_families())
def test_unknown_override_is_a_type_error_naming_the_field(family: str):
    with pytest.raises(TypeError, match="no_such_knob") as info:
        create_detector(family, no_such_knob=3)
    first_field = dataclasses.fields(detector_class(family).config_cls)[0].name
    assert first_field in str(info.value)


def test_unknown_family_is_a_key_error_listing_families():
    with pytest.raises(KeyError, match="ae_l2"):
        create_detector("no_such_family")


def test_load_detector_refuses_an_unknown_family(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"family": "gone"}))
    with pytest.raises(KeyError, match="gone"):
        load_detector(tmp_path)


# -- small pieces of base -----------------------------------------------------------------


def test_to_tensor_converts_uint8_nhwc_to_unit_float_nchw():
    tiles = np.zeros((2, 4, 5, 3), np.uint8)
    tiles[0, 1, 2] = (255, 0, 51)
    x = to_tensor(tiles)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert to_tensor(x) is x  # float NCHW passes through untouched
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        to_tensor(np.zeros((2, 4, 5), np.uint8)[..., None])


def test_gaussian_smooth_keeps_shape_and_constant_maps():
    flat = torch.full((2, 1, 9, 9), 0.25)
    torch.testing.assert_close(gaussian_smooth(flat, 1.5), flat)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1.0
    smooth = gaussian_smooth(spike, 1.0)
    assert smooth.shape == spike.shape and smooth.max() < 1.0
    assert smooth.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_top_fraction_mean_spans_max_to_mean():
    maps = torch.arange(100.0).view(1, 1, 10, 10)
    assert top_fraction_mean(maps, 0.0).item() == 99.0
    assert top_fraction_mean(maps, 0.1).item() == pytest.approx(94.5)
    assert top_fraction_mean(maps, 1.0).item() == pytest.approx(49.5)


def test_fit_rejects_tiles_of_another_size(small_tiles: np.ndarray):
    detector = fast_detector("ae_l2", tile_size=64)
    with pytest.raises(ValueError, match="tile_size=64"):
        detector.fit(small_tiles, small_tiles)


# -- ae_l2 really detects anomalies --------------------------------------------------------


@pytest.mark.slow
def test_ae_l2_separates_planted_defects_from_normal_texture():
    rng = np.random.default_rng(0)
    size = 32
    train, _ = texture_tiles(rng, 512, size)
    val, _ = texture_tiles(rng, 64, size)
    normal, _ = texture_tiles(rng, 60, size)
    kinds = [texture_tiles(rng, 20, size, kind) for kind in ("dense", "scratch", "patch")]
    anomalous = np.concatenate([tiles for tiles, _ in kinds])
    masks = np.concatenate([mask for _, mask in kinds])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]

    detector = create_detector(
        "ae_l2", tile_size=size, base_channels=16, epochs=20, lr=3e-3, device="cpu"
    )
    untrained = detector.score(np.concatenate([normal, anomalous])).tile_score.numpy()
    report = detector.fit(train, val)
    assert report.val_loss[report.best_epoch - 1] < 0.5 * report.val_loss[0]

    out = detector.score(np.concatenate([normal, anomalous]))
    auroc = roc_auc_score(labels, out.tile_score.numpy())
    # The map points at the defect, not just somewhere in the tile.
    defect_maps = out.anomaly_map[len(normal) :, 0].numpy()
    pixel_auroc = roc_auc_score(masks.ravel(), defect_maps.ravel())
    print(
        f"ae_l2 tile AUROC {auroc:.3f} (untrained {roc_auc_score(labels, untrained):.3f}), "
        f"pixel AUROC {pixel_auroc:.3f}, {report.epochs} epochs in {report.seconds:.1f}s"
    )
    assert auroc >= 0.8
    assert roc_auc_score(labels, untrained) < auroc - 0.1
    assert pixel_auroc >= 0.8


# -- the shared trainer --------------------------------------------------------------------


def test_huge_learning_rate_raises_diverged_error(small_tiles: np.ndarray):
    detector = fast_detector("ae_l2", lr=1e6, epochs=3)
    before = {k: v.clone() for k, v in detector.model.state_dict().items()}
    with pytest.raises(DivergedError, match="epoch 1") as info:
        detector.fit(small_tiles[:32], small_tiles[32:])
    assert info.value.report is not None and info.value.report.diverged
    # Nothing good was learnt yet, so the weights from before the run are back.
    for key, value in detector.model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_nan_input_raises_diverged_error(small_tiles: np.ndarray):
    poisoned = small_tiles[:32].astype(np.float32) / 255
    poisoned[3, 5, 5, 0] = np.nan
    detector = fast_detector("ae_l2", epochs=2)
    with pytest.raises(DivergedError, match=r"epoch 1, step \d+: training loss is nan"):
        detector.fit(poisoned, small_tiles[32:])


def test_divergence_keeps_best_weights_and_last_good_checkpoint(
    small_tiles: np.ndarray, tmp_path: Path
):
    detector = fast_detector("ae_l2", epochs=5, patience=5)
    kept = {}

    def blow_up_after_epoch_2(epoch: int, train_loss: float, val_loss: float) -> None:
        if epoch == 2:
            kept.update({k: v.clone() for k, v in detector.model.state_dict().items()})
            with torch.no_grad():
                next(detector.model.parameters()).fill_(math.inf)

    with pytest.raises(DivergedError, match="epoch 3") as info:
        detector.fit(
            small_tiles[:32],
            small_tiles[32:],
            on_epoch=blow_up_after_epoch_2,
            checkpoint_dir=tmp_path,
        )
    checkpoint = tmp_path / "last.pt"
    assert info.value.checkpoint == checkpoint and str(checkpoint) in str(info.value)
    assert checkpoint.is_file()
    assert all(torch.isfinite(p).all() for p in detector.model.parameters())
    report = info.value.report
    assert report.epochs == 2 and report.diverged
    best = report.best_epoch
    assert best in (1, 2)
    if best == 2:
        for key, value in detector.model.state_dict().items():
            torch.testing.assert_close(value, kept[key])


def test_early_stopping_when_val_loss_plateaus(small_tiles: np.ndarray):
    # lr=0 freezes the weights, so validation loss cannot improve after epoch 1.
    detector = fast_detector("ae_l2", lr=0.0, epochs=20, patience=2)
    seen = []
    report = detector.fit(
        small_tiles[:32], small_tiles[32:], on_epoch=lambda e, t, v: seen.append(e)
    )
    assert report.stopped_early
    assert report.epochs == 3 and seen == [1, 2, 3]
    assert report.best_epoch == 1
    assert len(report.train_loss) == len(report.val_loss) == 3


def test_checkpoint_resume_continues_the_epoch_count(small_tiles: np.ndarray, tmp_path: Path):
    train, val = small_tiles[:32], small_tiles[32:]
    first = fast_detector("ae_l2", epochs=2, patience=10)
    head = first.fit(train, val, checkpoint_dir=tmp_path)
    assert head.epochs == 2 and (tmp_path / "last.pt").is_file()

    resumed = fast_detector("ae_l2", epochs=4, patience=10)
    seen = []
    tail = resumed.fit(train, val, resume_from=tmp_path, on_epoch=lambda e, t, v: seen.append(e))
    assert seen == [3, 4]
    assert tail.epochs == 4 and len(tail.train_loss) == 4
    assert tail.train_loss[:2] == head.train_loss

    # Model, optimiser and data order all resume: the same as never stopping.
    straight = fast_detector("ae_l2", epochs=4, patience=10).fit(train, val)
    np.testing.assert_allclose(tail.train_loss, straight.train_loss, rtol=1e-5)
    np.testing.assert_allclose(tail.val_loss, straight.val_loss, rtol=1e-5)


def test_resume_from_an_empty_folder_says_so(small_tiles: np.ndarray, tmp_path: Path):
    detector = fast_detector("ae_l2")
    with pytest.raises(FileNotFoundError, match="last.pt"):
        detector.fit(small_tiles[:32], small_tiles[32:], resume_from=tmp_path)


def test_fit_report_records_device_and_time(small_tiles: np.ndarray):
    report = fast_detector("ae_l2").fit(small_tiles[:32], small_tiles[32:])
    assert report.device == "cpu" and report.seconds > 0 and not report.diverged


def test_family_names_import_no_family_and_no_torch() -> None:
    """The CLI and site validation check a name before torch loads (a typo fails in ms)."""
    import subprocess
    import sys

    code = (
        "import sys; from vadflow.tasks.detectors.registry import family_names, check_family;"
        "names = family_names(); check_family('patch_knn');"
        "print(','.join(names), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, torch_loaded = out.stdout.split()
    assert "patch_knn" in names.split(",") and "components" not in names.split(",")
    assert torch_loaded == "False"


def test_a_site_naming_an_unknown_family_fails_validation(tmp_path) -> None:
    from pydantic import ValidationError

    from vadflow.tasks.detectors.registry import UnknownFamilyError, check_family, family_names
    from vadflow.tasks.site import SiteConfig

    assert set(family_names()) == set(available_families())
    with pytest.raises(UnknownFamilyError, match="available: ae_l2"):
        check_family("ae_l3")
    for field in ({"families": ["ae_l3"]}, {"detectors": {"ae_l3": {"epochs": 1}}}):
        with pytest.raises(ValidationError, match="unknown detector family 'ae_l3'"):
            SiteConfig(name="s", domain="pathology", source=str(tmp_path), **field)


def test_family_settings_layers_site_file_then_flags() -> None:
    from vadflow.tasks.detectors.settings import family_settings

    settings = family_settings(
        "ae_l2",
        shared={"tile_size": 32, "no_such_shared_field": 1, "seed": None},
        site={"epochs": 5, "batch_size": 8},
        flags={"epochs": 2, "score": None},
    )
    assert settings == {"tile_size": 32, "epochs": 2, "batch_size": 8}
    with pytest.raises(ValueError, match="detectors.ae_l2 has no field.*'epoch'.*valid fields"):
        family_settings("ae_l2", site={"epoch": 5})


def test_a_domain_gives_its_defaults_under_the_site_file_and_the_flags(tmp_path: Path) -> None:
    from vadflow.tasks.detectors.settings import DOMAIN_DEFAULTS, family_settings
    from vadflow.tasks.site import SiteConfig
    from vadflow.tasks.training.train import detector_settings

    knn = DOMAIN_DEFAULTS["industrial"]["patch_knn"]
    assert family_settings("patch_knn", domain="industrial") == knn
    # The site file overrides the domain key by key, the flags override both.
    settings = family_settings(
        "patch_knn", domain="industrial", site={"window": 4}, flags={"features": "filters"}
    )
    assert settings == {**knn, "window": 4, "features": "filters"}
    assert family_settings("patch_knn", domain="pathology") == {}
    assert family_settings("ae_l2", domain="industrial") == {}  # no defaults for that family
    with pytest.raises(ValueError, match="unknown domain 'x-ray'; choose one of pathology"):
        family_settings("patch_knn", domain="x-ray")
    # Every domain default is a field of its family's config (a renamed field fails here).
    for families in DOMAIN_DEFAULTS.values():
        for family, defaults in families.items():
            create_detector(family, **defaults)

    # A site trains its domain's best family unless its file names others, and the nightly
    # flow's settings carry the domain's defaults.
    line = {"domain": "industrial", "source": str(tmp_path), "tiling": {"target_mpp": None}}
    line_site = SiteConfig(name="l", **line)
    tissue = SiteConfig(name="h", domain="pathology", source=str(tmp_path))
    named = SiteConfig(name="n", families=["padim"], **line)
    assert (line_site.families, tissue.families, named.families) == (
        ["patch_knn"],
        ["padim"],
        ["padim"],
    )
    assert detector_settings("patch_knn", line_site).items() >= knn.items()
    assert "features" not in detector_settings("patch_knn", tissue)


# -- one settings model ------------------------------------------------------------------------

# The fields each family's config.json holds besides TrainingConfig's, as before the configs
# shared a base: a model saved then must load now, and a new key must be a decision, not a
# side effect of editing a base class.
OWN_FIELDS = {
    "ae_l2": (
        "base_channels bottleneck latent_channels latent_top_fraction map_smoothing_sigma "
        "robust_trim_fraction robust_warmup_epochs score score_top_fraction tile_size"
    ),
    "ae_ssim": (
        "base_channels bottleneck latent_channels map_smoothing_sigma robust_trim_fraction "
        "robust_warmup_epochs score_top_fraction ssim_channels ssim_sigma ssim_window "
        "tile_size"
    ),
    "anogan": (
        "base_channels collapse_min_ratio collapse_patience feature_weight latent_dim "
        "latent_lr latent_steps map_smoothing_sigma tile_size val_search_steps val_tiles"
    ),
    "draem": (
        "anomaly_colour_match anomaly_edge_softness anomaly_max_blend anomaly_probability "
        "anomaly_sources anomaly_threshold base_channels depth focal_gamma map_smoothing_sigma "
        "recon_weight reconstruction tile_size"
    ),
    "fanogan": (
        "base_channels collapse_min_ratio collapse_patience encoder_epochs encoder_lr "
        "gp_weight kappa latent_dim map_smoothing_sigma n_critic score tile_size "
        "val_search_lr val_search_steps val_tiles"
    ),
    "mil": (
        "base_channels dropout norm passes slide_aggregate stages tile_size top_k warmup_epochs"
    ),
    "padim": (
        "backbone backbone_architecture backbone_sha256 backbone_weights base_channels "
        "contamination feature_pool features filter_window gaussian imagenet_upsample "
        "map_norm map_smoothing_sigma n_features pretext ridge robust score_top_fraction "
        "shrinkage temperature tile_size window"
    ),
    "patch_knn": (
        "backbone backbone_architecture backbone_sha256 backbone_weights base_channels "
        "contamination coreset_size feature_pool features filter_window imagenet_upsample knn "
        "map_norm map_smoothing_sigma max_bank_patches pretext projection_dim robust "
        "score_top_fraction temperature whiten window"
    ),
    "spatial_vae": (
        "base_channels beta bottleneck kl_warmup_epochs latent_channels latent_top_fraction "
        "map_smoothing_sigma n_samples recon_sigma robust_trim_fraction robust_warmup_epochs "
        "score score_mode score_top_fraction tile_size"
    ),
    "supervised_cnn": (
        "base_channels dropout hard_negative_epochs hard_negative_fraction "
        "hard_negative_lr_scale hard_negative_repeats negatives_per_epoch norm "
        "positive_fraction stages tile_size"
    ),
    "vae": (
        "base_channels beta bottleneck kl_warmup_epochs latent_dim latent_top_fraction "
        "map_smoothing_sigma n_samples recon_sigma robust_trim_fraction robust_warmup_epochs "
        "score score_mode score_top_fraction tile_size"
    ),
    "vaegan": (
        "adversarial_weight base_channels bottleneck collapse_min_ratio collapse_patience "
        "discriminator_lr kl_weight latent_channels map_smoothing_sigma score_top_fraction "
        "tile_size"
    ),
}


def test_the_pinned_field_lists_cover_every_family() -> None:
    assert set(OWN_FIELDS) == set(available_families())


@pytest.mark.parametrize("family", sorted(OWN_FIELDS))
def test_every_family_config_extends_the_shared_training_config(family: str, tmp_path) -> None:
    from vadflow.tasks.detectors.components.training import TrainingConfig

    config_cls = detector_class(family).config_cls
    assert issubclass(config_cls, TrainingConfig)
    shared = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert shared == {
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "patience",
        "min_delta",
        "grad_clip",
        "seed",
        "augment",
        "device",
    }
    # Saved keys are what they were: the shared fields plus the family's own.
    path = create_detector(family, device="cpu").save(tmp_path / family)
    saved = json.loads((path / "config.json").read_text())
    assert set(saved) == {"family"} | shared | set(OWN_FIELDS[family].split())
    # Every class between the family's config and the base re-declares an inherited field only
    # to give it another default.
    for cls in config_cls.__mro__:
        if not issubclass(cls, TrainingConfig) or cls is TrainingConfig:
            continue
        for name in cls.__dict__.get("__annotations__", {}):
            inherited = _inherited_default(cls, name)
            if inherited is not _NOT_INHERITED:
                own = cls.__dataclass_fields__[name].default
                assert own != inherited, f"{cls.__name__}.{name} repeats the default {own!r}"


_NOT_INHERITED = object()


def _inherited_default(cls: type, name: str) -> object:
    """The default of field `name` in the nearest base of `cls` that has it."""
    for base in cls.__mro__[1:]:
        fields = getattr(base, "__dataclass_fields__", {})
        if name in fields:
            return fields[name].default
    return _NOT_INHERITED
