"""The train stage without Prefect: settings layering, the fit and its record, the skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vadflow.tasks.records import SkippedFamily, TrainedModel
from vadflow.tasks.site import load_site
from vadflow.tasks.slides.discover import discover
from vadflow.tasks.slides.register import register_slide, slide_frame
from vadflow.tasks.tiling.grid import tile_slide
from vadflow.tasks.training.model_folder import EXAMPLE_FILE, FIT_REPORT_FILE
from vadflow.tasks.training.stain import STAIN_FILE
from vadflow.tasks.training.train import detector_settings, train_family


@pytest.fixture(scope="module")
def tiled_site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny normal-only site (no tumour training slides), registered and tiled."""
    from vadflow.tasks.synth.pathology import make_pathology_site

    root = tmp_path_factory.mktemp("training")
    site_dir = make_pathology_site(
        root, "train-site", n_train_normal=2, n_test_normal=1, n_test_tumor=1, width=1536,
        height=1024,
    )  # fmt: skip
    with (site_dir / "site.yaml").open("a") as handle:
        handle.write("detectors:\n  ae_l2: {epochs: 5, base_channels: 8}\n")
    site = load_site(site_dir)
    rows, tile_paths = [], []
    for source in discover(site.source, site.domain, site.val_fraction):
        row = register_slide(source, site.name, site.domain)
        rows.append(row)
        tiled = tile_slide(row, site.tiling, site.domain, root / "tiles", root / "masks")
        if row["split"] in ("train", "val") and tiled.tiles:
            tile_paths.append(tiled.manifest)
    slides_path = root / "slides.parquet"
    slide_frame(rows).write_parquet(slides_path)
    return {"site": site, "slides": str(slides_path), "tiles": tile_paths, "root": root}


def _train(tiled_site: dict, family: str, model_dir: Path, flags: dict | None = None):
    """`train_family` on the tiny site's slides and tiles."""
    return train_family(
        family,
        tiled_site["site"],
        tiled_site["slides"],
        tiled_site["tiles"],
        model_dir,
        flags=flags,
    )


def test_settings_layer_site_defaults_then_site_file_then_flags(tiled_site) -> None:
    site = tiled_site["site"]
    settings = detector_settings("ae_l2", site, flags={"epochs": 1, "ridge": 0.5})
    assert settings["epochs"] == 1  # the flag beats the site file's 5
    assert settings["base_channels"] == 8  # the site file's entry
    assert settings["tile_size"] == site.tiling.tile_size  # the site's tiles decide
    assert settings["augment"] == site.augmentation.model_dump()
    assert "ridge" not in settings  # a padim field, not ae_l2's: the flag passes it by
    assert detector_settings("ae_l2", site)["epochs"] == 5


def test_train_family_fits_saves_and_reports(tiled_site) -> None:
    model_dir = tiled_site["root"] / "models" / "ae_l2"
    trained = _train(tiled_site, "ae_l2", model_dir, {"epochs": 1})
    assert isinstance(trained, TrainedModel)
    assert trained.supervision == "none" and not trained.diverged
    assert trained.config["epochs"] == 1 and trained.config["base_channels"] == 8
    assert [c.epoch for c in trained.curves] == [1] and trained.report.epochs == 1
    assert trained.train_tiles > 0 and trained.val_tiles > 0
    for name in ("config.json", "weights.pt", STAIN_FILE, EXAMPLE_FILE):
        assert (model_dir / name).is_file(), name
    written = json.loads((Path(model_dir) / FIT_REPORT_FILE).read_text())
    assert written["train_tiles"] == trained.train_tiles and written["family"] == "ae_l2"
    assert written["curves"][0]["epoch"] == 1


@pytest.mark.parametrize("family", ["supervised_cnn", "mil"])
def test_a_labelled_family_without_labels_is_skipped_not_failed(tiled_site, family) -> None:
    model_dir = tiled_site["root"] / "models" / family
    skipped = _train(tiled_site, family, model_dir)
    assert isinstance(skipped, SkippedFamily) and skipped.family == family
    assert "tumour" in skipped.reason
    assert not model_dir.exists()  # nothing half-written


def test_the_unsupervised_training_set_names_each_tiles_slide(tiled_site) -> None:
    """Robust mode holds each training slide out, so the training set says which slide every
    training tile comes from, in the tiles' order; a robust padim trains on it."""
    import polars as pl

    from vadflow.tasks.training.train import training_set

    data = training_set("none", tiled_site["site"], tiled_site["slides"], tiled_site["tiles"])
    slides = pl.read_parquet(tiled_site["slides"])
    train_ids = set(slides.filter(pl.col("split") == "train")["slide_id"])
    assert data.slides is not None and len(data.slides) == len(data.train) > 0
    assert set(data.slides) == train_ids
    trained = _train(
        tiled_site, "padim", tiled_site["root"] / "models" / "robust", {"robust": True}
    )
    assert isinstance(trained, TrainedModel) and trained.config["robust"] is True
