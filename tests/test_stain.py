"""Stain normalisation: Reinhard matches LAB statistics; Macenko recovers known stain vectors."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2lab

from tasks.normalise.stain import (
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
