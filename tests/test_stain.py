"""Stain normalisation: Reinhard matches LAB statistics; Macenko recovers known stain vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.color import rgb2lab

from vadflow.tasks.normalise.stain import (
    Macenko,
    Reinhard,
    macenko_stains,
    make_normaliser,
    normaliser_from_dict,
    tissue_pixels,
)

H = np.array([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11])


def stained_tiles(h_vec, e_vec, n=8, size=32, intensity=1.0, seed=0) -> np.ndarray:
    """Tiles synthesised by Beer-Lambert from two known stain vectors."""
    rng = np.random.default_rng(seed)
    h_vec, e_vec = (np.asarray(v) / np.linalg.norm(v) for v in (h_vec, e_vec))
    # Some pixels hold one stain only, as nuclei and bare stroma do; most hold a mix.
    kind = rng.integers(0, 3, (n, size, size))  # 0: H only, 1: E only, 2: both
    ch = (rng.gamma(2.0, 0.35, (n, size, size)) + 0.2) * (kind != 1)
    ce = (rng.gamma(2.0, 0.25, (n, size, size)) + 0.2) * (kind != 0)
    od = intensity * (ch[..., None] * h_vec + ce[..., None] * e_vec)  # (n, s, s, 3)
    return np.clip(np.exp(-od) * 255, 0, 255).astype(np.uint8)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def test_reinhard_matches_reference_lab_statistics() -> None:
    reference = stained_tiles(H, E, seed=1)
    source = stained_tiles([0.45, 0.80, 0.40], [0.20, 0.90, 0.30], intensity=0.7, seed=2)
    out = Reinhard().fit(reference).transform(source)
    ref_lab = rgb2lab(tissue_pixels(reference)[None])[0]
    out_lab = rgb2lab(tissue_pixels(out)[None])[0]
    np.testing.assert_allclose(out_lab.mean(0), ref_lab.mean(0), atol=2.0)
    np.testing.assert_allclose(out_lab.std(0), ref_lab.std(0), rtol=0.15, atol=1.0)


def test_macenko_recovers_known_stain_vectors() -> None:
    stains, _ = macenko_stains(stained_tiles(H, E, n=16, seed=3))
    assert _angle(stains[0], H) < 4.0
    assert _angle(stains[1], E) < 4.0


def test_macenko_maps_a_shifted_site_onto_the_reference() -> None:
    reference = stained_tiles(H, E, seed=4)
    shifted_h, shifted_e = [0.50, 0.80, 0.35], [0.15, 0.95, 0.25]
    source = stained_tiles(shifted_h, shifted_e, intensity=0.8, seed=5)
    normaliser = Macenko().fit(reference)
    out = normaliser.transform(source)
    stains, _ = macenko_stains(out)
    assert _angle(stains[0], H) < 5.0 and _angle(stains[1], E) < 5.0
    before = np.abs(source.mean((0, 1, 2)) - reference.mean((0, 1, 2))).max()
    after = np.abs(out.mean((0, 1, 2)) - reference.mean((0, 1, 2))).max()
    assert after < before / 2


@pytest.mark.parametrize("method", ["none", "reinhard", "macenko"])
def test_normalisers_round_trip_through_json(method: str) -> None:
    tiles = stained_tiles(H, E, seed=6)
    fitted = make_normaliser(method).fit(tiles)
    again = normaliser_from_dict(fitted.to_dict())
    np.testing.assert_array_equal(fitted.transform(tiles[:2]), again.transform(tiles[:2]))


def test_glass_stays_glass_and_unknown_method_is_named() -> None:
    tiles = stained_tiles(H, E, seed=7)
    tiles[:, :8] = 245
    out = Macenko().fit(tiles).transform(tiles)
    assert (out[:, :8] == 245).all()
    with pytest.raises(ValueError, match="vahadane"):
        make_normaliser("vahadane")


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_a_tile_is_normalised_the_same_whichever_batch_it_is_in(method: str) -> None:
    """The slide's stain is estimated once (`for_source`); per batch, a batch of dark lesion
    tiles would be pulled back towards the reference and the lesion's colour with it."""
    normaliser = make_normaliser(method).fit(stained_tiles(H, E, seed=8))
    slide = stained_tiles(H, E, n=16, seed=9)
    lesion = stained_tiles(H, E, n=8, intensity=1.6, seed=10)  # twice the stain
    tile = slide[:1]
    with_normal = np.concatenate([tile, slide[1:8]])
    with_lesion = np.concatenate([tile, lesion])
    per_slide = normaliser.for_source(np.concatenate([slide, lesion[:2]]))
    np.testing.assert_array_equal(per_slide(with_normal)[0], per_slide(with_lesion)[0])
    # What per-batch estimation did: the same tile comes out differently.
    per_batch = np.abs(
        normaliser.transform(with_normal)[0].astype(int)
        - normaliser.transform(with_lesion)[0].astype(int)
    )
    assert per_batch.mean() > 3
    # The lesion stays darker than its slide after the slide's own normalisation.
    assert per_slide(lesion).mean() < per_slide(slide).mean() - 10


def test_a_glass_sample_leaves_tiles_unchanged() -> None:
    normaliser = make_normaliser("macenko").fit(stained_tiles(H, E, seed=11))
    glass = np.full((4, 16, 16, 3), 240, np.uint8)
    tiles = stained_tiles(H, E, n=2, seed=12)
    np.testing.assert_array_equal(normaliser.for_source(glass)(tiles), tiles)


def test_scoring_a_slide_applies_the_models_stain_reference_per_slide(tmp_path) -> None:
    """The nightly score task reads the model's stain.json and normalises each slide from a
    sample of its own tiles: its tile scores equal scoring the normalised tiles directly."""
    import polars as pl
    import pyvips

    from vadflow.tasks.detectors.registry import create_detector
    from vadflow.tasks.pipeline import score_task
    from vadflow.tasks.scoring.run import STAIN_SOURCE_TILES
    from vadflow.tasks.site import TilingConfig
    from vadflow.tasks.slides.discover import SlideSource
    from vadflow.tasks.slides.register import register_slide
    from vadflow.tasks.slides.tiles import load_tiles, sample_tiles
    from vadflow.tasks.tiling.grid import tile_slide
    from vadflow.tasks.training.stain import STAIN_FILE

    # A 16 x 8 mosaic of 128 px tiles, its lower half stained twice as strongly: two batches
    # of 64 tiles that per-batch estimation would normalise apart.
    light = stained_tiles(H, E, n=64, size=128, seed=13)
    dark = stained_tiles(H, E, n=64, size=128, intensity=2.0, seed=15)
    tiles = np.concatenate([light, dark])
    mosaic = tiles.reshape(16, 8, 128, 128, 3).transpose(0, 2, 1, 3, 4).reshape(2048, 1024, 3)
    mosaic = np.pad(mosaic, ((256, 256), (256, 256), (0, 0)), constant_values=240)  # on glass
    path = tmp_path / "slide.tif"
    pyvips.Image.new_from_array(np.ascontiguousarray(mosaic)).tiffsave(
        str(path), tile=True, pyramid=True, xres=4000, yres=4000, tile_width=256, tile_height=256
    )
    source = SlideSource("slide", str(path), "normal", "normal", "test", None)
    row = register_slide(source, "s", "pathology")
    tiled = tile_slide(row, TilingConfig(), "pathology", tmp_path / "tiles", tmp_path / "masks")
    manifest = pl.read_parquet(tiled.manifest)
    pixels = load_tiles(manifest, {"slide": row["uri"]})

    detector = create_detector("padim", tile_size=64, device="cpu")
    detector.fit(pixels[: len(pixels) // 2], pixels[len(pixels) // 2 :])
    model_dir = detector.save(tmp_path / "model")
    reference = make_normaliser("reinhard").fit(stained_tiles(E, H, n=8, seed=14))  # other stain
    (model_dir / STAIN_FILE).write_text(json.dumps(reference.to_dict()))

    scored = score_task.fn(str(model_dir), row, tiled.manifest, str(tmp_path / "out"), 16)
    got = pl.read_parquet(scored.tile_scores)["score"].to_numpy()
    sample = load_tiles(sample_tiles(manifest, STAIN_SOURCE_TILES, seed=0), {"slide": row["uri"]})
    expected = detector.score(reference.for_source(sample)(pixels)).tile_score.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, detector.score(pixels).tile_score.numpy(), rtol=1e-2)
    halves = np.concatenate([reference.transform(pixels[:64]), reference.transform(pixels[64:])])
    per_batch = detector.score(halves).tile_score.numpy()
    assert len(got) == 128 and not np.allclose(got, per_batch, rtol=1e-2)
