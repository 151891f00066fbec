"""Hard synthetic mode: lesions at the host's stain, normal tissue with hard parts, and the
honest results table (tasks/benchmark/) built on it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pyvips
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from vadflow.tasks.benchmark import (
    TILE_POSITIVE,
    SiteSize,
    benchmark_detectors,
    benchmark_families,
    build_hard_site,
    contaminated_training,
    format_table,
    load_benchmark_tiles,
    run_family,
    tile_auroc,
)
from vadflow.tasks.detectors.registry import available_families, detector_class
from vadflow.tasks.synth.industrial import make_industrial_site
from vadflow.tasks.synth.pathology import (
    _lesion_field,
    _plan_slide_hard,
    _tissue_field,
    write_synthetic_slide,
)

# Ruifrok & Johnston's stain vectors, as the generator's default stain.
_HE = np.stack([np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])])
_UNMIX = np.linalg.pinv((_HE / np.linalg.norm(_HE, axis=1, keepdims=True)).T)  # (2, 3)


def _pixels(path: Path) -> np.ndarray:
    image = pyvips.Image.new_from_file(str(path))
    array = np.ndarray(
        buffer=image.write_to_memory(),
        dtype=np.uint8,
        shape=(image.height, image.width, image.bands),
    )
    return array[..., 0] if image.bands == 1 else array


def _stain(tiles: np.ndarray) -> np.ndarray:
    """(N, T, T, 3) uint8 -> (N, T, T, 2) haematoxylin and eosin optical density."""
    density = -np.log((tiles.astype(np.float64) + 1) / 256)
    return density @ _UNMIX.T


def tile_statistics(tiles: np.ndarray) -> dict[str, np.ndarray]:
    """Per tile: mean RGB, mean H and E density, and a nuclear density proxy.

    The proxy is the share of pixels whose haematoxylin density is above 0.45: nuclei are far
    above it, cytoplasm and stroma well below, whatever the lesion does to the mean.
    """
    stain = _stain(tiles)
    return {
        "rgb": tiles.reshape(len(tiles), -1, 3).mean(axis=1),
        "he": stain.reshape(len(tiles), -1, 2).mean(axis=1),
        "nuclear": (stain[..., 0] > 0.45).reshape(len(tiles), -1).mean(axis=1),
    }


WORKING_MPP = 0.5  # um/px of the tiles, as the pipeline's default tiling
TISSUE_OD = 0.3  # summed RGB optical density above which a pixel counts as tissue
MIN_TISSUE = 0.5  # tiles with less tissue are not used


def _cut_tiles(
    slide_path: Path,
    mask_path: Path | None = None,
    *,
    tile_size: int = 64,
    working_mpp: float = WORKING_MPP,
    min_tissue: float = MIN_TISSUE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping tissue tiles of one slide at `working_mpp`, an oracle independent of
    the pipeline's tiler.

    Returns tiles (N, T, T, 3) uint8, lesion masks (N, T, T) bool (all False without
    `mask_path`) and tissue masks (N, T, T) bool. The whole slide is read at the working
    resolution at once, so this is for small (synthetic) slides only.
    """
    from vadflow.tasks.slides.ground_truth import ground_truth_mask
    from vadflow.tasks.slides.reader import Slide, resize_rgb

    with Slide(slide_path) as slide:
        downsample = working_mpp / (slide.mpp or working_mpp)
        level = slide.best_level_for_downsample(downsample)
        info = slide.levels[level]
        image = np.array(slide.read_region(level, 0, 0, info.width, info.height))
        width0, height0 = slide.width, slide.height
    shape = (math.ceil(height0 / downsample), math.ceil(width0 / downsample))
    if image.shape[:2] != shape:
        image = resize_rgb(image, shape[1], shape[0])
    if mask_path is not None:
        lesion = ground_truth_mask(str(mask_path), width0, height0, downsample) >= 0.5
    else:
        lesion = np.zeros(shape, dtype=bool)
    density = -np.log((image.astype(np.float32) + 1) / 256).sum(axis=-1)  # (H, W)
    tissue = density > TISSUE_OD
    tiles, masks, tissues = [], [], []
    for y in range(0, shape[0] - tile_size + 1, tile_size):
        for x in range(0, shape[1] - tile_size + 1, tile_size):
            window = np.s_[y : y + tile_size, x : x + tile_size]
            if tissue[window].mean() < min_tissue:
                continue
            tiles.append(image[window])
            masks.append(lesion[window])
            tissues.append(tissue[window])
    n = len(tiles)
    t = tile_size
    return (
        np.stack(tiles) if n else np.zeros((0, t, t, 3), np.uint8),
        np.stack(masks) if n else np.zeros((0, t, t), bool),
        np.stack(tissues) if n else np.zeros((0, t, t), bool),
    )


def _lesion_and_normal_tiles(folder: Path, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Tissue tiles fully inside a lesion and lesion-free ones, from three slides with lesions."""
    lesion, normal = [], []
    for seed in (100, 101, 102):
        slide, mask = folder / f"{mode}-{seed}.tif", folder / f"{mode}-{seed}-mask.tif"
        write_synthetic_slide(
            slide, width=3072, height=2048, n_lesions=3, seed=seed, mask_path=mask, mode=mode
        )
        tiles, masks, tissue = _cut_tiles(slide, mask)
        fraction = masks.reshape(len(masks), -1).mean(axis=1)
        # Tissue all over, so glass at a tissue edge does not lighten the normal group.
        inside = tissue.reshape(len(tissue), -1).mean(axis=1) >= 0.9
        lesion.append(tiles[inside & (fraction >= 0.9)])
        normal.append(tiles[inside & (fraction == 0)])
    return np.concatenate(lesion), np.concatenate(normal)


@pytest.fixture(scope="module")
def hard_tiles(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    return _lesion_and_normal_tiles(tmp_path_factory.mktemp("hard"), "hard")


def _colour_classifier_auroc(lesion: np.ndarray, normal: np.ndarray) -> float:
    """Cross-validated AUROC of a logistic regression on each tile's mean colour."""
    features = np.concatenate([tile_statistics(lesion)["rgb"], tile_statistics(normal)["rgb"]])
    labels = np.r_[np.ones(len(lesion)), np.zeros(len(normal))]
    scores = cross_val_predict(
        LogisticRegression(max_iter=1000), features, labels, cv=5, method="predict_proba"
    )[:, 1]
    return float(roc_auc_score(labels, scores))


def test_hard_lesions_keep_the_hosts_colour_but_not_its_nuclei(hard_tiles):
    lesion, normal = hard_tiles
    assert len(lesion) >= 15 and len(normal) >= 100
    ours, host = tile_statistics(lesion), tile_statistics(normal)
    # Mean colour and mean stain amounts: within a small distance of normal tissue's ...
    assert np.linalg.norm(ours["rgb"].mean(0) - host["rgb"].mean(0)) < 6.0
    assert np.abs(ours["he"].mean(0) - host["he"].mean(0)).max() < 0.04
    # ... well inside the spread of normal tiles, so colour alone is near chance ...
    assert _colour_classifier_auroc(lesion, normal) < 0.7
    # ... while the nuclei give the lesion away.
    labels = np.r_[np.ones(len(lesion)), np.zeros(len(normal))]
    nuclear = np.r_[ours["nuclear"], host["nuclear"]]
    assert roc_auc_score(labels, nuclear) > 0.9
    assert ours["nuclear"].mean() > 1.5 * host["nuclear"].mean()


def test_easy_lesions_are_told_apart_by_colour(tmp_path: Path):
    # The contrast that makes hard mode hard: in easy mode colour alone finds the lesion.
    lesion, normal = _lesion_and_normal_tiles(tmp_path, "easy")
    assert _colour_classifier_auroc(lesion, normal) > 0.9


def test_hard_normal_tissue_has_fat_cracks_folds_and_bands():
    """Over a few slide plans, each hard part of normal tissue turns up."""
    seen = {"vacuoles": 0, "cracks": 0, "folds": 0, "bands": 0}
    for seed in range(6):
        rng = np.random.default_rng(seed)
        plan = _plan_slide_hard(rng, 2048, 1536, 0.25, 8, 0, 1.0)
        assert plan.hard is not None
        seen["vacuoles"] += len(plan.hard.vacuoles) > 0
        seen["cracks"] += bool(plan.fields[6].max() > 0)
        # A fold doubles the nuclei (density 2), a collagen band thins them (< 0.5 in tissue).
        tissue = plan.alpha > 0.99
        seen["folds"] += bool((plan.hard.density[tissue] > 1.5).any())
        seen["bands"] += bool((plan.hard.density[tissue] < 0.5).any())
    assert all(count >= 1 for count in seen.values()), seen


def test_hard_slide_pixels_show_holes_and_folds(tmp_path: Path):
    """Rendered: glass holes inside the tissue (fat, cracks) and a darker tail (folds)."""
    holes, dark = [], []
    for mode in ("easy", "hard"):
        shares, tails = [], []
        for seed in (1, 2, 3):
            path = tmp_path / f"{mode}-{seed}.tif"
            write_synthetic_slide(path, width=1024, height=768, seed=seed, mode=mode)
            rgb = _pixels(path)[::2, ::2]
            tissue = -np.log((rgb.astype(np.float64) + 1) / 256).sum(-1) > 0.3
            filled = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, iterations=2))
            shares.append((filled & ~tissue).sum() / filled.sum())
            stain = _stain(rgb[None])[0]
            tails.append(np.percentile(stain[..., 1][tissue], 99))
        holes.append(max(shares))
        dark.append(max(tails))
    assert holes[1] > max(0.01, 3 * holes[0])
    assert dark[1] > dark[0]


def test_hard_lesion_sizes_span_isolated_cells_to_macro_metastases():
    """Equivalent diameters over many slides' lesion geometry: from isolated-cell clusters
    (< 200 um) to lesions as large as the tissue of a 2 x 1.5 mm slide allows."""
    width, height, mpp, cell = 8192, 6144, 0.25, 8
    shape = (height // cell + 1, width // cell + 1)
    grid_y = (np.arange(shape[0], dtype=np.float32) + 0.5) * cell - 0.5
    grid_x = (np.arange(shape[1], dtype=np.float32) + 0.5) * cell - 0.5
    yy, xx = np.meshgrid(grid_y, grid_x, indexing="ij")
    diameters = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        _, tissue = _tissue_field(rng, shape, yy, xx, width, height, cell)
        _, outlines = _lesion_field(rng, tissue, yy, xx, width, height, cell, 3, hard_mpp=mpp)
        for outline in outlines:
            x, y = outline[:, 0], outline[:, 1]
            area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # px^2
            diameters.append(2 * math.sqrt(area / math.pi) * mpp)  # um
    assert min(diameters) < 200
    assert max(diameters) > 500
    assert max(diameters) > 10 * min(diameters)


def test_hard_mode_is_deterministic_and_strength_changes_texture_only(tmp_path: Path):
    kwargs = dict(width=768, height=640, n_lesions=1, seed=4, mode="hard")
    write_synthetic_slide(tmp_path / "a.tif", mask_path=tmp_path / "am.tif", **kwargs)
    write_synthetic_slide(tmp_path / "b.tif", mask_path=tmp_path / "bm.tif", **kwargs)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    write_synthetic_slide(
        tmp_path / "c.tif", mask_path=tmp_path / "cm.tif", lesion_strength=0.0, **kwargs
    )
    np.testing.assert_array_equal(_pixels(tmp_path / "am.tif"), _pixels(tmp_path / "cm.tif"))
    assert not np.array_equal(_pixels(tmp_path / "a.tif"), _pixels(tmp_path / "c.tif"))
    write_synthetic_slide(tmp_path / "e.tif", **{**kwargs, "mode": "easy"})
    assert not np.array_equal(_pixels(tmp_path / "a.tif"), _pixels(tmp_path / "e.tif"))


def test_unknown_mode_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown mode 'medium'"):
        write_synthetic_slide(tmp_path / "x.tif", width=256, height=256, mode="medium")
    with pytest.raises(ValueError, match="unknown mode"):
        make_industrial_site(tmp_path, "x", n_train=1, mode="medium")


# -- industrial ---------------------------------------------------------------------------


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def _high_frequency(image: np.ndarray) -> np.ndarray:
    """(H, W) energy of the texture's fine detail: the image minus its local mean, squared."""
    grey = image.mean(-1)
    return (grey - ndimage.uniform_filter(grey, 5)) ** 2


@pytest.mark.parametrize("category", ["fabric", "wood"])
def test_hard_industrial_defects_keep_the_texture_colour(tmp_path: Path, category: str):
    site = make_industrial_site(
        tmp_path,
        f"hard-{category}",
        category=category,
        n_train=1,
        n_test_good=1,
        n_test_per_defect=6,
        image_size=96,
        seed=5,
        mode="hard",
    )
    root = site / category
    assert sorted(p.name for p in (root / "test").iterdir()) == ["good", "scratch", "smudge"]
    for defect in ("scratch", "smudge"):
        for image_path in sorted((root / "test" / defect).glob("*.png")):
            image = _load(image_path)
            mask = _load(root / "ground_truth" / defect / f"{image_path.stem}_mask.png")[..., 0]
            inside = mask > 0
            assert inside.any()
            ring = ndimage.binary_dilation(inside, iterations=4) & ~inside
            # The texture's own colour: easy defects differ by > 40 here (tests/test_synth.py).
            contrast = np.abs(image[inside].mean(0) - image[ring].mean(0)).sum()
            assert contrast < 15, (image_path, contrast)
            if defect == "smudge":
                # What gives a smudge away is the weave or grain it blurs out.
                energy = _high_frequency(image)
                assert energy[inside].mean() < 0.6 * energy[ring].mean(), image_path


def test_hard_industrial_refuses_easy_only_defects(tmp_path: Path):
    with pytest.raises(ValueError, match="hard mode"):
        make_industrial_site(tmp_path, "x", n_train=1, defects=("stain",), mode="hard")


# -- the results table ----------------------------------------------------------------------

TINY = SiteSize(width=2048, height=1536, n_train_normal=2, n_test_normal=1, n_test_tumor=1)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hard_site(tmp_path_factory.mktemp("bench"), TINY, seed=3)


def test_benchmark_tiles_are_labelled_from_the_ground_truth(tiny_site: Path, tmp_path: Path):
    data = load_benchmark_tiles(tiny_site, tile_size=32, work_dir=tmp_path)
    test = data.test
    assert data.train.shape[1:] == (32, 32, 3) and len(data.val) > 0
    assert test.label_fraction.shape[0] == test.slide.shape[0] > 0
    labels = dict(data.slides.select("slide_id", "label").iter_rows())
    tumours = [labels[name] == "anomalous" for name in test.slide_names]
    assert sorted(tumours) == [False, True]
    assert sorted(data.slides["split"].unique()) == ["test", "val"]
    tumour = tumours.index(True)
    # Lesion pixels only on the tumour slide, and some tiles lie wholly inside a lesion.
    assert test.label_fraction[test.slide != tumour].max() == 0
    assert test.label_fraction[test.slide == tumour].max() == 1.0
    # A perfect score and its inverse give tile AUROC 1 and 0.
    assert tile_auroc(test, test.label_fraction) == 1.0
    assert tile_auroc(test, -test.label_fraction) == 0.0


def test_benchmark_reports_every_family_and_flags_failures(
    tiny_site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from vadflow.tasks.detectors.padim import PadimDetector

    def broken_fit(self, train, val, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(PadimDetector, "fit", broken_fit)
    rows = benchmark_detectors(
        ["patch_knn", "padim"], TINY, epochs_budget=1, seed=3, tile_size=32, device="cpu"
    )
    assert [row.family for row in rows] == ["patch_knn", "padim"]
    knn, padim = rows
    assert knn.direction in ("ok", "inverted") and not knn.error
    assert 0.0 <= knn.tile_auroc <= 1.0 and knn.seconds > 0
    # Slide AUC, FROC and pixel AUROC come from the nightly flow's own scoring and evaluation.
    for value in (knn.slide_auc, knn.froc, knn.pixel_auroc):
        assert 0.0 <= value <= 1.0
    assert knn.direction == ("inverted" if knn.tile_auroc < 0.5 else "ok")
    assert padim.direction == "failed" and "RuntimeError: boom" in padim.error
    assert math.isnan(padim.tile_auroc)
    printed = capsys.readouterr().out
    assert "patch_knn" in printed and "failed" in printed
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| family | tile AUROC")
    assert "| padim | n/a | n/a | n/a | n/a |" in table


def test_benchmark_runs_every_family_and_skips_labelled_ones_without_labels(
    tiny_site: Path, tmp_path: Path
):
    chosen = benchmark_families()
    assert sorted(chosen) == sorted(available_families())
    labelled = [f for f in chosen if detector_class(f).supervision != "none"]
    assert labelled and chosen[-len(labelled) :] == labelled  # unsupervised ones first
    data = load_benchmark_tiles(tiny_site, tile_size=32, work_dir=tmp_path)  # no tumour to learn
    for family in labelled:
        row = run_family(family, data, epochs=1, tile_size=32, seed=0, device="cpu")
        # the train stage's own reason, e.g. "it needs both tumour and normal training slides"
        assert row.direction == "skipped" and "it needs" in row.error, row


def test_the_shared_budget_or_each_familys_own():
    from vadflow.tasks.benchmark import benchmark_settings

    shared = benchmark_settings("supervised_cnn", epochs=3, tile_size=64, seed=1, device="cpu")
    assert shared == {"epochs": 3, "tile_size": 64, "seed": 1, "device": "cpu"}
    own = benchmark_settings("supervised_cnn", epochs=None, tile_size=64, seed=1, device="cpu")
    assert own == {"tile_size": 64, "seed": 1, "device": "cpu"}  # the config's epochs stay
    # --features reaches the feature families only, and names the row's variant.
    knn = benchmark_settings(
        "patch_knn", epochs=3, tile_size=64, seed=1, device="cpu", features="imagenet"
    )
    assert knn["features"] == "imagenet"
    ae = benchmark_settings("ae_l2", epochs=3, tile_size=64, seed=1, device="cpu", features="cnn")
    assert "features" not in ae
    # --robust too: the feature families' robust mode, the trained families' trimmed loss.
    knn = benchmark_settings("padim", epochs=3, tile_size=64, seed=1, device="cpu", robust=True)
    assert knn["robust"] is True and "robust_trim_fraction" not in knn
    ae = benchmark_settings("ae_l2", epochs=3, tile_size=64, seed=1, device="cpu", robust=True)
    assert "robust" not in ae and ae["robust_trim_fraction"] == 0.1
    plain = benchmark_settings("ae_l2", epochs=3, tile_size=64, seed=1, device="cpu")
    assert "robust_trim_fraction" not in plain


def test_benchmark_refuses_unknown_families_and_sizes():
    with pytest.raises(KeyError, match="no_such_family"):
        benchmark_detectors(["no_such_family"])
    with pytest.raises(ValueError, match="unknown size"):
        build_hard_site(Path("unused"), "gigantic")


def test_synth_cli_writes_hard_sites_and_refuses_unknown_modes(tmp_path: Path):
    from typer.testing import CliRunner

    from vadflow.flows.cli import app
    from vadflow.tasks.synth.pathology import make_pathology_site

    runner = CliRunner()
    args = ["--width", "1024", "--height", "1024", "--train-normal", "1", "--test-normal", "0"]
    made = runner.invoke(
        app, ["synth", "pathology", str(tmp_path / "cli"), *args, "--mode", "hard"]
    )
    assert made.exit_code == 0, made.output
    geometry = dict(n_train_normal=1, n_test_normal=0, n_test_tumor=3, width=1024, height=1024)
    hard = make_pathology_site(tmp_path / "hard", **geometry, mode="hard")
    easy = make_pathology_site(tmp_path / "easy", **geometry, mode="easy")
    written = (tmp_path / "cli" / "site-a" / "testing" / "images" / "test_000.tif").read_bytes()
    assert written == (hard / "testing" / "images" / "test_000.tif").read_bytes()
    assert written != (easy / "testing" / "images" / "test_000.tif").read_bytes()
    refused = runner.invoke(app, ["synth", "industrial", str(tmp_path), "--mode", "bogus"])
    assert refused.exit_code == 2 and "'bogus' is not one of 'easy', 'hard'" in refused.output


def test_contamination_replaces_normal_training_slides_by_tumour_slides():
    normal, tumour = (
        ["normal_003", "normal_001", "normal_002", "normal_004"],
        ["tumor_002", "tumor_001"],
    )
    assert contaminated_training(normal, tumour, 0.0) == (sorted(normal), [])
    train, dirty = contaminated_training(normal, tumour, 0.1)  # 10 % of 4 rounds up to one slide
    assert dirty == ["tumor_001"] and train == [
        "normal_001",
        "normal_002",
        "normal_003",
        "tumor_001",
    ]
    train, dirty = contaminated_training(normal, tumour, 0.5)
    assert dirty == ["tumor_001", "tumor_002"] and len(train) == 4
    with pytest.raises(ValueError, match="needs 3 tumour training slides, the site has 2"):
        contaminated_training(normal, tumour, 0.75)
    with pytest.raises(ValueError, match="contamination must be in"):
        contaminated_training(normal, tumour, 1.0)


def test_contaminated_benchmark_trains_on_a_tumour_slide(tmp_path: Path):
    size = SiteSize(2048, 1536, n_train_normal=3, n_test_normal=1, n_test_tumor=1, n_train_tumor=1)
    site = build_hard_site(tmp_path, size, seed=2)
    clean = load_benchmark_tiles(site, tile_size=64, work_dir=tmp_path / "clean")
    dirty = load_benchmark_tiles(site, tile_size=64, work_dir=tmp_path / "dirty", contamination=0.1)
    assert clean.contaminated == () and len(dirty.contaminated) == 1
    (tumour,) = dirty.contaminated
    assert tumour in dirty.train_slides and tumour not in clean.train_slides
    assert len(dirty.train_slides) == len(clean.train_slides)
    manifests = {**clean.manifests, **dirty.manifests}
    lesion = manifests[tumour]["label_fraction"].to_numpy()
    assert (lesion >= TILE_POSITIVE).any()  # the unlabelled slide brings lesion tiles in
    assert len(dirty.train) == sum(manifests[s].height for s in dirty.train_slides)
    assert np.array_equal(clean.val, dirty.val)  # validation stays normal
    # Each training tile's slide, in the tiles' order: robust mode holds each slide out.
    named = dirty.train_tile_slides
    assert named is not None and len(named) == len(dirty.train)
    assert list(dict.fromkeys(named)) == list(dirty.train_slides)
    import polars as pl

    from vadflow.tasks.slides.tiles import load_tiles

    registered = pl.read_parquet(dirty.slides_path)
    uris = dict(zip(registered["slide_id"], registered["uri"], strict=True))
    assert np.array_equal(dirty.train[named == tumour], load_tiles(manifests[tumour], uris))


@pytest.mark.slow
@pytest.mark.parametrize("site_seed", [0, 1])
def test_supervised_baseline_calls_hard_slides(tmp_path: Path, site_seed: int):
    """Tile AUROC >= 0.85 and slide AUC >= 0.9 on a hard site of 16 slides (the "medium" size).

    supervised_cnn, trained from the site's 3 annotated tumour slides at its default budget, is
    the family that clears both bars. Measured with the family's default epochs (tile / slide
    AUC, site seeds 0-4): 0.997 / 0.96, 1.00 / 1.00, 0.999 / 1.00, 1.00 / 1.00, 1.00 / 1.00.
    Seed 1 is the site where the 3-epoch benchmark budget gave slide AUC 0.84. No unsupervised
    family reaches slide AUC 0.9 robustly: their slide maxima land on folds and tissue edges
    (README, "Detectors and the honest results table").
    """
    site = build_hard_site(tmp_path, "medium", seed=site_seed)
    data = load_benchmark_tiles(site, tile_size=64, work_dir=tmp_path / "work")
    # epochs=None: the family's own budget (10 epochs, then 3 of hard-negative fine-tuning);
    # the table's shared 3 epochs are what a quick comparison affords, not this family's.
    row = run_family(
        "supervised_cnn", data, epochs=None, tile_size=64, seed=site_seed, device="cpu"
    )
    print(f"\nsupervised_cnn on the medium hard site, seed {site_seed}: {row}")
    assert row.direction == "ok", row.error
    assert row.tile_auroc >= 0.85
    assert row.slide_auc >= 0.9
