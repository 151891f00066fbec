"""Every pixel scored, said and measured (issue #20): the scored share, pixel metrics over all
ground-truth pixels, per-category means, overlays from the heatmap pyramid, deferred exports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from vadflow.tasks.evaluation.evaluate import evaluate_site
from vadflow.tasks.records import mean_metrics
from vadflow.tasks.scoring.heatmap import HeatmapGeometry, write_heatmap_tiff


def _image_site(tmp_path: Path, unscored_cols: int) -> tuple[pl.DataFrame, dict]:
    """Two normal val images, one good and one defective test image (32 x 32, defect in the
    right half), heatmaps scored everywhere but the last `unscored_cols` columns."""
    rows, scores = [], {}
    for sid, split, label in (
        ("v1", "val", "normal"),
        ("v2", "val", "normal"),
        ("good", "test", "normal"),
        ("bad", "test", "anomalous"),
    ):
        mask = None
        heatmap = np.full((32, 32), 0.1, dtype=np.float32)
        if sid == "bad":
            truth = np.zeros((32, 32), np.uint8)
            truth[:, 16:] = 255
            mask = tmp_path / "bad_mask.png"
            Image.fromarray(truth).save(mask)
            heatmap[:, 16:] = 0.9
        if split == "test" and unscored_cols:
            heatmap[:, 32 - unscored_cols :] = np.nan
        path = write_heatmap_tiff(
            tmp_path / f"{sid}.heatmap.tif",
            heatmap,
            HeatmapGeometry(sid, 1, level0_width=32, level0_height=32, mpp=None),
        )
        rows.append(
            {
                "slide_id": sid,
                "split": split,
                "label": label,
                "category": "good" if mask is None else "stain",
                "annotation_uri": None if mask is None else str(mask),
                "width": 32,
                "height": 32,
                "mpp": None,
            }
        )
        scores[sid] = (float(np.nanmax(heatmap)), str(path))
    return pl.DataFrame(rows), scores


def test_industrial_scored_share_and_unscored_pixels_count_as_lowest(tmp_path: Path) -> None:
    slides, scores = _image_site(tmp_path, unscored_cols=0)
    whole = evaluate_site(slides, scores, 1, 0.05, "industrial")
    assert whole.metrics["scored_share"] == 1.0
    assert whole.metrics["pixel_auroc"] == 1.0

    (tmp_path / "strip").mkdir()
    slides, scores = _image_site(tmp_path / "strip", unscored_cols=8)
    strip = evaluate_site(slides, scores, 1, 0.05, "industrial")
    assert strip.metrics["scored_share"] == pytest.approx(0.75)  # 8 of 32 columns unscored
    # The unscored half of the defect is missed, not dropped: pixel AUROC falls below 1
    # (defect pixels: 256 at 0.9, 256 unscored; normal: 1,536 at 0.1, 256 unscored).
    assert strip.metrics["pixel_auroc"] < 0.9
    assert strip.metrics["pro"] < whole.metrics["pro"]


def test_a_defect_without_its_mask_is_left_out_of_pixel_metrics_not_counted_normal(
    tmp_path: Path,
) -> None:
    """#24 case 5: before, a defective image whose mask was missing counted as all normal."""
    slides, scores = _image_site(tmp_path, unscored_cols=0)
    lost = np.full((32, 32), 0.1, dtype=np.float32)
    lost[:16] = 0.95  # a defect nobody drew a mask for
    path = write_heatmap_tiff(
        tmp_path / "lost.heatmap.tif", lost, HeatmapGeometry("lost", 1, 32, 32, mpp=None)
    )
    row = {**slides.row(by_predicate=pl.col("slide_id") == "bad", named=True)}
    row.update(slide_id="lost", annotation_uri=None)
    slides = pl.concat([slides, pl.DataFrame([row], schema=slides.schema)])
    scores["lost"] = (0.95, str(path))
    result = evaluate_site(slides, scores, 1, 0.05, "industrial")
    assert result.metrics["n_ground_truth_missing"] == 1.0
    assert result.metrics["n_pixel_slides"] == 2.0
    assert result.metrics["pixel_auroc"] == 1.0  # its 0.95 pixels are not "normal" pixels
    assert result.metrics["slide_auroc"] == 1.0  # the image still counts at image level
    assert result.metrics["n_test_anomalous"] == 2.0


def test_pathology_scored_share_is_of_tissue(tmp_path: Path) -> None:
    """Glass is not counted; tissue the heatmap left unscored is."""
    heatmap = np.full((8, 8), 0.2, dtype=np.float32)
    heatmap[:, 6:] = np.nan  # the right quarter of the slide was not scored
    path = write_heatmap_tiff(
        tmp_path / "t1.heatmap.tif",
        heatmap,
        HeatmapGeometry("t1", 16, level0_width=128, level0_height=128, mpp=0.5),
    )
    masks = tmp_path / "masks"
    masks.mkdir()
    tissue = np.zeros((32, 32), np.uint8)  # the tissue mask at 4 px per heatmap cell
    tissue[:, 16:] = 255  # the right half of the slide is tissue, the left half glass
    Image.fromarray(tissue).save(masks / "t1.png")
    slides = pl.DataFrame(
        [
            {
                "slide_id": "t1",
                "split": "test",
                "label": "unknown",
                "category": "unknown",
                "annotation_uri": None,
                "width": 128,
                "height": 128,
                "mpp": 0.5,
            }
        ]
    )
    result = evaluate_site(slides, {"t1": (0.2, str(path))}, 16, 0.05, "pathology", masks_dir=masks)
    assert result.metrics["scored_share"] == pytest.approx(0.5)  # 2 of 4 tissue columns


def test_category_mean_averages_metrics_and_sums_counts() -> None:
    mean = mean_metrics(
        {
            "a": {"slide_auroc": 0.8, "pro": 0.6, "n_test_slides": 5.0},
            "b": {"slide_auroc": 1.0, "pro": math.nan, "n_test_slides": 7.0},
        }
    )
    assert mean["slide_auroc"] == pytest.approx(0.9)
    assert mean["pro"] == pytest.approx(0.6)  # a category that could not compute it is left out
    assert mean["n_test_slides"] == 12.0 and mean["n_categories"] == 2.0


def test_overlay_reads_the_pyramid_level_that_fits(tmp_path: Path) -> None:
    from vadflow.tasks.exports.overlay import TARGET_EDGE_PX
    from vadflow.tasks.exports.render import overlay_heatmap

    rows, cols = 3000, 2000
    heatmap = np.zeros((rows, cols), dtype=np.float32)
    path = write_heatmap_tiff(
        tmp_path / "big.heatmap.tif",
        heatmap,
        HeatmapGeometry("big", 16, level0_width=cols * 16, level0_height=rows * 16, mpp=0.25),
    )
    small, downsample = overlay_heatmap(str(path), 16)
    assert small.shape == (750, 500) and downsample == 64  # level 2: 3000 -> 1500 -> 750
    assert max(small.shape) <= TARGET_EDGE_PX
    tiny, ds = overlay_heatmap(
        str(
            write_heatmap_tiff(
                tmp_path / "tiny.heatmap.tif",
                np.zeros((224, 224), np.float32),
                HeatmapGeometry("tiny", 1, level0_width=224, level0_height=224, mpp=None),
            )
        ),
        1,
    )
    assert tiny.shape == (224, 224) and ds == 1


def test_candidates_under_the_qc_mask_are_left_out_unless_kept() -> None:
    from vadflow.tasks.evaluation.evaluate import CandidateRule

    heatmap = np.full((40, 40), 0.05, dtype=np.float32)
    heatmap[5, 5] = 0.9  # a fold's hot spot
    heatmap[30, 30] = 0.8  # a lesion's
    qc = np.zeros((80, 80), bool)  # the QC mask at its own (finer) grid
    qc[:20, :20] = True
    rule = CandidateRule(suppress_um=10.0, max_per_slide=10)
    everything = rule.pick(heatmap, 16, 0.1, 0.5)
    assert len(everything) == 2
    (only,) = rule.pick(heatmap, 16, 0.1, 0.5, qc)
    assert only[2] == pytest.approx(0.8)
    kept = CandidateRule(suppress_um=10.0, max_per_slide=10, keep_artefacts=True)
    assert len(kept.pick(heatmap, 16, 0.1, 0.5, qc)) == 2
