"""The labelled baselines: supervised_cnn (tile labels, hard negatives) and mil (slide labels).

Fast tests check the pieces on generated tiles: hard-negative mining, the epochs it changes, the
top-k selection, the refusals. The slow ones train both families on a small synthetic pathology
site with lesion annotations and check slide AUROC on its test slides (slide score = max tile
probability), as issue 7 asks: >= 0.9 for the supervised classifier, >= 0.8 for mil.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadflow.tasks.detectors.mil import aggregate_bags, bag_offsets, top_k_per_bag
from vadflow.tasks.detectors.registry import (
    available_families,
    create_detector,
    detector_class,
    load_detector,
)
from vadflow.tasks.detectors.supervised_cnn import (
    LabelsRequiredError,
    epoch_index,
    mine_hard_negatives,
    sigmoid,
    tile_logits,
)
from vadflow.tasks.slides.ground_truth import ground_truth_mask
from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.synth.pathology import make_pathology_site
from vadflow.tasks.tiling import mask as masking
from vadflow.tasks.tiling.grid import coverage, tile_origins

TILE = 64  # px, read at level 1: 0.5 um/px on slides drawn at 0.25 um/px
LEVEL = 1
EXTENT = 128  # the tile's edge in level-0 px
MASK_DOWNSAMPLE = 16.0  # tissue mask at 4 um/px
TRUTH_DOWNSAMPLE = 8.0  # lesion mask cells of 8 level-0 px: 16 x 16 cells per tile

# Small and fast: the site's lesions are easy (darker, denser nuclei), the budget is a loaded
# 2-core machine.
SUPERVISED = {
    "base_channels": 8,
    "stages": 3,
    "batch_size": 32,
    "lr": 3e-3,
    "epochs": 3,
    "negatives_per_epoch": 200,
    "hard_negative_epochs": 1,
    "device": "cpu",
}
MIL = {
    "base_channels": 8,
    "stages": 3,
    "batch_size": 16,
    "top_k": 5,
    "passes": 3,
    "epochs": 12,
    "device": "cpu",
}


# -- generated tiles for the fast tests ------------------------------------------------------


def pink_and_purple(rng: np.random.Generator, n: int, tumour: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) uint8: pale pink noise, darker purple where `tumour` (n,) is True."""
    base = np.where(tumour[:, None, None, None], [0.45, 0.25, 0.55], [0.92, 0.75, 0.82])
    tiles = base + rng.normal(0, 0.06, (n, 32, 32, 3))
    return (np.clip(tiles, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def small_labelled() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 8 == 0  # 10 tumour tiles in 80
    return pink_and_purple(rng, 80, labels), labels


def tiny(family: str, **extra):
    fields = {"tile_size": 32, "base_channels": 8, "stages": 2, "batch_size": 16, "device": "cpu"}
    return create_detector(family, **{**fields, **extra})


# -- hard-negative mining --------------------------------------------------------------------


def test_mining_picks_exactly_the_highest_scored_normals():
    labels = np.array([True, False, False, True, False, False, False, False, False, False])
    scores = np.array([0.99, 0.10, 0.80, np.nan, 0.30, 0.95, 0.20, 0.80, 0.05, 0.60])
    # 8 normals; 30 % of them is 2.4 -> 3 tiles, highest first; the tie at 0.80 keeps index order.
    assert mine_hard_negatives(scores, labels, 0.3).tolist() == [5, 2, 7]
    assert mine_hard_negatives(scores, labels, 0.25).tolist() == [5, 2]
    assert mine_hard_negatives(scores, labels, 0.0).tolist() == []
    everything = mine_hard_negatives(scores, labels, 1.0)
    assert sorted(everything.tolist()) == np.flatnonzero(~labels).tolist()
    assert np.all(np.diff(scores[everything]) <= 0)  # highest first


def test_mining_refuses_bad_input():
    labels = np.array([False, False, True])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        mine_hard_negatives(np.zeros(3), labels[:2], 0.5)
    with pytest.raises(ValueError, match="fraction"):
        mine_hard_negatives(np.zeros(3), labels, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        mine_hard_negatives(np.array([0.1, np.nan, 0.3]), labels, 0.5)


def test_epoch_index_balances_classes_and_adds_each_mined_tile_repeats_times():
    labels = np.zeros(100, dtype=bool)
    labels[:5] = True
    rng = np.random.default_rng(0)
    plain = epoch_index(labels, 0.5, rng)
    counts = np.bincount(plain, minlength=100)
    assert (counts[5:] == 1).all()  # every normal tile once
    assert counts[:5].sum() == 95 and counts[:5].min() >= 19  # tumour cycled to half the epoch

    mined = np.array([40, 7, 93])
    with_hard = epoch_index(labels, 0.5, rng, hard_negatives=mined, repeats=3)
    extra = np.bincount(with_hard, minlength=100) - counts
    assert extra[mined].tolist() == [3, 3, 3]
    assert np.delete(extra, mined).sum() == 0

    sampled = epoch_index(labels, 0.5, rng, negatives_per_epoch=20)
    sampled_counts = np.bincount(sampled, minlength=100)
    assert sampled_counts[5:].sum() == 20 and sampled_counts[5:].max() == 1
    assert sampled_counts[:5].sum() == 20 and (sampled_counts[:5] > 0).all()


def test_hard_negative_round_mines_round_one_top_normals_and_retrains_on_them(
    small_labelled: tuple[np.ndarray, np.ndarray],
):
    tiles, labels = small_labelled
    settings = {"epochs": 2, "hard_negative_fraction": 0.1, "hard_negative_repeats": 4}
    detector = tiny("supervised_cnn", hard_negative_epochs=2, **settings)
    seen: list[int] = []
    report = detector.fit_labelled(
        tiles[:64], labels[:64], tiles[64:], labels[64:], on_epoch=lambda e, *_: seen.append(e)
    )
    assert report.epochs == 4 and seen == [1, 2, 3, 4]
    record = detector.hard_negatives
    assert record is not None

    # The scores are round one's: the same run stopped after round one scores the same.
    round_one = tiny("supervised_cnn", hard_negative_epochs=0, **settings)
    round_one.fit_labelled(tiles[:64], labels[:64], tiles[64:], labels[64:])
    normals = np.flatnonzero(~labels[:64])
    expected = tile_logits(round_one.model, tiles[normals], round_one.device, 16)
    np.testing.assert_allclose(record.scores[normals], expected, rtol=0, atol=1e-6)
    assert np.isnan(record.scores[labels[:64]]).all()

    # The mined tiles are the top 10 % of the normals by that score.
    assert len(record.mined) == math.ceil(0.1 * len(normals)) == 6
    assert not labels[record.mined].any()
    others = np.setdiff1d(normals, record.mined)
    assert record.scores[record.mined].min() >= record.scores[others].max()

    # Round one walked each normal tile once per epoch; round two adds 4 copies of each mined.
    assert record.round_one_epochs == 2 and len(record.epochs) == 4
    for epoch, index in enumerate(record.epochs, start=1):
        counts = np.bincount(index, minlength=64)
        hard = 4 if epoch > 2 else 0
        assert (counts[record.mined] == 1 + hard).all()
        assert (counts[others] == 1).all()
        assert counts[labels[:64]].sum() == len(normals)  # tumour tiles: half the plain epoch


def test_supervised_fit_resumes_from_its_checkpoints(
    small_labelled: tuple[np.ndarray, np.ndarray], tmp_path: Path
):
    tiles, labels = small_labelled
    args = (tiles[:64], labels[:64], tiles[64:], labels[64:])
    first = tiny("supervised_cnn", epochs=2, hard_negative_epochs=1)
    report = first.fit_labelled(*args, checkpoint_dir=tmp_path)
    assert (tmp_path / "round1" / "last.pt").is_file()
    assert (tmp_path / "round2" / "last.pt").is_file()
    again = tiny("supervised_cnn", epochs=2, hard_negative_epochs=1)
    resumed = again.fit_labelled(*args, resume_from=tmp_path)  # both rounds finished: no training
    assert resumed.epochs == report.epochs == 3
    assert resumed.train_loss == report.train_loss
    np.testing.assert_array_equal(again.hard_negatives.mined, first.hard_negatives.mined)
    torch.testing.assert_close(again.score(tiles).tile_score, first.score(tiles).tile_score)


# -- mil's pieces ----------------------------------------------------------------------------


def test_top_k_per_bag_and_slide_aggregates():
    probabilities = np.array([0.1, 0.9, 0.5, 0.2, 0.7, 0.3])
    offsets = bag_offsets([3, 1, 2])
    assert offsets.tolist() == [0, 3, 4, 6]
    assert top_k_per_bag(probabilities, offsets, 2).tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(aggregate_bags(probabilities, offsets, "max", 2), [0.9, 0.2, 0.7])
    np.testing.assert_allclose(
        aggregate_bags(probabilities, offsets, "mean_topk", 2), [0.7, 0.2, 0.5]
    )


def test_mil_learns_from_slide_labels_on_generated_bags(tmp_path: Path):
    rng = np.random.default_rng(3)
    bags, labels = [], []
    for i in range(8):
        tumour = np.zeros(12, dtype=bool)
        if i % 2:
            tumour[rng.choice(12, 3, replace=False)] = True  # a few tumour tiles per slide
        bags.append(pink_and_purple(rng, 12, tumour))
        labels.append(bool(i % 2))
    detector = tiny("mil", top_k=2, passes=4, epochs=10, lr=3e-3)
    report = detector.fit_bags(bags[:6], labels[:6], val_bags=bags[6:], val_labels=labels[6:])
    assert report.epochs >= 1 and len(report.val_loss) == report.epochs
    slide = detector.predict_slides(bags)
    assert roc_auc_score(labels, slide) == 1.0
    # The slide prediction is the top tile's probability; the score path gives its logit.
    top_logit = detector.score(bags[1]).tile_score.max().item()
    np.testing.assert_allclose(slide[1], sigmoid(np.array(top_logit)), atol=1e-6)

    loaded = load_detector(detector.save(tmp_path / "mil"))
    torch.testing.assert_close(loaded.score(bags[1]).tile_score, detector.score(bags[1]).tile_score)


# -- the interface ---------------------------------------------------------------------------


def test_every_family_says_what_it_learns_from():
    assert detector_class("supervised_cnn").supervision == "tile"
    assert detector_class("mil").supervision == "slide"
    assert detector_class("ae_l2").supervision == "none"
    for family in available_families():
        assert detector_class(family).supervision in ("none", "tile", "slide")


@pytest.mark.parametrize(
    ("family", "method"), [("supervised_cnn", "fit_labelled"), ("mil", "fit_bags")]
)
def test_fit_on_normal_tiles_alone_is_refused(family: str, method: str, small_labelled):
    tiles, _ = small_labelled
    with pytest.raises(LabelsRequiredError, match=method):
        tiny(family).fit(tiles[:40], tiles[40:])


def test_few_tumour_tiles_draw_a_warning(small_labelled):
    tiles, labels = small_labelled  # 10 tumour tiles
    quick = {"epochs": 1, "hard_negative_epochs": 0}
    with pytest.warns(UserWarning, match="only 10 tumour tiles"):
        tiny("supervised_cnn", **quick).fit_labelled(tiles, labels, tiles, labels)
    half = np.arange(80) % 2 == 0  # 40 tumour tiles: enough, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tiny("supervised_cnn", **quick).fit_labelled(tiles, half, tiles, half)


def test_one_class_training_data_is_refused(small_labelled):
    tiles, labels = small_labelled
    with pytest.raises(ValueError, match="0 tumour"):
        tiny("supervised_cnn").fit_labelled(tiles, np.zeros(80, bool), tiles, labels)
    with pytest.raises(ValueError, match="0 tumour and 2 normal"):
        tiny("mil").fit_bags([tiles[:40], tiles[40:]], [False, False])
    with pytest.raises(ValueError, match="tile_size=32"):
        tiny("mil").fit_bags([np.zeros((4, 16, 16, 3), np.uint8)], [True])


@pytest.mark.parametrize("family", ["supervised_cnn", "mil"])
def test_map_is_the_tile_logit_and_survives_save_load(family: str, small_labelled, tmp_path: Path):
    tiles, labels = small_labelled
    detector = tiny(family, epochs=1)
    if family == "mil":
        detector.fit_bags([tiles[:40], tiles[40:]], [True, False])
    else:
        detector.fit_labelled(tiles[:64], labels[:64], tiles[64:], labels[64:])
    out = detector.score(tiles[:5])
    assert out.anomaly_map.shape == (5, 1, 32, 32) and out.tile_score.shape == (5,)
    # The score is the tumour logit (no float32 ties at probability 1.0): the same numbers the
    # training loop ranks tiles by.
    logits = tile_logits(detector.model, tiles[:5], detector.device, 5)
    np.testing.assert_allclose(out.tile_score.numpy(), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.anomaly_map, out.tile_score[:, None, None, None].expand(5, 1, 32, 32)
    )
    loaded = load_detector(detector.save(tmp_path / family))
    assert loaded.config == detector.config
    torch.testing.assert_close(loaded.score(tiles[:5]).tile_score, out.tile_score, rtol=0, atol=0)


# -- a small synthetic site with labels ------------------------------------------------------


@dataclass
class SlideTiles:
    name: str
    tumour: bool
    train: bool
    tiles: np.ndarray  # (n, TILE, TILE, 3) uint8, tissue tiles on a non-overlapping grid
    label_fraction: np.ndarray  # (n,) share of each tile inside an annotated lesion
    lesion_tiles: np.ndarray  # tumour slides: half-overlapping tiles with label fraction >= 0.5


def read_slide_tiles(path: Path, annotation: Path | None, step: int) -> tuple[np.ndarray, ...]:
    """Tissue tiles (>= 50 % tissue) at `step` level-0 px, and their lesion label fractions."""
    with Slide(path) as slide:
        width, height = slide.width, slide.height
        thumb = slide.thumbnail(MASK_DOWNSAMPLE)
        tissue_mask = masking.tissue_mask(
            thumb, masking.mask_preset("he"), um_per_px=0.25 * MASK_DOWNSAMPLE
        )
        xs, ys = tile_origins(width, height, EXTENT, step)
        keep = coverage(tissue_mask, xs, ys, EXTENT, MASK_DOWNSAMPLE) >= 0.5
        xs, ys = xs[keep], ys[keep]
        truth = ground_truth_mask(
            None if annotation is None else str(annotation), width, height, TRUTH_DOWNSAMPLE
        )
        fraction = coverage(truth, xs, ys, EXTENT, TRUTH_DOWNSAMPLE)
        tiles = np.zeros((len(xs), TILE, TILE, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
            tiles[i] = slide.read_tile(x, y, EXTENT, LEVEL, TILE)
    return tiles, fraction


@pytest.fixture(scope="module")
def labelled_site(tmp_path_factory) -> list[SlideTiles]:
    """6 normal + 6 tumour training slides, 5 + 5 test slides, 1536 x 1536 at 0.25 um/px."""
    site = make_pathology_site(
        tmp_path_factory.mktemp("baselines"),
        "labelled",
        n_train_normal=6,
        n_train_tumor=6,
        n_test_normal=5,
        n_test_tumor=5,
        width=1536,
        height=1536,
        seed=0,
    )
    reference = dict(
        line.split(",") for line in (site / "testing" / "reference.csv").read_text().split()[1:]
    )
    slides = []
    for path in sorted([*site.glob("training/*/*.tif"), *site.glob("testing/images/*.tif")]):
        annotation = site / "lesion_annotations" / f"{path.stem}.xml"
        annotation = annotation if annotation.is_file() else None
        tumour = annotation is not None
        assert tumour == (path.parent.name == "tumor" or reference.get(path.stem) == "Tumor")
        tiles, fraction = read_slide_tiles(path, annotation, EXTENT)
        assert len(tiles), f"{path.name} has no tissue tile"
        lesion = np.zeros((0, TILE, TILE, 3), dtype=np.uint8)
        if tumour:
            # Half-overlapping tiles: a few more (shifted) views of the few lesion tiles.
            dense, dense_fraction = read_slide_tiles(path, annotation, EXTENT // 2)
            lesion = dense[dense_fraction >= 0.5]
        slides.append(
            SlideTiles(path.stem, tumour, "training" in path.parts, tiles, fraction, lesion)
        )
    return slides


def slide_auroc(slides: list[SlideTiles], detector) -> float:
    """Test-slide AUROC with slide score = max tile probability (the heatmap's max)."""
    test = [s for s in slides if not s.train]
    assert sum(s.tumour for s in test) == 5 and len(test) == 10
    scores = [detector.score(s.tiles).tile_score.max().item() for s in test]
    return roc_auc_score([s.tumour for s in test], scores)


@pytest.mark.slow
def test_supervised_cnn_separates_tumour_slides(labelled_site: list[SlideTiles]):
    train = [s for s in labelled_site if s.train]
    # Tumour: lesion tiles (label fraction >= 0.5); normal: every tile of the normal slides and
    # the lesion-free tiles of the tumour slides. Tiles on a lesion's edge are left out.
    positives = np.concatenate([s.lesion_tiles for s in train if s.tumour])
    negatives = np.concatenate([s.tiles[s.label_fraction == 0] for s in train])
    tiles = np.concatenate([positives, negatives])
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    held_out = np.random.default_rng(0).random(len(tiles)) < 0.2
    assert labels[~held_out].sum() >= 30 and labels[held_out].sum() >= 5

    detector = create_detector("supervised_cnn", **SUPERVISED)
    report = detector.fit_labelled(
        tiles[~held_out], labels[~held_out], tiles[held_out], labels[held_out]
    )
    assert report.epochs == 4 and not report.diverged
    assert len(detector.hard_negatives.mined) == math.ceil(0.1 * (~labels[~held_out]).sum())
    assert slide_auroc(labelled_site, detector) >= 0.9


@pytest.mark.slow
def test_mil_separates_tumour_slides_from_slide_labels_only(labelled_site: list[SlideTiles]):
    train = [s for s in labelled_site if s.train]
    detector = create_detector("mil", **MIL)
    report = detector.fit_bags([s.tiles for s in train], [s.tumour for s in train])
    assert not report.diverged
    assert slide_auroc(labelled_site, detector) >= 0.8
