"""Find a site's slides (or images) and what is known about each before opening it.

Two layouts are understood: Camelyon16-style pathology folders (`training/normal`,
`training/tumor`, `testing/images` + `testing/reference.csv`, `lesion_annotations/*.xml`) and
MVTec AD-style industrial folders (`<category>/train/good`, `<category>/test/<defect>`,
`<category>/ground_truth/<defect>/<name>_mask.png`). Anything else found under the source is a
test slide with an unknown label.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from tasks.slides.reader import IMAGE_SUFFIXES, SLIDE_SUFFIXES

SKIP_DIRS = {"ground_truth", "lesion_annotations", "masks"}


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


def discover(source: str | Path, domain: str, val_fraction: float = 0.25) -> list[SlideSource]:
    """Every slide under `source`, with label and split inferred from the layout."""
    root = Path(source)
    if not root.is_dir():
        raise NoSlidesError(f"source folder {root} does not exist")
    found = _discover_industrial(root) if domain == "industrial" else _discover_pathology(root)
    if not found:
        suffixes = IMAGE_SUFFIXES if domain == "industrial" else SLIDE_SUFFIXES
        raise NoSlidesError(
            f"no slides found under {root} (looked for {', '.join(suffixes)}); "
            "point the site's source at the folder holding them"
        )
    return _hold_out_val(sorted(found, key=lambda s: s.slide_id), val_fraction)


def _discover_pathology(root: Path) -> list[SlideSource]:
    reference = _read_reference(root)
    annotations = {p.stem: p for p in root.glob("lesion_annotations/*.xml")}
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in SLIDE_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(root).parts
        if SKIP_DIRS & set(rel[:-1]) or path.stem.endswith("_mask"):
            continue
        stem = path.stem
        parts = {p.lower() for p in rel[:-1]}
        split = "train" if parts & {"training", "train"} else "test"
        if stem in annotations or "tumor" in parts or reference.get(stem) == "tumor":
            label, category = "anomalous", "tumor"
        elif "normal" in parts or reference.get(stem) == "normal":
            label, category = "normal", "normal"
        else:
            label, category = "unknown", "unknown"
        xml = annotations.get(stem)
        out.append(SlideSource(stem, str(path.resolve()), label, category, split, _str(xml)))
    return out


def _read_reference(root: Path) -> dict[str, str]:
    """Camelyon16's `reference.csv`: image name -> 'tumor' | 'normal'."""
    labels: dict[str, str] = {}
    for path in root.rglob("reference.csv"):
        with path.open(newline="") as handle:
            for row in csv.reader(handle):
                if len(row) >= 2 and row[1].strip().lower() in ("tumor", "normal"):
                    labels[Path(row[0].strip()).stem] = row[1].strip().lower()
    return labels


def _discover_industrial(root: Path) -> list[SlideSource]:
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(root).parts
        if len(rel) < 4 or rel[-3] not in ("train", "test"):
            continue  # ground_truth masks, README images, licence files...
        category, split, defect = rel[-4], rel[-3], rel[-2]
        mask = None
        if defect == "good":
            label = "normal"
        else:
            label = "anomalous"
            candidate = root.joinpath(*rel[:-3], "ground_truth", defect, f"{path.stem}_mask.png")
            mask = candidate if candidate.exists() else None
        slide_id = f"{category}-{split}-{defect}-{path.stem}"
        out.append(SlideSource(slide_id, str(path.resolve()), label, defect, split, _str(mask)))
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


def _str(path: Path | None) -> str | None:
    return str(path.resolve()) if path is not None else None
