"""Find a site's slides (or images) and what is known about each before opening it.

Two layouts are understood: Camelyon16-style pathology folders (`training/normal`,
`training/tumor`, `testing/images` + `testing/reference.csv`, `lesion_annotations/*.xml`) and
MVTec AD-style industrial folders (`<category>/train/good`, `<category>/test/<defect>`,
`<category>/ground_truth/<defect>/<name>_mask.png`). Anything else found under the source is a
test slide with an unknown label.

The source is a local folder or an `s3://bucket/prefix`: the layout rules run on the listing's
relative paths, so both behave the same. URIs of S3 slides stay `s3://...`; readers download them
into the slide cache when they open them.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tasks.slides.reader import IMAGE_SUFFIXES, SLIDE_SUFFIXES
from tasks.slides.storage import StorageOptions, is_remote, storage_for

SKIP_DIRS = {"ground_truth", "lesion_annotations", "masks"}
# A listing: relative path parts -> URI (a resolved local path, or s3://...).
Listing = dict[tuple[str, ...], str]


@dataclass(frozen=True)
class SlideSource:
    """A slide file and what its place in the site's folders says about it."""

    slide_id: str
    uri: str
    label: str  # normal / anomalous / unknown
    category: str
    split: str  # train / val / test
    annotation_uri: str | None


class NoSlidesError(FileNotFoundError):
    """The source holds nothing that looks like a slide or an image."""


def discover(
    source: str | Path,
    domain: str,
    val_fraction: float = 0.25,
    storage: StorageOptions | None = None,
) -> list[SlideSource]:
    """Every slide under `source` (folder or s3://bucket/prefix); label, split from the layout."""
    listing = _list(source, storage)
    found = (
        _discover_industrial(listing)
        if domain == "industrial"
        else _discover_pathology(listing, source, storage)
    )
    if not found:
        suffixes = IMAGE_SUFFIXES if domain == "industrial" else SLIDE_SUFFIXES
        raise NoSlidesError(
            f"no slides found under {source} (looked for {', '.join(suffixes)}); "
            "point the site's source at the folder holding them"
        )
    duplicated = sorted(i for i, n in Counter(s.slide_id for s in found).items() if n > 1)
    if duplicated:
        raise NoSlidesError(
            f"slide ids must be unique within a site, but {duplicated[:5]} occur more than once "
            f"under {source}; rename the files or split the site"
        )
    return _hold_out_val(sorted(found, key=lambda s: s.slide_id), val_fraction)


def _list(source: str | Path, storage: StorageOptions | None) -> Listing:
    """Every file under the source, keyed by its path relative to the source."""
    if is_remote(source):
        prefix = str(source).rstrip("/") + "/"
        uris = storage_for(prefix, storage).list_files(prefix)
        return {tuple(u[len(prefix) :].split("/")): u for u in uris}
    root = Path(source)
    if not root.is_dir():
        raise NoSlidesError(f"source folder {root} does not exist")
    return {
        p.relative_to(root).parts: str(p.resolve()) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def _discover_pathology(
    listing: Listing, source: str | Path, storage: StorageOptions | None
) -> list[SlideSource]:
    reference = _read_reference(listing, source, storage)
    annotations = {
        _stem(rel[-1]): uri
        for rel, uri in listing.items()
        if len(rel) == 2 and rel[0] == "lesion_annotations" and _suffix(rel[-1]) == ".xml"
    }
    out = []
    for rel, uri in sorted(listing.items()):
        if _suffix(rel[-1]) not in SLIDE_SUFFIXES:
            continue
        stem = _stem(rel[-1])
        if SKIP_DIRS & set(rel[:-1]) or stem.endswith("_mask"):
            continue
        parts = {p.lower() for p in rel[:-1]}
        split = "train" if parts & {"training", "train"} else "test"
        if stem in annotations or "tumor" in parts or reference.get(stem) == "tumor":
            label, category = "anomalous", "tumor"
        elif "normal" in parts or reference.get(stem) == "normal":
            label, category = "normal", "normal"
        else:
            label, category = "unknown", "unknown"
        out.append(SlideSource(stem, uri, label, category, split, annotations.get(stem)))
    return out


def _read_reference(
    listing: Listing, source: str | Path, storage: StorageOptions | None
) -> dict[str, str]:
    """Camelyon16's `reference.csv`: image name -> 'tumor' | 'normal'."""
    labels: dict[str, str] = {}
    for rel, uri in sorted(listing.items()):
        if rel[-1] != "reference.csv":
            continue
        text = storage_for(uri, storage).read_bytes(uri).decode("utf-8-sig")
        for row in csv.reader(io.StringIO(text)):
            if len(row) >= 2 and row[1].strip().lower() in ("tumor", "normal"):
                labels[_stem(row[0].strip())] = row[1].strip().lower()
    return labels


def _discover_industrial(listing: Listing) -> list[SlideSource]:
    out = []
    for rel, uri in sorted(listing.items()):
        if _suffix(rel[-1]) not in IMAGE_SUFFIXES:
            continue
        if len(rel) < 4 or rel[-3] not in ("train", "test"):
            continue  # ground_truth masks, README images, licence files...
        category, split, defect = rel[-4], rel[-3], rel[-2]
        stem = _stem(rel[-1])
        mask = None
        if defect == "good":
            label = "normal"
        else:
            label = "anomalous"
            mask = listing.get((*rel[:-3], "ground_truth", defect, f"{stem}_mask.png"))
        slide_id = f"{category}-{split}-{defect}-{stem}"
        out.append(SlideSource(slide_id, uri, label, defect, split, mask))
    return out


def _hold_out_val(sources: list[SlideSource], val_fraction: float) -> list[SlideSource]:
    """Move a deterministic share of normal training slides to `val` for calibration."""
    train_normals = [s for s in sources if s.split == "train" and s.label == "normal"]
    n_val = round(len(train_normals) * val_fraction)
    if val_fraction > 0 and len(train_normals) >= 2:
        n_val = max(1, min(n_val, len(train_normals) - 1))
    else:
        n_val = 0
    # Stable order independent of file-system listing: by a hash of the id.
    chosen = sorted(train_normals, key=lambda s: hashlib.sha1(s.slide_id.encode()).hexdigest())
    val_ids = {s.slide_id for s in chosen[:n_val]}
    return [
        SlideSource(s.slide_id, s.uri, s.label, s.category, "val", s.annotation_uri)
        if s.slide_id in val_ids
        else s
        for s in sources
    ]
