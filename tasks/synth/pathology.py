"""A synthetic Camelyon16-like pathology site: pyramidal H&E-looking slides with known lesions.

Real slides cannot ship with the project and are too large for tests, so the pipeline is exercised
on slides drawn here. The picture follows Beer-Lambert: optical density = H * h_vec + E * e_vec,
RGB = 255 * exp(-OD), with H from rendered nuclei and E from a stroma field with fibres. Tumour
lesions are the same tissue with denser, larger, darker, more irregular nuclei and a little more
hematoxylin, blended in at the edge, so a detector has to learn texture rather than colour.

Two modes. "easy" (the default, and what every older test and demo uses) is the above: a lesion is
darker on average, so even a colour statistic finds it. "hard" is closer to a real lymph node
metastasis: lesion nuclei are denser, larger, more varied in size and irregular (coarse
chromatin), the stroma and its fibres are lost, and the cytoplasm carries almost no hematoxylin
and a little more eosin, so the lesion keeps the host's mean hematoxylin and eosin: its mean
colour stays within a few RGB units of normal tissue, while its texture has more contrast.
Sizes run from isolated-cell clusters (tens of um) to lesions as large as the tissue allows,
with smooth, irregular outlines. Normal tissue gets its own hard parts, each a plausible false
positive: collagen (stroma) bands, fibres that turn from place to place, fat vacuoles, folds (a
second layer of tissue: a darker band with twice the nuclei), a darker rim at tissue edges,
glass cracks through the tissue, and a per-slide stain strength. A detector has to see
morphology: a classifier on mean colour is near chance (tests/test_hard_mode.py).

Memory: level 0 is rendered in horizontal strips and streamed to a raw file that libvips turns
into the pyramid, so pixels never sit in memory all at once. What does is the smooth fields on a
coarse grid (1/64 of level 0 up to 16k px, coarser beyond) and the nucleus list (one row per
nucleus, about 1 per 450 tissue pixels), so slides of a few hundred megapixels are fine.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyvips
import yaml
from scipy import ndimage
from skimage import measure

from vadflow.tasks.slides.annotations import write_asap_xml


@dataclass(frozen=True)
class Stain:
    """A lab's H&E: stain OD vectors (per unit stain, R, G, B) and an intensity.

    The default is Ruifrok & Johnston's. A second site with another `Stain` tests whether a
    model trained at one hospital transfers to another.
    """

    haematoxylin: tuple[float, float, float] = (0.65, 0.70, 0.29)
    eosin: tuple[float, float, float] = (0.07, 0.99, 0.11)
    intensity: float = 1.0

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        h = np.asarray(self.haematoxylin, dtype=np.float32) * self.intensity
        e = np.asarray(self.eosin, dtype=np.float32) * self.intensity
        return h, e


DEFAULT_STAIN = Stain()
#: A plausibly different lab: bluer, paler haematoxylin and a more orange eosin.
SHIFTED_STAIN = Stain(haematoxylin=(0.50, 0.78, 0.38), eosin=(0.16, 0.93, 0.20), intensity=0.8)

STRIP_ROWS = 256  # rows rendered at once; part of the seed schedule, so changing it changes pixels
TISSUE_EDGE_PX = 24.0  # width of the soft tissue border, level-0 px
SYNTH_ITC_UM = 10.0  # the FROC's isolated-cell rule that fits the lesions drawn here
LESION_EDGE_PX = 60.0  # width over which lesion texture blends in (at most half a radius)
NUCLEUS_RADIUS_UM = 1.0
NORMAL_NUCLEI_PER_PX = 1.0 / 450.0
_MARKER = ".vadflow-synthetic"  # marks a folder this module wrote, so a rerun may replace it

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Look:
    """How much a lesion differs from normal tissue at strength 1 (scaled by lesion_strength)."""

    density: float = 0.9  # extra nuclei per unit area
    radius: float = 0.35  # relative nucleus radius increase
    darkness: float = 0.3  # relative hematoxylin peak increase
    background_h: float = 0.10  # hematoxylin added to the cytoplasm/stroma
    eosin_loss: float = 0.2  # relative eosin decrease (stroma replaced by cells)
    fibre_loss: float = 0.7  # relative loss of fibre contrast


_LOOK = _Look()

Mode = Literal["easy", "hard"]
MODES: tuple[str, ...] = ("easy", "hard")


@dataclass(frozen=True)
class _HardLook:
    """Hard mode: how a lesion differs at strength 1, and the sizes of normal tissue's hard parts.

    The lesion's `pallor`, `background_h` and `eosin_gain` are bookkeeping as much as biology:
    with denser, larger nuclei a lesion carries more hematoxylin per area, so slightly paler
    nuclei and no hematoxylin in the cytoplasm bring its mean back to the host's, and a little
    more eosin makes up for the stroma the nuclei displace (tuned on rendered tiles: mean RGB
    within ~1 unit of normal tissue; tests/test_hard_mode.py holds the result). Lengths are in
    um, so any MPP draws alike.
    """

    density: float = 0.5  # extra nuclei per unit area in a lesion
    radius: float = 0.25  # relative nucleus radius increase
    pleomorphism: float = 0.25  # log-sd of a tumour nucleus's radius (normal 0.15)
    pallor: float = 0.2  # relative hematoxylin peak decrease
    background_h: float = -0.1  # cytoplasm hematoxylin change (keeps the host's mean H)
    eosin_gain: float = 0.17  # relative eosin change (keeps the host's mean E)
    lesion_radius_um: tuple[float, float] = (12.0, 1000.0)  # log-uniform, then what fits
    # Normal tissue's hard parts.
    stroma_eosin: float = 0.35  # relative eosin gain inside a collagen band
    stroma_nuclei: float = 0.75  # share of nuclei missing inside a collagen band
    stroma_half_um: tuple[float, float] = (5.0, 11.0)
    fat_share: tuple[float, float] = (0.0, 0.25)  # share of the tissue that is fat, per slide
    vacuole_radius_um: tuple[float, float] = (9.0, 22.0)
    septum_um: float = 1.5  # tissue between neighbouring vacuoles
    fold_od: float = 0.9  # optical density gain across a fold
    fold_half_um: tuple[float, float] = (8.0, 25.0)
    crack_half_um: tuple[float, float] = (0.8, 2.5)
    edge_rim_um: float = 12.0
    edge_eosin: float = 0.35
    stain_jitter: float = 0.12  # per-slide relative change in H and E amounts


_HARD = _HardLook()


def save_slide_tiff(
    image: pyvips.Image,
    path: str | Path,
    mpp: float,
    *,
    quality: int = 90,
    bigtiff: bool = False,
    mask: bool = False,
) -> Path:
    """Write `image` as a scanner would: a tiled (256 px) JPEG pyramidal TIFF with its level-0
    resolution `mpp` (um/px) in the resolution tags. Lazy images stream through libvips.

    `mask`: a binary label image (a ground-truth mask beside its slide), written lossless
    (deflate) with each lower level the mode of the one above, so every level stays binary.
    """
    xres = 1000.0 / mpp  # libvips takes pixels per millimetre; resunit only names the tag
    encoding = (
        {"compression": "deflate", "region_shrink": "mode"}
        if mask
        else {"compression": "jpeg", "Q": quality}
    )
    image.tiffsave(
        str(path),
        tile=True,
        tile_width=256,
        tile_height=256,
        pyramid=True,
        bigtiff=bigtiff,
        xres=xres,
        yres=xres,
        resunit="cm",
        **encoding,
    )
    return Path(path)


def make_pathology_site(
    out_dir: Path,
    name: str = "site-a",
    *,
    n_train_normal: int = 4,
    n_test_normal: int = 3,
    n_test_tumor: int = 3,
    n_train_tumor: int = 0,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.25,
    lesion_strength: float = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
    stain: Stain = DEFAULT_STAIN,
    mode: Mode = "easy",
    artefacts: bool = False,
) -> Path:
    """Write a Camelyon16-shaped site folder `out_dir/name` and return its path.

    Layout: `site.yaml`, `training/{normal,tumor}/*.tif`, `testing/images/test_*.tif` (tumour and
    normal shuffled), `testing/reference.csv` (image,label), `lesion_annotations/<stem>.xml` (ASAP)
    and `ground_truth/<stem>_mask.tif` for every tumour slide. Each slide has its own seed derived
    from `seed` and its role and index, so adding slides of one kind leaves the others unchanged.
    A folder this function wrote before is replaced; any other non-empty folder is refused.
    `mode` picks "easy" or "hard" slides (see the module docstring); easy is the default.
    `artefacts=True` plants one of each `ARTEFACT_KINDS` on every normal slide (drawn after the
    slide, from its own random stream, so the tissue and lesions stay as without it) and writes
    each slide's artefact masks to `artefacts/<stem>.<kind>.png` (see `write_synthetic_slide`).
    """
    _check_geometry(width, height, mpp, lesion_strength)
    _check_mode(mode)
    counts = (n_train_normal, n_test_normal, n_test_tumor, n_train_tumor)
    if min(counts) < 0:
        raise ValueError(f"slide counts must be >= 0, got {counts}")
    site = prepare_synthetic_site(
        Path(out_dir) / name,
        ("training", "testing", "lesion_annotations", "ground_truth", ARTEFACT_DIR),
    )
    # Synthetic lesions start at ~10 um; Camelyon16's 275 um isolated-cell rule would leave
    # every one of them out of the FROC, so the site says which rule fits its lesions.
    (site / "site.yaml").write_text(
        yaml.safe_dump(
            {"name": name, "domain": "pathology", "froc_itc_um": SYNTH_ITC_UM}, sort_keys=False
        )
    )
    # (role, index) -> slide; spawn keys keep the roles' random streams independent.
    jobs: list[tuple[Path, bool, np.random.SeedSequence]] = []
    for index in range(n_train_normal):
        path = site / "training" / "normal" / f"normal_{index:03d}.tif"
        jobs.append((path, False, _child(seed, 0, index)))
    for index in range(n_train_tumor):
        path = site / "training" / "tumor" / f"tumor_{index:03d}.tif"
        jobs.append((path, True, _child(seed, 1, index)))
    labels = ["Tumor"] * n_test_tumor + ["Normal"] * n_test_normal
    order = np.random.default_rng(_child(seed, 3, 0)).permutation(len(labels))
    labels = [labels[i] for i in order]
    for index, label in enumerate(labels):
        path = site / "testing" / "images" / f"test_{index:03d}.tif"
        jobs.append((path, label == "Tumor", _child(seed, 2, index)))
    if n_test_tumor + n_test_normal:
        (site / "testing").mkdir(parents=True, exist_ok=True)
        with (site / "testing" / "reference.csv").open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["image", "label"])
            for index, label in enumerate(labels):
                writer.writerow([f"test_{index:03d}", label])

    for done, (path, tumour, slide_seed) in enumerate(jobs, start=1):
        path.parent.mkdir(parents=True, exist_ok=True)
        mask_path = site / "ground_truth" / f"{path.stem}_mask.tif" if tumour else None
        n_lesions = (
            int(np.random.default_rng(_child_of(slide_seed, 2)).integers(1, 4)) if tumour else 0
        )
        polygons = write_synthetic_slide(
            path,
            width=width,
            height=height,
            mpp=mpp,
            n_lesions=n_lesions,
            lesion_strength=lesion_strength,
            seed=slide_seed,
            mask_path=mask_path,
            stain=stain,
            mode=mode,
            artefacts=artefacts and not tumour,
            artefact_dir=site / ARTEFACT_DIR if artefacts else None,
        )
        if tumour:
            write_asap_xml(site / "lesion_annotations" / f"{path.stem}.xml", polygons)
        if progress is not None:
            progress(done, len(jobs))
    return site


def write_synthetic_slide(
    path: Path,
    *,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.25,
    n_lesions: int = 0,
    lesion_strength: float = 1.0,
    seed: int | np.random.SeedSequence = 0,
    mask_path: Path | None = None,
    stain: Stain = DEFAULT_STAIN,
    mode: Mode = "easy",
    artefacts: bool = False,
    artefact_dir: Path | None = None,
) -> list[np.ndarray]:
    """Render one slide to a pyramidal JPEG TIFF; return its lesion outlines, (N, 2) x, y level 0.

    With `mask_path` the lesion mask is written beside it (pyramidal deflate TIFF, 0/255). The
    mask and outlines are geometry only: `lesion_strength` changes the texture, never the mask.
    `mode="hard"` draws colour-matched lesions in tissue with folds, fat, cracks and stroma bands.
    `artefacts=True` plants one of each `ARTEFACT_KINDS` on the tissue (a second pass over the
    rendered pixels, from the slide's own random stream). With `artefact_dir`, one 0/255 PNG per
    kind, `<artefact_dir>/<stem>.<kind>.png` at `ARTEFACT_MASK_DS` level-0 px per pixel, marks
    where the artefacts are: the planted ones, and hard mode's own folds and cracks.
    """
    _check_geometry(width, height, mpp, lesion_strength)
    _check_mode(mode)
    if n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    if artefacts and n_lesions:
        raise ValueError("artefacts are planted on normal slides only: use n_lesions=0")
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.default_rng(_child_of(seq, 0))
    cell = _cell_size(width, height)
    if mode == "hard":
        plan = _plan_slide_hard(rng, width, height, mpp, cell, n_lesions, lesion_strength)
    else:
        plan = _plan_slide(rng, width, height, mpp, cell, n_lesions, lesion_strength)
    if n_lesions and not plan.outlines:
        raise ValueError(
            f"{Path(path).name}: a {width}x{height} slide has no room for a lesion inside its "
            "tissue; use at least 512x512"
        )
    if mode == "hard":
        nuclei = _place_nuclei_hard(rng, plan, width, height, lesion_strength)
    else:
        nuclei = _place_nuclei(rng, plan, width, height, mpp, lesion_strength)
    bank = _stamp_bank(rng, mpp)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fresh names each time: libvips caches loads by file name, so reusing one would hand a
    # second slide written to the same path in this process the first one's pixels.
    raw_rgb = _temp_file(path, ".rgb.tmp")
    raw_mask = _temp_file(path, ".mask.tmp") if mask_path is not None else None
    try:
        with raw_rgb.open("wb") as rgb_out:
            mask_out = raw_mask.open("wb") if raw_mask is not None else None
            try:
                for strip, y0 in enumerate(range(0, height, STRIP_ROWS)):
                    y1 = min(y0 + STRIP_ROWS, height)
                    strip_rng = np.random.default_rng(_child_of(seq, 1, strip))
                    rgb, lesion = _render_strip(plan, nuclei, bank, strip_rng, y0, y1, width, stain)
                    rgb_out.write(rgb.tobytes())
                    if mask_out is not None:
                        if lesion is None:
                            lesion = np.zeros((y1 - y0, width), dtype=bool)
                        mask_out.write((lesion.astype(np.uint8) * 255).tobytes())
            finally:
                if mask_out is not None:
                    mask_out.close()
        if artefacts or artefact_dir is not None:
            # Drawn over the finished pixels from a stream of their own, so a slide with
            # artefacts is the same slide without them, plus the artefacts.
            art_rng = np.random.default_rng(_child_of(seq, 3))
            planted = _plan_artefacts(art_rng, plan, width, height, mpp) if artefacts else None
            masks = _draw_artefacts(raw_rgb, plan, planted, width, height, mpp)
            if artefact_dir is not None:
                _write_artefact_masks(Path(artefact_dir), path.stem, masks)
        image = pyvips.Image.rawload(str(raw_rgb), width, height, 3).copy(interpretation="srgb")
        save_slide_tiff(image, path, mpp)
        if raw_mask is not None and mask_path is not None:
            Path(mask_path).parent.mkdir(parents=True, exist_ok=True)
            mask = pyvips.Image.rawload(str(raw_mask), width, height, 1).copy(interpretation="b-w")
            save_slide_tiff(mask, mask_path, mpp, mask=True)
    finally:
        raw_rgb.unlink(missing_ok=True)
        if raw_mask is not None:
            raw_mask.unlink(missing_ok=True)
    return plan.outlines


# --- seeds and folders ------------------------------------------------------------------------


def _temp_file(beside: Path, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{beside.name}.", suffix=suffix, dir=beside.parent)
    os.close(handle)
    return Path(name)


def _check_geometry(width: int, height: int, mpp: float, lesion_strength: float) -> None:
    if width < 64 or height < 64:
        raise ValueError(f"slides must be at least 64x64 px, got {width}x{height}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if not lesion_strength >= 0:
        raise ValueError(f"lesion_strength must be >= 0, got {lesion_strength}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def _child(seed: int, role: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=seed, spawn_key=(role, index))


def _child_of(seq: np.random.SeedSequence, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=seq.entropy, spawn_key=(*seq.spawn_key, *key))


def prepare_synthetic_site(site: Path, owned: tuple[str, ...]) -> Path:
    """Create the site folder; clear what an earlier run of this generator wrote there."""
    if site.exists() and any(site.iterdir()):
        if not (site / _MARKER).exists():
            raise FileExistsError(
                f"{site} exists and was not written by the synthetic generator; "
                "choose another name or output folder"
            )
        for entry in (*owned, "site.yaml"):
            target = site / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    site.mkdir(parents=True, exist_ok=True)
    (site / _MARKER).touch()
    return site


# --- the slide plan: smooth fields on a coarse grid ---------------------------------------------


@dataclass(frozen=True)
class _Plan:
    cell: int
    # (C, Hc, Wc) float32, already weighted by tissue coverage and lesion blend:
    # hematoxylin background, eosin mean, eosin fibre contrast, fibre warp, lesion signed distance.
    fields: np.ndarray
    alpha: np.ndarray  # (Hc, Wc) tissue coverage in [0, 1]
    # (Hc, Wc) signed distance to the lesion edge in units of its blend width, > 0 inside
    lesion_sd: np.ndarray
    fibre_angle: float
    fibre_period: float
    glass_od: np.ndarray  # (3,) float32
    outlines: list[np.ndarray]
    hard: _HardParts | None = None  # hard mode only


@dataclass(frozen=True)
class _HardParts:
    """What hard mode renders per pixel: fat vacuoles (circles) and glass cracks (thin bands)."""

    vacuoles: np.ndarray  # (V, 3) float64 rows (y, x, radius) in level-0 px, sorted by y
    density: np.ndarray  # (Hc, Wc) relative nucleus density before lesions (stroma, fat, folds)
    crack_half_px: float  # half width of a crack
    h_gain: float  # this slide's hematoxylin strength, for nuclei too
    fibre_angles: tuple[float, float, float]  # radians; local weights in the fields
    fold: np.ndarray | None = None  # (Hc, Wc) fold coverage in [0, 1]: the artefact masks' truth


# Hard mode's extra coarse fields, after the easy ones: crack distance (px), crack presence, and
# the weights of the three fibre directions.
_CRACK_D, _CRACK_ON, _FIBRE_W = 5, 6, 7


_HBG, _EOSIN, _FIBRE, _WARP, _LESION_SD = range(5)
_NO_LESION = -1.0e4  # signed distance where a slide has no lesion (far outside any)


def _cell_size(width: int, height: int) -> int:
    # 8 px keeps lesion outlines smooth; grow it for huge slides so the grid stays ~2k x 2k.
    return 8 * max(1, 2 ** math.ceil(math.log2(max(width, height, 1) / 16384)))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about `scale` cells wide, on a (Hc, Wc) grid."""
    scale = max(scale, 1.0)
    small = (int(math.ceil(shape[0] / scale)) + 4, int(math.ceil(shape[1] / scale)) + 4)
    base = ndimage.gaussian_filter(rng.standard_normal(small), 0.8, mode="wrap")
    zoomed = ndimage.zoom(base, (shape[0] + 4 * scale) / small[0] + 1e-6, order=3)
    off = int(2 * scale)
    out = zoomed[off : off + shape[0], off : off + shape[1]]
    if out.shape != shape:  # zoom rounding: pad by edge values
        out = np.pad(out, [(0, shape[0] - out.shape[0]), (0, shape[1] - out.shape[1])], "edge")
    out = out - out.mean()
    return (out / (out.std() + 1e-9)).astype(np.float32)


def _plan_slide(
    rng: np.random.Generator,
    width: int,
    height: int,
    mpp: float,
    cell: int,
    n_lesions: int,
    strength: float,
) -> _Plan:
    shape = (math.ceil(height / cell) + 1, math.ceil(width / cell) + 1)
    # Level-0 coordinates of the coarse grid points: point u sits at x = (u + 0.5) * cell - 0.5.
    gy = (np.arange(shape[0], dtype=np.float32) + 0.5) * cell - 0.5
    gx = (np.arange(shape[1], dtype=np.float32) + 0.5) * cell - 0.5
    yy, xx = np.meshgrid(gy, gx, indexing="ij")

    alpha, tissue = _tissue_field(rng, shape, yy, xx, width, height, cell)
    lesion_sd, outlines = _lesion_field(rng, tissue, yy, xx, width, height, cell, n_lesions)
    eosin = 0.38 + 0.07 * _smooth_noise(rng, shape, 200 / cell)
    warp = _smooth_noise(rng, shape, 120 / cell)
    fibre = np.clip(0.55 + 0.45 * _smooth_noise(rng, shape, 300 / cell), 0.0, 1.0)
    hbg = 0.10 + 0.025 * _smooth_noise(rng, shape, 300 / cell)
    # Lesion blend weight: smooth over tens of pixels, so it is fine to interpolate it coarsely.
    look = _LOOK
    q = strength * np.clip(0.5 + lesion_sd, 0, 1)
    # Fold everything smooth into few fields now: each is one bilinear pass per pixel later.
    eosin_mean = alpha * eosin * (1 - look.eosin_loss * q)
    fibre_contrast = eosin_mean * 0.8 * fibre * (1 - look.fibre_loss * np.minimum(q, 1))
    h_background = alpha * (hbg + look.background_h * q)
    layers = [h_background, eosin_mean, fibre_contrast, warp]
    if n_lesions:
        layers.append(lesion_sd)
    fields = np.stack(layers).astype(np.float32)
    glass_od = (0.045 + rng.uniform(-0.01, 0.01, 3)).astype(np.float32)
    return _Plan(
        cell=cell,
        fields=fields,
        alpha=alpha,
        lesion_sd=lesion_sd,
        fibre_angle=float(rng.uniform(0, np.pi)),
        fibre_period=float(rng.uniform(3.0, 4.5) / mpp),
        glass_od=glass_od,
        outlines=outlines,
    )


def _plan_slide_hard(
    rng: np.random.Generator,
    width: int,
    height: int,
    mpp: float,
    cell: int,
    n_lesions: int,
    strength: float,
) -> _Plan:
    """The hard-mode plan: colour-matched lesions in tissue with stroma bands, fat, folds, cracks.

    Smooth parts (stroma bands, folds, edge rim, stain strength, the lesion's stain correction)
    are folded into the coarse fields; vacuoles and cracks are sharp and drawn per pixel.
    """
    look = _HARD
    um = 1.0 / mpp  # level-0 px per um
    shape = (math.ceil(height / cell) + 1, math.ceil(width / cell) + 1)
    gy = (np.arange(shape[0], dtype=np.float32) + 0.5) * cell - 0.5
    gx = (np.arange(shape[1], dtype=np.float32) + 0.5) * cell - 0.5
    yy, xx = np.meshgrid(gy, gx, indexing="ij")

    alpha, tissue = _tissue_field(rng, shape, yy, xx, width, height, cell)
    lesion_sd, outlines = _lesion_field(
        rng, tissue, yy, xx, width, height, cell, n_lesions, hard_mpp=mpp
    )
    eosin = 0.38 + 0.07 * _smooth_noise(rng, shape, 200 / cell)
    warp = _smooth_noise(rng, shape, 120 / cell)
    fibre = np.clip(0.55 + 0.45 * _smooth_noise(rng, shape, 300 / cell), 0.0, 1.0)
    hbg = 0.10 + 0.025 * _smooth_noise(rng, shape, 300 / cell)
    # Lesion weight scaled by strength: at strength 0 the lesion's area is plain host tissue.
    q = strength * np.clip(0.5 + lesion_sd, 0, 1)
    qc = np.minimum(q, 1.0)

    # Collagen bands: curvy stripes along the zero lines of a smooth field, in patches; a
    # lesion has lost its stroma.
    band = _zero_distance(_smooth_noise(rng, shape, 90 * um / cell), cell)
    half = rng.uniform(*look.stroma_half_um) * um
    patches = np.clip(0.5 + 0.8 * _smooth_noise(rng, shape, 250 * um / cell), 0, 1)
    stroma = np.exp(-((band / half) ** 2)) * patches * (1 - qc)

    # Folds: a band where the section lies over itself: twice the stain, twice the nuclei.
    fold = np.zeros(shape, dtype=np.float32)
    for _ in range(int(rng.integers(0, 3))):
        distance = _zero_distance(_smooth_noise(rng, shape, 300 * um / cell), cell)
        length = np.clip(0.5 + 2.0 * (_smooth_noise(rng, shape, 250 * um / cell) + 0.2), 0, 1)
        half = rng.uniform(*look.fold_half_um) * um
        fold = np.maximum(fold, np.clip((half - distance) / (2 * um) + 0.5, 0, 1) * length)

    # Cracks: thin glass tears through the tissue, drawn per pixel from their distance field.
    n_cracks = int(rng.integers(0, 3))
    crack_d = _zero_distance(_smooth_noise(rng, shape, 150 * um / cell), cell)
    crack_on = np.clip(0.5 + 2.0 * (_smooth_noise(rng, shape, 200 * um / cell) - 0.5), 0, 1)
    crack_on *= n_cracks > 0
    crack_half = rng.uniform(*look.crack_half_um) * um

    # Tissue edges: a rim of stronger stain, as a section dries from its border.
    inside = ndimage.distance_transform_edt(tissue) * cell
    rim = np.exp(-inside / (look.edge_rim_um * um))

    vacuoles, holes = _place_vacuoles(rng, tissue, lesion_sd, cell, um, strength)
    h_gain, e_gain = 1 + look.stain_jitter * rng.uniform(-1, 1, 2)

    thick = 1 + look.fold_od * fold
    eosin_mean = (
        alpha
        * e_gain
        * thick
        * eosin
        * (1 + look.stroma_eosin * stroma)
        * (1 + look.edge_eosin * rim)
        * (1 + look.eosin_gain * q)
    )
    fibre_contrast = eosin_mean * 0.8 * np.minimum(fibre + 0.6 * stroma, 1.2) * (1 - qc)
    h_background = (
        alpha
        * h_gain
        * thick
        * np.maximum(hbg * (1 + 0.5 * rim) * (1 - 0.4 * stroma) + look.background_h * q, 0.0)
    )
    density = alpha * (1 - look.stroma_nuclei * stroma) * (1 - holes) * (1 + fold)
    fibre_angles = float(rng.uniform(0, np.pi)) + np.array([0.0, np.pi / 3, 2 * np.pi / 3])
    pull = np.stack([_smooth_noise(rng, shape, 80 * um / cell) for _ in range(3)])
    fibre_weights = np.exp(5.0 * pull)
    fibre_weights /= fibre_weights.sum(axis=0)  # (3, Hc, Wc), mostly one direction at a time
    layers = [h_background, eosin_mean, fibre_contrast, warp, lesion_sd, crack_d, crack_on]
    layers += list(fibre_weights)
    return _Plan(
        cell=cell,
        fields=np.stack(layers).astype(np.float32),
        alpha=alpha,
        lesion_sd=lesion_sd,
        fibre_angle=float(rng.uniform(0, np.pi)),
        fibre_period=float(rng.uniform(3.0, 4.5) / mpp),
        glass_od=(0.045 + rng.uniform(-0.01, 0.01, 3)).astype(np.float32),
        outlines=outlines,
        hard=_HardParts(
            vacuoles=vacuoles,
            density=density.astype(np.float32),
            crack_half_px=float(crack_half),
            h_gain=float(h_gain),
            fibre_angles=tuple(float(a) for a in fibre_angles),
            fold=(fold * alpha).astype(np.float32),
        ),
    )


def _zero_distance(field: np.ndarray, cell: int) -> np.ndarray:
    """Approximate distance in level-0 px to the zero lines of a smooth (Hc, Wc) field."""
    slope = np.hypot(*np.gradient(field)) / cell  # field units per level-0 px
    return np.abs(field) / np.maximum(slope, 1e-6)


def _place_vacuoles(
    rng: np.random.Generator,
    tissue: np.ndarray,
    lesion_sd: np.ndarray,
    cell: int,
    um: float,
    strength: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fat: non-overlapping round vacuoles packed into patches of the tissue.

    Returns (V, 3) rows (y, x, radius) sorted by y, and their coverage on the coarse grid (for
    thinning nuclei). A lesion has replaced the fat it grew into, so vacuoles near one are
    dropped (with probability = strength, so strength 0 leaves the host unchanged).
    """
    look = _HARD
    share = rng.uniform(*look.fat_share)
    shape = tissue.shape
    noise = _smooth_noise(rng, shape, 120 * um / cell)
    holes = np.zeros(shape, dtype=np.float32)
    if share <= 0 or not tissue.any():
        return np.zeros((0, 3)), holes
    fat = tissue & (noise > np.quantile(noise[tissue], 1 - share))
    cells = np.flatnonzero(fat.ravel())
    lo, hi = (r * um for r in look.vacuole_radius_um)
    n_try = min(20000, int(6 * cells.size * cell * cell / (math.pi * lo * hi)) + 1)
    pick = rng.choice(cells, n_try)
    cy = (pick // shape[1] + rng.random(n_try)) * cell - 0.5
    cx = (pick % shape[1] + rng.random(n_try)) * cell - 0.5
    radius = np.exp(rng.uniform(math.log(lo), math.log(hi), n_try))
    drop = rng.random(n_try) < min(strength, 1.0)
    outside = lesion_sd < 0
    # px to the nearest lesion (edt of an array without zeros is not "infinitely far")
    near_lesion = ndimage.distance_transform_edt(outside) * cell if not outside.all() else None
    kept: list[tuple[float, float, float]] = []
    ky, kx, kr = np.zeros(0), np.zeros(0), np.zeros(0)
    for y, x, r, d in zip(cy, cx, radius, drop, strict=True):
        row, col = min(int(y / cell), shape[0] - 1), min(int(x / cell), shape[1] - 1)
        if d and near_lesion is not None and near_lesion[row, col] < r + 4 * um:
            continue
        if ky.size and (np.hypot(ky - y, kx - x) < kr + r + look.septum_um * um).any():
            continue
        kept.append((y, x, r))
        ky, kx, kr = np.append(ky, y), np.append(kx, x), np.append(kr, r)
    vacuoles = np.array(sorted(kept), dtype=np.float64).reshape(-1, 3)
    gy = (np.arange(shape[0]) + 0.5) * cell - 0.5
    gx = (np.arange(shape[1]) + 0.5) * cell - 0.5
    for y, x, r in vacuoles:
        r0, r1 = np.searchsorted(gy, [y - r, y + r])
        c0, c1 = np.searchsorted(gx, [x - r, x + r])
        inside = np.hypot(gy[r0:r1, None] - y, gx[None, c0:c1] - x) < r
        holes[r0:r1, c0:c1] = np.maximum(holes[r0:r1, c0:c1], inside)
    return vacuoles, holes


def _tissue_field(
    rng: np.random.Generator,
    shape: tuple[int, int],
    yy: np.ndarray,
    xx: np.ndarray,
    width: int,
    height: int,
    cell: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue coverage in [0, 1] and the hard mask, for 1-4 smooth irregular islands."""
    n_islands = int(rng.integers(1, 5))
    coverage = rng.uniform(0.3, 0.5)
    area = width * height * coverage / n_islands
    noise = _smooth_noise(rng, shape, min(width, height) / 10 / cell)
    field = np.full(shape, -np.inf, dtype=np.float32)
    for _ in range(n_islands):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        elong = rng.uniform(1.0, 1.8)
        a = math.sqrt(area * elong / math.pi)  # semi-axes with area about `area`
        b = a / elong
        theta = rng.uniform(0, np.pi)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        island = 1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2)
        field = np.maximum(field, island)
    field = field + 0.3 * noise
    threshold = np.quantile(field, 1.0 - coverage)
    tissue = field > threshold
    # Noise can leave specks far from the islands: keep only sizeable pieces.
    labels, n = ndimage.label(tissue)
    if n > 1:
        sizes = ndimage.sum_labels(tissue, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= 0.05 * sizes.max()
        tissue = keep[labels]
    grad = np.hypot(*np.gradient(field)) / cell  # field units per level-0 px
    alpha = np.clip(0.5 + (field - threshold) / (np.maximum(grad, 1e-6) * TISSUE_EDGE_PX), 0, 1)
    alpha = np.where(ndimage.binary_dilation(tissue, iterations=3), alpha, 0.0)
    return alpha.astype(np.float32), tissue


def _lesion_field(
    rng: np.random.Generator,
    tissue: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    width: int,
    height: int,
    cell: int,
    n_lesions: int,
    hard_mpp: float | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Signed distance to 0-3 star-shaped lesions (in blend widths, > 0 inside), and outlines.

    With `hard_mpp` (hard mode), radii are log-uniform in um from isolated-cell clusters to as
    large as the tissue allows, and outlines are more irregular.
    """
    sd = np.full(tissue.shape, _NO_LESION, dtype=np.float32)
    if n_lesions == 0:
        return sd, []
    # Room around each grid point (level-0 px): to the tissue edge, and to the lesions so far.
    room = ndimage.distance_transform_edt(tissue) * cell
    scale = max(min(width, height) / 3072, 0.5)
    for _ in range(n_lesions):
        if hard_mpp is None:
            radius = rng.uniform(75, 300) * scale
        else:
            lo, hi = np.log(_HARD.lesion_radius_um)
            radius = float(np.exp(rng.uniform(lo, hi))) / hard_mpp
        # A lesion sits inside tissue and apart from the others: 1.3 radii of room around it.
        while True:
            candidates = np.flatnonzero(room.ravel() > 1.3 * radius + TISSUE_EDGE_PX)
            if candidates.size or radius < 20 * scale:
                break
            radius *= 0.8
        if not candidates.size:
            break
        centre = rng.choice(candidates)
        cy, cx = yy.ravel()[centre], xx.ravel()[centre]
        room = np.minimum(room, np.hypot(yy - cy, xx - cx) - 1.3 * radius)
        harmonics = np.arange(2, 6) if hard_mpp is None else np.arange(2, 9)
        amps = rng.uniform(0, 0.22, harmonics.size) / harmonics * 2
        if hard_mpp is not None:
            amps = rng.uniform(0, 0.35, harmonics.size) / np.sqrt(harmonics)
        cap = 0.25 if hard_mpp is None else 0.4
        amps *= min(1.0, cap / amps.sum())  # keeps the outline star-shaped and smooth
        phases = rng.uniform(0, 2 * np.pi, harmonics.size)
        angle = np.arctan2(yy - cy, xx - cx)[..., None]
        bound = radius * (1 + (amps * np.cos(harmonics * angle + phases)).sum(-1))
        blend = min(LESION_EDGE_PX, 0.5 * radius)
        sd = np.maximum(sd, ((bound - np.hypot(yy - cy, xx - cx)) / blend).astype(np.float32))
    # Outlines are the zero level of the same field the mask is drawn from, so they agree.
    padded = np.pad(sd, 1, constant_values=_NO_LESION)
    outlines = []
    for contour in measure.find_contours(padded, 0.0):
        contour = measure.approximate_polygon(contour - 1.0, tolerance=0.1)
        xy = (contour[:, ::-1] + 0.5) * cell - 0.5  # (row, col) cells -> (x, y) level-0 px
        if len(xy) >= 4:
            outlines.append(xy[:-1] if np.allclose(xy[0], xy[-1]) else xy)
    return sd, outlines


# --- nuclei --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Nuclei:
    y: np.ndarray  # (N,) int, sorted
    x: np.ndarray  # (N,) int
    stamp: np.ndarray  # (N,) index into the stamp bank
    amp: np.ndarray  # (N,) float32 hematoxylin peak


_SIZE_BINS = 12
_STAMP_BATCH = 8192
_IRR_BINS = 3
_VARIANTS = 8
_SIZE_RANGE = (0.55, 2.2)  # nucleus radius, relative to NUCLEUS_RADIUS_UM


def _bilinear_at(grid: np.ndarray, cell: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    coords = np.stack([(y + 0.5) / cell - 0.5, (x + 0.5) / cell - 0.5])
    return ndimage.map_coordinates(grid, coords, order=1, mode="nearest")


def _place_nuclei(
    rng: np.random.Generator,
    plan: _Plan,
    width: int,
    height: int,
    mpp: float,
    strength: float,
) -> _Nuclei:
    """A thinned Poisson process: denser in lesions, none on glass; each nucleus picks a stamp."""
    look = _LOOK
    boost = 1.0 + look.density * max(strength, 0.0)
    n_candidates = rng.poisson(NORMAL_NUCLEI_PER_PX * boost * width * height)
    y = rng.uniform(0, height, n_candidates)
    x = rng.uniform(0, width, n_candidates)
    alpha = _bilinear_at(plan.alpha, plan.cell, y, x)
    lesion = np.clip(0.5 + _bilinear_at(plan.lesion_sd, plan.cell, y, x), 0, 1)
    keep = rng.random(n_candidates) < alpha * (1 + look.density * strength * lesion) / boost
    y, x, lesion = y[keep], x[keep], lesion[keep]
    n = y.size
    # A nucleus near the lesion edge is tumour-like with probability = the blend weight.
    tumour = strength * (rng.random(n) < lesion)
    radius = np.exp(rng.normal(0, 0.15, n)) * (1 + look.radius * tumour)
    lo, hi = np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1])
    size_bin = np.clip(
        ((np.log(radius) - lo) / (hi - lo) * _SIZE_BINS).astype(int), 0, _SIZE_BINS - 1
    )
    irr_bin = np.clip(np.rint(2 * np.minimum(tumour, 1.0)), 0, _IRR_BINS - 1).astype(int)
    variant = rng.integers(0, _VARIANTS, n)
    stamp = (size_bin * _IRR_BINS + irr_bin) * _VARIANTS + variant
    amp = (0.85 * np.exp(rng.normal(0, 0.12, n)) * (1 + look.darkness * tumour)).astype(np.float32)
    order = np.argsort(y, kind="stable")
    return _Nuclei(
        y=y[order].astype(np.int64),
        x=x[order].astype(np.int64),
        stamp=stamp[order],
        amp=amp[order],
    )


def _place_nuclei_hard(
    rng: np.random.Generator,
    plan: _Plan,
    width: int,
    height: int,
    strength: float,
) -> _Nuclei:
    """Hard mode's nuclei: host density from the plan; lesion nuclei denser, larger, paler,
    more varied in size and irregular."""
    look = _HARD
    assert plan.hard is not None
    density = plan.hard.density
    boost = max(float(density.max()), 1e-6) * (1.0 + look.density * max(strength, 0.0))
    n_candidates = rng.poisson(NORMAL_NUCLEI_PER_PX * boost * width * height)
    y = rng.uniform(0, height, n_candidates)
    x = rng.uniform(0, width, n_candidates)
    local = _bilinear_at(density, plan.cell, y, x)
    lesion = np.clip(0.5 + _bilinear_at(plan.lesion_sd, plan.cell, y, x), 0, 1)
    keep = rng.random(n_candidates) < local * (1 + look.density * strength * lesion) / boost
    y, x, lesion = y[keep], x[keep], lesion[keep]
    n = y.size
    tumour = strength * (rng.random(n) < lesion)
    weight = np.minimum(tumour, 1.0)
    spread = 0.15 + (look.pleomorphism - 0.15) * weight
    radius = np.exp(rng.normal(0, 1, n) * spread) * (1 + look.radius * tumour)
    lo, hi = np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1])
    size_bin = np.clip(
        ((np.log(radius) - lo) / (hi - lo) * _SIZE_BINS).astype(int), 0, _SIZE_BINS - 1
    )
    irr_bin = np.clip(np.rint(2 * weight), 0, _IRR_BINS - 1).astype(int)
    variant = rng.integers(0, _VARIANTS, n)
    stamp = (size_bin * _IRR_BINS + irr_bin) * _VARIANTS + variant
    pallor = np.maximum(1 - look.pallor * tumour, 0.1)
    amp = 0.85 * plan.hard.h_gain * np.exp(rng.normal(0, 0.12, n)) * pallor
    order = np.argsort(y, kind="stable")
    return _Nuclei(
        y=y[order].astype(np.int64),
        x=x[order].astype(np.int64),
        stamp=stamp[order],
        amp=amp[order].astype(np.float32),
    )


def _stamp_bank(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """(S, k, k) soft nucleus shapes: sizes x irregularity x random variants, built at once."""
    r_unit = NUCLEUS_RADIUS_UM / mpp
    half = int(math.ceil(_SIZE_RANGE[1] * r_unit * 1.4)) + 1
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")  # (k, k)
    sizes = np.exp(np.linspace(np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1]), _SIZE_BINS))
    radius = np.repeat(sizes * r_unit, _IRR_BINS * _VARIANTS)  # (S,)
    irr = np.tile(np.repeat([0.04, 0.12, 0.2], _VARIANTS), _SIZE_BINS)  # (S,)
    n = radius.size
    ecc = rng.uniform(0.6, 1.0, n)
    a, b = radius / np.sqrt(ecc), radius * np.sqrt(ecc)
    psi = rng.uniform(0, np.pi, n)
    phases = rng.uniform(0, 2 * np.pi, (3, n))
    sl = (slice(None), None, None)  # (S,) -> (S, 1, 1)
    u = dx * np.cos(psi)[sl] + dy * np.sin(psi)[sl]
    v = -dx * np.sin(psi)[sl] + dy * np.cos(psi)[sl]
    rho = np.hypot(u / a[sl], v / b[sl])
    phi = np.arctan2(v / b[sl], u / a[sl])
    bound = 1 + irr[sl] * (
        0.7 * np.cos(2 * phi + phases[0][sl])
        + 0.5 * np.cos(3 * phi + phases[1][sl])
        + 0.25 * np.cos(4 * phi + phases[2][sl])
    )
    body = np.clip((bound - rho) * radius[sl] / 1.2 + 0.5, 0, 1)  # ~1 px soft edge
    # Irregular (tumour) nuclei get coarse chromatin: a darker rim and speckle inside.
    rim = 1 - irr[sl] * 1.5 * np.clip(1 - rho / bound, 0, 1)
    speckle = 1 + irr[sl] * rng.uniform(-1.2, 1.2, body.shape)
    return (body * rim * speckle).astype(np.float32)


# --- rendering ----------------------------------------------------------------------------------


def _upsample_rows(fields: np.ndarray, cell: int, y0: int, y1: int, width: int) -> np.ndarray:
    """Bilinear upsampling of (C, Hc, Wc) coarse fields to level-0 rows [y0, y1): (C, h, W)."""
    _, hc, wc = fields.shape
    gy = np.clip((np.arange(y0, y1) + 0.5) / cell - 0.5, 0, hc - 1)
    gx = np.clip((np.arange(width) + 0.5) / cell - 0.5, 0, wc - 1)
    iy = np.minimum(gy.astype(int), hc - 2)
    ix = np.minimum(gx.astype(int), wc - 2)
    fy = (gy - iy).astype(np.float32)[:, None]
    fx = (gx - ix).astype(np.float32)
    r0, r1 = iy.min(), iy.max() + 2
    rows = fields[:, r0:r1]  # (C, r, Wc): only the coarse rows this strip needs
    across = rows[:, :, ix] * (1 - fx) + rows[:, :, ix + 1] * fx  # (C, r, W)
    top, bottom = across[:, iy - r0], across[:, iy - r0 + 1]  # (C, h, W)
    return top * (1 - fy) + bottom * fy


def _render_strip(
    plan: _Plan,
    nuclei: _Nuclei,
    bank: np.ndarray,
    rng: np.random.Generator,
    y0: int,
    y1: int,
    width: int,
    stain: Stain = DEFAULT_STAIN,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [y0, y1) as (h, W, 3) uint8 RGB, and the (h, W) bool lesion mask if any lesion."""
    h = y1 - y0
    fields = _upsample_rows(plan.fields, plan.cell, y0, y1, width)  # (C, h, W)
    h_background, eosin_mean, fibre_contrast, warp = fields[:4]
    lesion_mask = fields[_LESION_SD] >= 0 if len(fields) > _LESION_SD else None

    # Stroma: eosin with thin wavy fibres (zero-mean stripes bent by a smooth warp).
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    wavenumber = 2 * np.pi / plan.fibre_period
    if plan.hard is None:
        stripes = _stripes(xs, ys, warp, wavenumber, plan.fibre_angle)
    else:
        # Fibres turn from place to place: three directions, blended by smooth weights.
        stripes = np.zeros((h, width), dtype=np.float32)
        for i, angle in enumerate(plan.hard.fibre_angles):
            stripes += fields[_FIBRE_W + i] * _stripes(xs, ys, warp, wavenumber, angle)
    e_field = eosin_mean + fibre_contrast * stripes

    # Nuclei: every nucleus touching the strip stamps its shape into a flat buffer at once.
    nuc = _stamp_nuclei(nuclei, bank, y0, y1, width)
    e_field *= 1 - 0.5 * np.minimum(nuc, 1)  # nuclei displace stroma
    h_field = h_background + np.minimum(nuc, 1.6)
    if plan.hard is not None:
        # Fat vacuoles and cracks are glass: no stain at all, nuclei cut where they cross.
        keep = 1 - _vacuole_cover(plan.hard.vacuoles, y0, y1, width)
        crack = plan.hard.crack_half_px + 0.5 - np.abs(fields[_CRACK_D])
        keep *= 1 - np.clip(crack, 0, 1) * fields[_CRACK_ON]
        h_field *= keep
        e_field *= keep

    noise = rng.standard_normal((h, width), dtype=np.float32) * 0.012
    rgb = np.empty((h, width, 3), dtype=np.uint8)
    h_vec, e_vec = stain.vectors()
    for c in range(3):
        od = h_field * h_vec[c] + e_field * e_vec[c]
        od += noise
        od += plan.glass_od[c]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= 255.0
        np.clip(od, 0, 255, out=od)
        rgb[..., c] = od
    return rgb, lesion_mask


def _stripes(
    xs: np.ndarray, ys: np.ndarray, warp: np.ndarray, wavenumber: float, angle: float
) -> np.ndarray:
    """Zero-mean thin fibre stripes (h, W) at `angle`, bent by the smooth `warp` field."""
    phase = xs * (wavenumber * math.cos(angle)) + warp * 6.0
    phase += ys * (wavenumber * math.sin(angle))  # (h, W)
    stripes = np.sin(phase, out=phase)
    stripes += 1
    stripes *= 0.5
    return stripes * stripes * stripes - 0.3125


def _vacuole_cover(vacuoles: np.ndarray, y0: int, y1: int, width: int) -> np.ndarray:
    """(h, W) float32 in [0, 1]: how much of each pixel of rows [y0, y1) is inside a vacuole."""
    out = np.zeros((y1 - y0, width), dtype=np.float32)
    if not len(vacuoles):
        return out
    reach = vacuoles[:, 2].max() + 1
    lo, hi = np.searchsorted(vacuoles[:, 0], [y0 - reach, y1 + reach])
    for cy, cx, r in vacuoles[lo:hi]:
        ya, yb = max(int(cy - r - 1), y0), min(int(cy + r + 2), y1)
        xa, xb = max(int(cx - r - 1), 0), min(int(cx + r + 2), width)
        if ya >= yb or xa >= xb:
            continue
        ys = np.arange(ya, yb, dtype=np.float32)[:, None]
        xs = np.arange(xa, xb, dtype=np.float32)[None, :]
        cover = np.clip(r + 0.5 - np.hypot(ys - cy, xs - cx), 0, 1)  # ~1 px soft edge
        view = out[ya - y0 : yb - y0, xa:xb]
        np.maximum(view, cover, out=view)
    return out


def _stamp_nuclei(nuclei: _Nuclei, bank: np.ndarray, y0: int, y1: int, width: int) -> np.ndarray:
    """Sum of nucleus stamps over rows [y0, y1): (h, W) float32 hematoxylin density."""
    k = bank.shape[-1]
    half = k // 2
    h = y1 - y0
    summed = np.zeros(h * width, dtype=np.float64)
    lo, hi = np.searchsorted(nuclei.y, [y0 - half, y1 + half])
    offsets = np.arange(-half, half + 1)
    # Batches bound the (n, k, k) index arrays on very wide slides.
    for start in range(lo, hi, _STAMP_BATCH):
        sel = slice(start, min(start + _STAMP_BATCH, hi))
        ys = nuclei.y[sel, None, None] + offsets[None, :, None]  # (n, k, 1)
        xs = nuclei.x[sel, None, None] + offsets[None, None, :]  # (n, 1, k)
        inside = (ys >= y0) & (ys < y1) & (xs >= 0) & (xs < width)  # (n, k, k)
        flat = (ys - y0) * width + xs
        weights = bank[nuclei.stamp[sel]] * nuclei.amp[sel, None, None]
        summed += np.bincount(flat[inside], weights=weights[inside], minlength=h * width)
    return summed.astype(np.float32).reshape(h, width)


# --- artefacts: what the QC stage has to find -----------------------------------------------------

#: The artefact kinds the generator plants and the QC stage (tasks/tiling/qc.py) looks for.
ARTEFACT_KINDS: tuple[str, ...] = ("fold", "crack", "pen", "bubble", "blur", "edge")
ARTEFACT_DIR = "artefacts"  # under the site folder: artefacts/<slide stem>.<kind>.png
ARTEFACT_MASK_DS = 16  # level-0 px per artefact-mask pixel (4 um at 0.25 um/px)


@dataclass(frozen=True)
class _ArtefactLook:
    """How the planted artefacts look. Widths are in um; extents are shares of the slide's
    short side, so a small test slide gets each kind whole."""

    fold_half_um: tuple[float, float] = (12.0, 25.0)
    fold_od: float = 1.0  # relative optical density gain: a second layer of section
    crack_half_um: tuple[float, float] = (2.5, 5.0)
    pen_half_um: tuple[float, float] = (10.0, 20.0)
    # Marker inks as optical densities (R, G, B): green, blue, black.
    pen_inks: tuple[tuple[float, float, float], ...] = (
        (0.95, 0.2, 0.8),
        (0.9, 0.55, 0.1),
        (1.0, 1.0, 0.95),
    )
    pen_od: tuple[float, float] = (0.7, 1.1)
    bubble_radius: tuple[float, float] = (0.07, 0.12)
    bubble_ring_um: float = 2.0  # half width of the dark outline a bubble's edge refracts into
    bubble_ring_od: float = 0.9
    bubble_inside: float = 0.55  # share of the stain's optical density seen through a bubble
    blur_radius: tuple[float, float] = (0.08, 0.13)
    blur_sigma_um: float = 3.0
    edge_band_um: tuple[float, float] = (25.0, 45.0)
    edge_od: float = 0.9  # relative optical density gain at a burnt edge
    edge_brown: tuple[float, float, float] = (0.1, 0.25, 0.45)  # optical density added
    edge_length: float = 0.5  # how much of the slide's short side the burnt stretch reaches
    curve_length: tuple[float, float] = (0.35, 0.6)


_ART = _ArtefactLook()
_FOLD_D, _TEAR_D, _PEN_D, _EDGE_C = range(4)


@dataclass(frozen=True)
class _Planted:
    """The artefacts planted on one slide: distance fields to the curved ones (level-0 px, on
    the plan's coarse grid), the burnt edge's coverage, and the discs (y, x, radius) of the
    bubble and the blurred region."""

    fields: np.ndarray  # (4, Hc, Wc): fold, crack and pen distance; edge coverage
    fold_half: float
    crack_half: float
    pen_half: float
    ink: np.ndarray  # (3,) optical density of the pen's ink at full strength
    bubble: tuple[float, float, float]
    blur: tuple[float, float, float]
    blur_sigma: float


def _plan_artefacts(
    rng: np.random.Generator, plan: _Plan, width: int, height: int, mpp: float
) -> _Planted:
    """Place one of each artefact kind on the tissue, apart from each other where there is room."""
    look, um, cell = _ART, 1.0 / mpp, plan.cell
    tissue = plan.alpha > 0.5  # (Hc, Wc)
    if not tissue.any():
        raise ValueError("artefacts need tissue to sit on; this slide drew none")
    depth = ndimage.distance_transform_edt(tissue) * cell  # px to the tissue's edge
    short = min(width, height)
    used = np.zeros(tissue.shape, dtype=bool)
    gy = (np.arange(tissue.shape[0]) + 0.5) * cell - 0.5
    gx = (np.arange(tissue.shape[1]) + 0.5) * cell - 0.5

    def disc(radius: float) -> tuple[float, float, float]:
        # A centre deep enough in tissue that most of the disc is tissue, off earlier artefacts.
        room = ndimage.distance_transform_edt(~used) * cell if used.any() else np.inf
        for need in (1.0, 0.6, 0.3, 0.0):
            ok = (depth > need * radius) & (room > 1.2 * radius)
            if ok.any():
                break
        else:
            ok = tissue
        pick = rng.choice(np.flatnonzero(ok.ravel()))
        cy, cx = gy[pick // tissue.shape[1]], gx[pick % tissue.shape[1]]
        used[np.hypot(gy[:, None] - cy, gx[None, :] - cx) < radius * 1.2] = True
        return float(cy), float(cx), float(radius)

    bubble = disc(rng.uniform(*look.bubble_radius) * short)
    blur = disc(rng.uniform(*look.blur_radius) * short)

    def curve(half: float) -> np.ndarray:
        """Distance (px, coarse grid) to a gently bending line that starts inside tissue."""
        best, best_overlap = None, np.inf
        for _ in range(12):
            start = rng.choice(np.flatnonzero((tissue & ~used).ravel() | (not used.any())))
            row, col = divmod(int(start), tissue.shape[1])
            angle = rng.uniform(0, 2 * np.pi)
            steps = int(rng.uniform(*look.curve_length) * short / (2 * cell))
            line = np.zeros(tissue.shape, dtype=bool)
            # Walk both ways from the start so the line crosses the tissue, not leaves it.
            for direction in (0.0, np.pi):
                r, c, a = float(row), float(col), angle + direction
                for _ in range(steps // 2):
                    a += rng.normal(0, 0.08)
                    r2, c2 = r + 2 * math.sin(a), c + 2 * math.cos(a)
                    if not (0 <= r2 < tissue.shape[0] and 0 <= c2 < tissue.shape[1]):
                        break
                    rr = np.linspace(r, r2, 4).round().astype(int)
                    cc = np.linspace(c, c2, 4).round().astype(int)
                    line[rr, cc] = True
                    r, c = r2, c2
            distance = ndimage.distance_transform_edt(~line) * cell
            band = distance < half + cell
            overlap = float((band & used).sum()) / max(int(band.sum()), 1)
            if overlap < best_overlap:
                best, best_overlap = distance, overlap
            if overlap < 0.02:
                break
        assert best is not None
        used[best < half + 2 * cell] = True
        return best.astype(np.float32)

    fold_half = rng.uniform(*look.fold_half_um) * um
    crack_half = rng.uniform(*look.crack_half_um) * um
    pen_half = rng.uniform(*look.pen_half_um) * um
    fold_d = curve(fold_half)
    crack_d = curve(crack_half)
    pen_d = curve(pen_half)

    # A burnt (dried, over-stained) stretch of the tissue's border, away from what is there.
    band_um = rng.uniform(*look.edge_band_um) * um
    border = tissue & (depth <= cell) & ~used
    if not border.any():
        border = tissue & (depth <= cell)
    pick = rng.choice(np.flatnonzero(border.ravel()))
    by, bx = gy[pick // tissue.shape[1]], gx[pick % tissue.shape[1]]
    reach = look.edge_length * short / 2
    near = np.clip((reach - np.hypot(gy[:, None] - by, gx[None, :] - bx)) / (4 * um), 0, 1)
    band = np.clip((band_um - depth) / (4 * um) + 0.5, 0, 1)
    edge = (band * near * plan.alpha).astype(np.float32)

    ink = np.asarray(look.pen_inks[int(rng.integers(len(look.pen_inks)))], dtype=np.float32)
    ink *= rng.uniform(*look.pen_od)
    return _Planted(
        fields=np.stack([fold_d, crack_d, pen_d, edge]).astype(np.float32),
        fold_half=float(fold_half),
        crack_half=float(crack_half),
        pen_half=float(pen_half),
        ink=ink,
        bubble=bubble,
        blur=blur,
        blur_sigma=look.blur_sigma_um * um,
    )


def _disc_cover(
    disc: tuple[float, float, float], y0: int, y1: int, width: int, soft: float
) -> np.ndarray:
    """(h, W) coverage of a disc over rows [y0, y1), with an edge `soft` px wide."""
    cy, cx, r = disc
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    return np.clip((r - np.hypot(ys - cy, xs - cx)) / soft + 0.5, 0, 1)


def _artefact_cover(
    plan: _Plan, planted: _Planted | None, y0: int, y1: int, width: int, mpp: float
) -> dict[str, np.ndarray]:
    """Per kind, (h, W) float32 coverage in [0, 1] of rows [y0, y1): where each artefact is.

    Hard mode's own folds and cracks count as artefacts too: they are what QC should catch on a
    real slide."""
    h = y1 - y0
    zero = np.zeros((h, width), dtype=np.float32)
    cover = {kind: zero for kind in ARTEFACT_KINDS}
    alpha = _upsample_rows(plan.alpha[None], plan.cell, y0, y1, width)[0]
    if plan.hard is not None and plan.hard.fold is not None:
        fold = _upsample_rows(plan.hard.fold[None], plan.cell, y0, y1, width)[0]
        crack_d, crack_on = _upsample_rows(
            plan.fields[[_CRACK_D, _CRACK_ON]], plan.cell, y0, y1, width
        )
        crack = np.clip(plan.hard.crack_half_px + 0.5 - np.abs(crack_d), 0, 1) * crack_on
        cover["fold"] = np.clip(fold, 0, 1)
        cover["crack"] = crack * np.minimum(alpha * 2, 1)
    if planted is None:
        return cover
    um = 1.0 / mpp
    fold_d, tear_d, pen_d, edge = _upsample_rows(planted.fields, plan.cell, y0, y1, width)
    inside = np.minimum(alpha * 2, 1)  # folds and tears are of tissue; glass has none
    fold = np.clip((planted.fold_half - fold_d) / (2 * um) + 0.5, 0, 1) * inside
    tear = np.clip(planted.crack_half + 0.5 - tear_d, 0, 1) * inside
    cover["fold"] = np.maximum(cover["fold"], fold)
    cover["crack"] = np.maximum(cover["crack"], tear)
    cover["pen"] = np.clip(planted.pen_half + 0.5 - pen_d, 0, 1)
    cover["bubble"] = _disc_cover(planted.bubble, y0, y1, width, 1.0)
    cover["blur"] = _disc_cover(planted.blur, y0, y1, width, 4 * planted.blur_sigma)
    cover["edge"] = np.clip(edge, 0, 1)
    return cover


def _draw_artefacts(
    raw_rgb: Path,
    plan: _Plan,
    planted: _Planted | None,
    width: int,
    height: int,
    mpp: float,
) -> dict[str, np.ndarray]:
    """Draw `planted` into the raw RGB file in place (strip by strip), and return each kind's
    mask, (ceil(H / ARTEFACT_MASK_DS), ceil(W / ARTEFACT_MASK_DS)) bool: mean coverage >= 0.5."""
    look, ds = _ART, ARTEFACT_MASK_DS
    pixels = None
    if planted is not None:
        pixels = np.memmap(raw_rgb, dtype=np.uint8, mode="r+", shape=(height, width, 3))
        _blur_region(pixels, planted, width, height)
    hm, wm = -(-height // ds), -(-width // ds)
    sums = {kind: np.zeros((hm, wm), dtype=np.float64) for kind in ARTEFACT_KINDS}
    counts = np.zeros((hm, wm), dtype=np.float64)
    ring_half = look.bubble_ring_um / mpp
    for y0 in range(0, height, STRIP_ROWS):
        y1 = min(y0 + STRIP_ROWS, height)
        cover = _artefact_cover(plan, planted, y0, y1, width, mpp)
        if pixels is not None and planted is not None:
            od = -np.log((pixels[y0:y1].astype(np.float32) + 1.0) / 256.0)  # (h, W, 3)
            fold, edge = cover["fold"][..., None], cover["edge"][..., None]
            od *= 1 + look.fold_od * fold
            od = od * (1 + look.edge_od * edge) + edge * np.asarray(look.edge_brown, np.float32)
            tear = cover["crack"][..., None]
            od = od * (1 - tear) + tear * plan.glass_od
            cy, cx, r = planted.bubble
            ys = np.arange(y0, y1, dtype=np.float32)[:, None]
            xs = np.arange(width, dtype=np.float32)[None, :]
            signed = np.hypot(ys - cy, xs - cx) - r
            ring = np.clip(ring_half + 0.5 - np.abs(signed), 0, 1)[..., None]
            within = np.clip(0.5 - signed, 0, 1)[..., None]
            od *= 1 - (1 - look.bubble_inside) * within
            od += ring * look.bubble_ring_od
            od += cover["pen"][..., None] * planted.ink
            pixels[y0:y1] = np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
        # Block sums onto the mask grid: strips start on multiples of ds (STRIP_ROWS is one).
        r0, r1 = y0 // ds, -(-y1 // ds)
        pad = ((0, (r1 - r0) * ds - (y1 - y0)), (0, wm * ds - width))
        ones = np.pad(np.ones((y1 - y0, width), np.float32), pad)
        counts[r0:r1] += ones.reshape(r1 - r0, ds, wm, ds).sum(axis=(1, 3))
        for kind, values in cover.items():
            block = np.pad(values, pad).reshape(r1 - r0, ds, wm, ds).sum(axis=(1, 3))
            sums[kind][r0:r1] += block
    if pixels is not None:
        pixels.flush()
        del pixels
    return {kind: total / np.maximum(counts, 1) >= 0.5 for kind, total in sums.items()}


def _blur_region(pixels: np.ndarray, planted: _Planted, width: int, height: int) -> None:
    """Defocus: the disc `planted.blur` of the (H, W, 3) image, Gaussian-blurred in place."""
    cy, cx, r = planted.blur
    sigma = planted.blur_sigma
    margin = r + 4 * sigma + 8
    ya, yb = max(int(cy - margin), 0), min(int(cy + margin) + 1, height)
    xa, xb = max(int(cx - margin), 0), min(int(cx + margin) + 1, width)
    box = pixels[ya:yb, xa:xb].astype(np.float32)  # (h, w, 3)
    blurred = ndimage.gaussian_filter(box, sigma=(sigma, sigma, 0), mode="nearest")
    local = (cy - ya, cx - xa, r)
    weight = _disc_cover(local, 0, yb - ya, xb - xa, 4 * sigma)[..., None]
    out = box * (1 - weight) + blurred * weight
    pixels[ya:yb, xa:xb] = np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _write_artefact_masks(folder: Path, stem: str, masks: dict[str, np.ndarray]) -> None:
    """One 0/255 PNG per kind: `<folder>/<stem>.<kind>.png`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for kind, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{stem}.{kind}.png")


def read_artefact_masks(folder: Path, stem: str) -> dict[str, np.ndarray]:
    """The artefact masks `write_synthetic_slide` wrote for slide `stem`: kind -> (h, w) bool."""
    from PIL import Image

    out = {}
    for kind in ARTEFACT_KINDS:
        path = Path(folder) / f"{stem}.{kind}.png"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no artefact mask; write the slide with artefact_dir")
        out[kind] = np.asarray(Image.open(path)) > 0
    return out
