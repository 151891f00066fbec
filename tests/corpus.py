"""The bad-input corpus: every odd file a site's nightly run meets, made at test time.

Nothing here is committed as a blob: each case is written from a small rendered tissue image
(tasks.synth.pathology) into a site's folders, and `CASES` says what vadflow must do with it:
score it (after normalising it to 8-bit RGB), record it as having no tissue, or quarantine it
with a reason file that says why.

Also a pytest plugin (`pytest_plugins = ["tests.corpus"]`): the session fixture `corpus_run`
runs the real nightly flow once on a tiny synthetic pathology site with the whole corpus added,
with fake credentials in the environment, for the bad-input and the security tests to inspect.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pyvips
import tifffile

MPP = 0.25  # the synthetic site's level-0 resolution (um/px)
XRES = 1000.0 / MPP  # libvips takes px per mm
CORPUS_SIZE = (1024, 768)  # (width, height) of the corpus slides: ~48 tiles at 0.5 um/px
# Fake credentials put in the environment of the corpus run: none may reach any output.
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAVADFLOWFAKE0KEY9",
    "AWS_SECRET_ACCESS_KEY": "vadflow-fake-secret-1f7c9e02b6d84a35",
    "AWS_SESSION_TOKEN": "vadflow-fake-session-token-5d1e8a",
    "VADFLOW_PSEUDONYM_KEY": "vadflow-fake-pseudonym-key-0b8e41c7",
}


@dataclass(frozen=True)
class Case:
    """One corpus entry: the file it writes and what the flow must do with it.

    `expect`: "scored" (normalised and scored), "no_tissue" (registered and tiled, no tile
    kept, not scored; `reason` must be in the reason its tiles' done marker gives) or
    "quarantined" (a reason file under quarantine/ containing `reason`).
    """

    name: str  # what the README table calls it
    slide_id: str  # the id vadflow gives it (after the allow-list)
    expect: str
    reason: str  # a fragment the quarantine reason must contain ("" when not quarantined)
    write: Callable[[Path, np.ndarray], None]  # (site folder, tissue (H, W, 3) uint8)
    does: str  # the README table's "what vadflow does"


# --- writers ------------------------------------------------------------------------------


def tissue(width: int = CORPUS_SIZE[0], height: int = CORPUS_SIZE[1], seed: int = 11) -> np.ndarray:
    """A small synthetic H&E image, (height, width, 3) uint8, rendered by the site generator."""
    from vadflow.tasks.synth.pathology import write_synthetic_slide

    scratch = Path(tempfile.mkdtemp(prefix="corpus-"))
    try:
        path = scratch / "tissue.tif"
        write_synthetic_slide(path, width=width, height=height, mpp=MPP, seed=seed)
        return pyvips.Image.new_from_file(str(path)).numpy()[..., :3].copy()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_pyramid(
    path: Path,
    image: np.ndarray | pyvips.Image,
    *,
    xres: float | None = XRES,
    compression: str = "jpeg",
    tile: bool = True,
    pyramid: bool = True,
) -> Path:
    """A (pyramidal, tiled) TIFF as libvips writes it; `xres=None` writes no resolution."""
    path.parent.mkdir(parents=True, exist_ok=True)
    vips = image if isinstance(image, pyvips.Image) else pyvips.Image.new_from_array(image)
    options: dict = {"tile": tile, "pyramid": pyramid, "compression": compression}
    if tile:
        options.update(tile_width=256, tile_height=256)
    if xres is not None:
        options.update(xres=xres, yres=xres, resunit="cm")
    vips.tiffsave(str(path), **options)
    return path


def images_dir(site: Path) -> Path:
    return site / "testing" / "images"


def zero_bytes(site: Path, _: np.ndarray) -> None:
    images_dir(site).mkdir(parents=True, exist_ok=True)
    (images_dir(site) / "zero_bytes.tif").write_bytes(b"")


def text_as_tif(site: Path, _: np.ndarray) -> None:
    images_dir(site).mkdir(parents=True, exist_ok=True)
    (images_dir(site) / "notes.tif").write_text("scanner export log, not an image\n" * 20)


def truncated(site: Path, pixels: np.ndarray) -> None:
    """A pyramid cut short at 90 %: the first directory and level 0 survive, the rest do not.

    libvips opens it and decodes a pixel of it; only the structure check sees the damage.
    """
    path = write_pyramid(images_dir(site) / "truncated.tif", pixels)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])


def corrupt_jpeg_tile(site: Path, pixels: np.ndarray) -> None:
    """One JPEG tile of the working level (level 1 at 0.25 um/px) overwritten with zeros."""
    path = write_pyramid(images_dir(site) / "corrupt_tile.tif", pixels)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[1]
        offset, count = int(page.dataoffsets[1]), int(page.databytecounts[1])
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)


def strip_tiff(site: Path, _: np.ndarray) -> None:
    """One big level, stored in strips, twice the working resolution: no pyramid to lean on."""
    big = tissue(2 * CORPUS_SIZE[0], 2 * CORPUS_SIZE[1], seed=12)
    write_pyramid(
        images_dir(site) / "strip_big.tif", big, compression="deflate", tile=False, pyramid=False
    )


def rgba(site: Path, pixels: np.ndarray) -> None:
    alpha = np.full(pixels.shape[:2] + (1,), 255, np.uint8)
    alpha[:, : pixels.shape[1] // 8] = 0  # a transparent margin: flattened on white (glass)
    write_pyramid(
        images_dir(site) / "rgba.tif", np.concatenate([pixels, alpha], 2), compression="deflate"
    )


def grey(site: Path, pixels: np.ndarray) -> None:
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").colourspace("b-w")
    write_pyramid(images_dir(site) / "grey.tif", image)


def sixteen_bit(site: Path, pixels: np.ndarray) -> None:
    deep = pyvips.Image.new_from_array(pixels.astype(np.uint16) * 257).copy(interpretation="rgb16")
    write_pyramid(images_dir(site) / "sixteen_bit.tif", deep, compression="deflate")


def missing_mpp(site: Path, pixels: np.ndarray) -> None:
    write_pyramid(images_dir(site) / "no_mpp.tif", pixels, xres=None)


def absurd_mpp(site: Path, pixels: np.ndarray) -> None:
    write_pyramid(images_dir(site) / "absurd_mpp.tif", pixels, xres=2.0)  # 500 um/px


def all_background(site: Path, pixels: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    glass = np.clip(rng.normal(238, 2, pixels.shape), 0, 255).astype(np.uint8)
    write_pyramid(images_dir(site) / "blank.tif", glass)


def same_id_twice(site: Path, pixels: np.ndarray) -> None:
    """`dup_case` in testing/images and in testing/images/rescan, with different pixels."""
    write_pyramid(images_dir(site) / "dup_case.tif", pixels)
    write_pyramid(images_dir(site) / "rescan" / "dup_case.tif", pixels[::-1].copy())


TRAVERSAL_NAME = "..\\..\\escape.tif"  # backslashes and dots: a legal POSIX file name


def traversal_name(site: Path, pixels: np.ndarray) -> None:
    write_pyramid(images_dir(site) / TRAVERSAL_NAME, pixels)


def outside_link(site: Path, pixels: np.ndarray) -> None:
    """A symlink in the site to a slide outside it: never opened."""
    outside = write_pyramid(site.parent / f"{site.name}-outside" / "elsewhere.tif", pixels)
    images_dir(site).mkdir(parents=True, exist_ok=True)
    (images_dir(site) / "linked_out.tif").symlink_to(outside)


UNICODE_NAME = "tumör_Ärztin_切片.tif"


def unicode_name(site: Path, pixels: np.ndarray) -> None:
    write_pyramid(images_dir(site) / UNICODE_NAME, pixels)


def malformed_xml(site: Path, pixels: np.ndarray) -> None:
    """A readable slide whose ASAP annotation is cut off mid-element."""
    write_pyramid(images_dir(site) / "bad_xml.tif", pixels)
    folder = site / "lesion_annotations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad_xml.xml").write_text(
        '<?xml version="1.0"?>\n<ASAP_Annotations><Annotations><Annotation Name="A" '
        'PartOfGroup="Tumor"><Coordinates><Coordinate Order="0" X="10" Y='
    )


def declares_huge(site: Path, pixels: np.ndarray) -> None:
    """A 1 KB TIFF whose header declares 200,000 x 200,000 px (a size bomb): real tiles of a
    512 px image, then the size tags overwritten."""
    path = images_dir(site) / "size_bomb.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    res = (1e4 / MPP, 1e4 / MPP)  # px per cm
    tile = np.ascontiguousarray(pixels[:512, :512])
    tifffile.imwrite(path, tile, photometric="rgb", tile=(256, 256), compression="zlib",
                     resolution=res, resolutionunit="CENTIMETER")  # fmt: skip
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(200_000)
        tags["ImageLength"].overwrite(200_000)


def tumour_without_annotation(site: Path, pixels: np.ndarray) -> None:
    """A test slide labelled Tumor in reference.csv whose lesion annotation is missing."""
    write_pyramid(images_dir(site) / "no_xml.tif", pixels)
    with (site / "testing" / "reference.csv").open("a") as handle:
        handle.write("no_xml,Tumor\n")


def copy_of_training(site: Path, _: np.ndarray) -> None:
    """A byte copy of a training normal among the test images (leakage)."""
    first = sorted((site / "training" / "normal").glob("*.tif"))[0]
    images_dir(site).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(first, images_dir(site) / "copy_of_train.tif")


def upper_case_name(site: Path, pixels: np.ndarray) -> None:
    write_pyramid(images_dir(site) / "Case_A.tif", pixels)


def lower_case_name(site: Path, pixels: np.ndarray) -> None:
    write_pyramid(images_dir(site) / "case_a.tif", pixels[:, ::-1].copy())


def _ids() -> dict[str, str]:
    import hashlib

    from vadflow.tasks.slides.discover import CASE_SUFFIX
    from vadflow.tasks.slides.identity import safe_slide_id

    return {
        "traversal": safe_slide_id(TRAVERSAL_NAME.removesuffix(".tif")),
        "unicode": safe_slide_id(UNICODE_NAME.removesuffix(".tif")),
        "case": f"case_a{CASE_SUFFIX}{hashlib.sha256(b'case_a').hexdigest()[:8]}",
    }


def cases() -> list[Case]:
    ids = _ids()
    return [
        Case("zero-byte file", "zero_bytes", "quarantined", "the file is empty", zero_bytes,
             "quarantined: the file is empty (0 bytes)"),
        Case("truncated pyramidal TIFF", "truncated", "quarantined", "past the end", truncated,
             "quarantined: the TIFF structure check finds the directory chain or tile data past "
             "the end of the file (libvips alone would open it with fewer levels)"),
        Case("TIFF with one corrupt JPEG tile", "corrupt_tile", "quarantined",
             "no start-of-image marker", corrupt_jpeg_tile,
             "quarantined: a JPEG tile that is not JPEG data is found at registration, before "
             "any read fails mid-run"),
        Case("non-pyramidal strip TIFF, larger than the working level", "strip_big", "scored",
             "", strip_tiff,
             "scored: level 0 is read and each tile is shrunk to the working resolution; the "
             "mask is computed from a downscaled copy"),
        Case("text file named .tif", "notes", "quarantined", "not an image or slide file",
             text_as_tif,
             "quarantined: not an image or slide file (its first bytes are quoted)"),
        Case("RGBA", "rgba", "scored", "", rgba,
             "scored: transparent areas are flattened on white (glass), alpha dropped"),
        Case("grayscale", "grey", "no_tissue", "greyscale", grey,
             "read as RGB (the grey band copied to R, G and B); the H&E mask thresholds colour "
             "saturation, so no tissue is found: listed under `no_tissue` with a reason naming "
             "the fix (`tiling.mask_preset: object-dark`)"),
        Case("16-bit", "sixteen_bit", "scored", "", sixteen_bit,
             "scored: scaled to 8 bits by the format's range (not clipped)"),
        Case("missing MPP", "no_mpp", "quarantined", "no MPP", missing_mpp,
             "quarantined: no MPP in the metadata; the reason says to set `mpp_override`"),
        Case("absurd MPP", "absurd_mpp", "quarantined", "outside the plausible", absurd_mpp,
             "quarantined: MPP outside `mpp_bounds` (default 0.05-20 um/px); `mpp_override` "
             "replaces it"),
        Case("all-background slide", "blank", "no_tissue", "", all_background,
             "registered, masked and tiled: no tile reaches `min_tissue_fraction`, so it is "
             "listed under `no_tissue` (reason in `tiles/<id>.done.json`) and not scored"),
        Case("two slides with the same id, different bytes", "dup_case", "quarantined",
             "shared by 2 files", same_id_twice,
             "both quarantined (which file the label and annotation mean is unknown): the first "
             "keeps the id, the other gets `<id>--dup-<hash>`; exact copies with the same label "
             "keep one"),
        Case("file name with `..` and backslashes", ids["traversal"], "scored", "",
             traversal_name,
             "scored under a sanitised id (allow-list `[A-Za-z0-9._-]`, no `..`, plus a hash of "
             "the original name); outputs cannot leave their folders"),
        Case("symlink to a slide outside the site", "linked_out", "quarantined",
             "outside the site folder", outside_link,
             "quarantined without being opened: resolved paths must stay under the site root"),
        Case("unicode file name", ids["unicode"], "scored", "", unicode_name,
             "scored under an ASCII id (accents dropped, others replaced, plus a hash)"),
        Case("malformed ASAP XML", "bad_xml", "quarantined", "not well-formed XML", malformed_xml,
             "quarantined at registration: the annotation names the slide's label and lesions, "
             "so a broken one is not guessed around"),
        Case("TIFF whose header declares 200,000 x 200,000 px (1 KB)", "size_bomb",
             "quarantined", "limits.max_mask_megapixels", declares_huge,
             "quarantined at registration from the header, in milliseconds, before any pixel is "
             "decoded: its smallest level is larger than the tissue mask may decode "
             "(`limits.max_mask_megapixels`); a run whose slides together pass "
             "`limits.max_tiles_per_run` stops before tiling"),
        Case("tumour slide whose annotation is missing", "no_xml", "scored", "",
             tumour_without_annotation,
             "scored and counted at slide level as tumour; left out of pixel AUROC and FROC "
             "(never counted as lesion-free), `n_ground_truth_missing` in the metrics, and "
             "named in the run summary's gaps"),
        Case("test slide that is a byte copy of a training slide", "copy_of_train", "scored", "",
             copy_of_training,
             "scored, and named in the run summary's gaps (`copy_of_train = normal_...`, found by "
             "the SHA-256 registration computes); `leakage: refuse` in site.yaml stops the run "
             "instead"),
        Case("file names that differ only in case (first)", "Case_A", "scored", "",
             upper_case_name, "scored under its own name (the first, sorted, keeps it)"),
        Case("file names that differ only in case (second)", ids["case"], "scored", "",
             lower_case_name,
             "scored under `<id>--case-<hash>`, so no two outputs collide on a case-insensitive "
             "file system; named in the run summary"),
    ]  # fmt: skip


def add_corpus(site: Path, pixels: np.ndarray | None = None) -> list[Case]:
    """Write every case into `site` (a Camelyon16-shaped folder); return the cases."""
    pixels = tissue() if pixels is None else pixels
    out = cases()
    for case in out:
        case.write(site, pixels)
    return out


# --- the one corpus run -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def corpus_run(prefect_harness, state_dir: Path) -> dict:
    """The nightly flow, once, on a tiny synthetic site plus the whole corpus.

    Fake credentials sit in the environment for the whole run (for the security tests).
    """
    from vadflow.flows.nightly import nightly
    from vadflow.tasks.synth.pathology import make_pathology_site

    site = make_pathology_site(
        state_dir / "data",
        "corpus-site",
        n_train_normal=3,
        n_test_normal=3,
        n_test_tumor=3,
        width=2048,
        height=1536,
        seed=7,
    )
    started = time.perf_counter()
    corpus = add_corpus(site)
    made = time.perf_counter() - started
    tracking = f"sqlite:///{state_dir / 'home' / 'mlflow' / 'corpus.db'}"
    output_root = state_dir / "outputs"
    with pytest.MonkeyPatch.context() as env:
        for name, value in FAKE_SECRETS.items():
            env.setenv(name, value)
        started = time.perf_counter()
        summary = nightly(
            site_dir=str(site),
            output_root=str(output_root),
            tracking_uri=tracking,
            flags={"epochs": 2, "base_channels": 8},
            families=["ae_l2"],
        )
        ran = time.perf_counter() - started
    return {
        "summary": summary,
        "site": site,
        "cases": corpus,
        "tracking": tracking,
        "outputs": Path(summary.outputs),
        "seconds": {"corpus": made, "nightly": ran},
    }
