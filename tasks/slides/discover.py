"""Find a site's slides (or images) and what is known about each before opening it.

Layouts understood: the Camelyon16 release as downloaded (`training/normal`, `training/tumor`,
`training/lesion_annotations/*.xml`, `testing/images`, `testing/reference.csv` without a header,
`testing/lesion_annotations/*.xml` or `testing/lesion_annotations.zip`), the Camelyon17 release
(`training/center_N/patient_NNN_node_N.tif`, `training/stage_labels.csv`,
`training/lesion_annotations/`), this project's own synthetic sites (the same, with one
top-level `lesion_annotations/`), and the industrial releases that differ only in names:
MVTec AD (`<category>/train/good`, `<category>/test/<defect>`,
`<category>/ground_truth/<defect>/<name>_mask.png`), MVTec AD 2 (`train/good`,
`validation/good`, `test_public/good|bad`, `test_public/ground_truth/bad/<name>_mask.png`;
`test_private*` images are scored unlabelled) and VisA in MVTec form (`train/good`,
`test/good|bad`, `ground_truth/bad/<name>.png`). Anything else found under the source is a
test slide with an unknown label; `label_gaps` lists such slides, and anomalous slides without
an annotation, so a run can say what its metrics leave out.

The source is a local folder or an `s3://bucket/prefix`: the layout rules run on the listing's
relative paths, so both behave the same. URIs of S3 slides stay `s3://...`; readers download them
into the slide cache when they open them.

Slide ids become file names and keys, so they go through `tasks.slides.identity.safe_slide_id`
(an allow-list) here, before any stage builds a path from them; labels, annotations and
`reference.csv` still match on the file's own stem. A file that must not be read is found here
and handed on with a `reject` reason, which registration turns into a quarantine file: a symlink
that resolves outside the site folder, an S3 key with a `..` segment, two files that would share
one slide id (the same stem in two folders).
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from vadflow.tasks.records import LabelGaps
from vadflow.tasks.slides.identity import MAX_ID_LENGTH, pseudonymise, safe_slide_id
from vadflow.tasks.slides.reader import IMAGE_SUFFIXES, SLIDE_SUFFIXES
from vadflow.tasks.slides.storage import (
    ARCHIVE_MEMBER,
    StorageOptions,
    is_remote,
    local_path,
    storage_for,
)

ANNOTATION_DIR = "lesion_annotations"
ANNOTATION_ARCHIVE = "lesion_annotations.zip"
SKIP_DIRS = {"ground_truth", ANNOTATION_DIR, "masks"}
LABEL_FILES = frozenset({"reference.csv", "stage_labels.csv"})
# reference.csv (Camelyon16) and stage_labels.csv (Camelyon17) values -> label
STAGE_LABELS = {
    "tumor": "tumor",
    "normal": "normal",
    "negative": "normal",
    "itc": "tumor",
    "micro": "tumor",
    "macro": "tumor",
}
_IMAGE_LIKE = frozenset(SLIDE_SUFFIXES) | frozenset(IMAGE_SUFFIXES)
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
    reject: str | None = None  # why this file must not be opened; registration quarantines it


class NoSlidesError(FileNotFoundError):
    """The source holds nothing that looks like a slide or an image."""


def discover(
    source: str | Path,
    domain: str,
    val_fraction: float = 0.25,
    storage: StorageOptions | None = None,
    pseudonym_key: bytes | None = None,
) -> list[SlideSource]:
    """Every slide under `source` (folder or s3://bucket/prefix); label, split from the layout.

    With `pseudonym_key` (see `tasks.slides.identity.pseudonym_key`) every slide id is replaced
    by its keyed pseudonym, after the validation hold-out is chosen, so the split does not
    depend on the option.
    """
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
    root = None if is_remote(source) else Path(source).resolve()
    found = [_screened(s, root) for s in found]
    found = _one_file_per_id(found, source, storage)
    found = _distinct_ignoring_case(found)
    found = _hold_out_val(sorted(found, key=lambda s: s.slide_id), val_fraction, domain)
    if pseudonym_key is not None:
        found = [replace(s, slide_id=pseudonymise(s.slide_id, pseudonym_key)) for s in found]
    return found


def _list(source: str | Path, storage: StorageOptions | None) -> Listing:
    """Every file under the source, keyed by its path relative to the source."""
    if is_remote(source):
        prefix = str(source).rstrip("/") + "/"
        uris = storage_for(prefix, storage).list_files(prefix)
        return {tuple(u[len(prefix) :].split("/")): u for u in uris}
    root = Path(source)
    if not root.is_dir():
        raise NoSlidesError(f"source folder {root} does not exist")
    base = root.resolve()
    listing: Listing = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).parts
            resolved = path.resolve()
            if resolved.is_relative_to(base):
                listing[rel] = str(resolved)
            elif _suffix(rel[-1]) in _IMAGE_LIKE:
                listing[rel] = str(base.joinpath(*rel))  # kept to be rejected by `_screened`
            # other links out of the site (reference.csv, annotations) are never read
    return listing


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def _discover_pathology(
    listing: Listing, source: str | Path, storage: StorageOptions | None
) -> list[SlideSource]:
    labels = _read_labels(listing, storage)
    annotations = _annotations(listing, storage)
    out = []
    for rel, uri in sorted(listing.items()):
        if _suffix(rel[-1]) not in SLIDE_SUFFIXES:
            continue
        stem = _stem(rel[-1])
        if SKIP_DIRS & set(rel[:-1]) or stem.endswith("_mask"):
            continue
        parts = {p.lower() for p in rel[:-1]}
        split = "train" if parts & {"training", "train"} else "test"
        key = stem.lower()  # reference.csv says Test_001 for test_001.tif
        if key in annotations or "tumor" in parts or labels.get(key) == "tumor":
            label, category = "anomalous", "tumor"
        elif "normal" in parts or labels.get(key) == "normal":
            label, category = "normal", "normal"
        else:
            label, category = "unknown", "unknown"
        slide_id = safe_slide_id(stem)
        out.append(SlideSource(slide_id, uri, label, category, split, annotations.get(key)))
    return out


def _annotations(listing: Listing, storage: StorageOptions | None) -> dict[str, str]:
    """Lower-cased slide stem -> its ASAP XML, from every `lesion_annotations/` folder
    (the site's own, Camelyon16's `training/` and `testing/` ones) and from any
    `lesion_annotations.zip` (how Camelyon16 ships its test annotations), read in place."""
    found: dict[str, str] = {}
    for rel, uri in sorted(listing.items()):
        name = rel[-1]
        if len(rel) >= 2 and rel[-2].lower() == ANNOTATION_DIR and _suffix(name) == ".xml":
            found.setdefault(_stem(name).lower(), uri)
        elif name.lower() == ANNOTATION_ARCHIVE:
            with zipfile.ZipFile(local_path(uri, storage)) as bundle:
                members = bundle.namelist()
            for member in members:
                inner = PurePosixPath(member)
                if _suffix(inner.name) == ".xml" and not inner.name.startswith("."):
                    found.setdefault(inner.stem.lower(), f"{uri}{ARCHIVE_MEMBER}{member}")
    return found


def _read_labels(listing: Listing, storage: StorageOptions | None) -> dict[str, str]:
    """Lower-cased slide stem -> 'tumor' | 'normal', from the label files of both releases.

    Camelyon16's `testing/reference.csv` (no header: `Test_001,Tumor,Macro,Primary`,
    `Test_002,Normal,None,None`; this project's own sites write `image,label` rows) and
    Camelyon17's `stage_labels.csv` (`patient_004_node_4.tif,macro`: negative is normal;
    itc, micro and macro are tumour; the per-patient `.zip` rows are pN stages, not slides).
    """
    labels: dict[str, str] = {}
    for rel, uri in sorted(listing.items()):
        if rel[-1].lower() not in LABEL_FILES:
            continue
        text = storage_for(uri, storage).read_bytes(uri).decode("utf-8-sig")
        for row in csv.reader(io.StringIO(text)):
            if len(row) < 2 or _suffix(row[0].strip()) == ".zip":
                continue
            value = STAGE_LABELS.get(row[1].strip().lower())
            if value is not None:
                labels[_stem(row[0].strip()).lower()] = value
    return labels


def label_gaps(sources: list[SlideSource]) -> LabelGaps:
    """Test slides the layout left unlabelled and anomalous slides without an annotation,
    among the slides that will be opened (rejected files are reported as quarantined)."""
    usable = [s for s in sources if s.reject is None]
    return LabelGaps(
        unlabelled_test=tuple(
            s.slide_id for s in usable if s.split == "test" and s.label == "unknown"
        ),
        anomalous_without_annotation=tuple(
            s.slide_id for s in usable if s.label == "anomalous" and s.annotation_uri is None
        ),
        renamed_for_case=tuple(s.slide_id for s in usable if CASE_SUFFIX in s.slide_id),
    )


def nothing_to_train_on(sources: list[SlideSource], domain: str) -> str | None:
    """Why a nightly run cannot train and evaluate on what discovery found, or None: no usable
    normal training slide, no test slide (for an industrial site: per category). Checked right
    after discovery, so a wrong layout fails in seconds, before anything is decoded."""
    usable = [s for s in sources if s.reject is None]
    groups: dict[str | None, list[SlideSource]] = {None: usable}
    if domain == "industrial":
        groups = {}
        for s in usable:
            groups.setdefault(industrial_category(s.uri), []).append(s)
    where = (
        "training/normal (Camelyon16 layout)"
        if domain == "pathology"
        else "<category>/train/good (MVTec AD layout)"
    )
    problems = []
    for name, members in sorted(groups.items(), key=lambda kv: kv[0] or ""):
        scope = f"category {name}" if name else "the site"
        if not any(s.split in ("train", "val") and s.label == "normal" for s in members):
            problems.append(f"{scope} has no usable normal training slide (put them in {where})")
        if not any(s.split == "test" for s in members):
            problems.append(f"{scope} has no test slide")
    return "; ".join(problems) or None


def train_test_copies(slides: list[dict]) -> tuple[str, ...]:
    """Test slides whose bytes equal a training or validation slide's (registered rows with a
    `sha256`): `"<test id> = <train id>"` each. A copy in the test set scores as normal as the
    model's own training data and inflates every metric."""
    seen: dict[str, str] = {}
    for row in sorted(slides, key=lambda r: r["slide_id"]):
        if row.get("sha256") and row["split"] in ("train", "val"):
            seen.setdefault(row["sha256"], row["slide_id"])
    return tuple(
        f"{row['slide_id']} = {seen[row['sha256']]}"
        for row in sorted(slides, key=lambda r: r["slide_id"])
        if row["split"] == "test" and row.get("sha256") in seen
    )


# Industrial split folders -> split. MVTec AD: train, test; MVTec AD 2: train, validation
# (held-out good images), test_public (labelled), test_private and test_private_mixed (no labels
# released); VisA, as its own `prepare_data` script or anomalib writes it: train, test.
INDUSTRIAL_SPLITS = {
    "train": "train",
    "validation": "val",
    "test": "test",
    "test_public": "test",
    "test_private": "test",
    "test_private_mixed": "test",
}
UNLABELLED_SPLITS = frozenset({"test_private", "test_private_mixed"})
NORMAL_DEFECT = "good"


def industrial_category(uri: str) -> str:
    """The product category of an industrial image, from its place in the release's folders:
    `<category>/<split>/<defect>/<image>` (MVTec AD, MVTec AD 2, VisA in MVTec form), or
    `<category>/test_private/<image>` (MVTec AD 2's unlabelled test sets)."""
    parts = PurePosixPath(uri.replace("\\", "/")).parts
    if len(parts) >= 3 and parts[-2] in UNLABELLED_SPLITS:
        return parts[-3]
    if len(parts) < 4:
        raise ValueError(
            f"{uri}: not under <category>/<split>/<defect>/, so its category is unknown"
        )
    return parts[-4]


def _industrial_place(rel: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(category, split folder, defect folder) of an image's relative path; None for files
    that are not dataset images (ground-truth masks, READMEs, licence files)."""
    if len(rel) >= 3 and rel[-2] in UNLABELLED_SPLITS:
        return rel[-3], rel[-2], "unknown"
    if len(rel) >= 4 and rel[-3] in INDUSTRIAL_SPLITS:
        return rel[-4], rel[-3], rel[-2]
    return None


def _discover_industrial(listing: Listing) -> list[SlideSource]:
    out = []
    for rel, uri in sorted(listing.items()):
        if _suffix(rel[-1]) not in IMAGE_SUFFIXES:
            continue
        place = _industrial_place(rel)
        if place is None:
            continue
        category, folder, defect = place
        split = INDUSTRIAL_SPLITS[folder]
        stem = _stem(rel[-1])
        mask = None
        if folder in UNLABELLED_SPLITS:
            label = "unknown"  # MVTec AD 2's private test sets: labels are not released
        elif defect == NORMAL_DEFECT:
            label = "normal"
        else:
            label = "anomalous"
            mask = _defect_mask(listing, rel, defect, stem)
        slide_id = safe_slide_id(f"{category}-{folder}-{defect}-{stem}")
        out.append(SlideSource(slide_id, uri, label, defect, split, mask))
    return out


def _defect_mask(listing: Listing, rel: tuple[str, ...], defect: str, stem: str) -> str | None:
    """The ground-truth mask of a defective image: `<category>/ground_truth/<defect>/` (MVTec
    AD, VisA) or `<category>/<split>/ground_truth/<defect>/` (MVTec AD 2), named
    `<stem>_mask.png` (MVTec) or `<stem>.png` (VisA)."""
    for folder in ((*rel[:-3], "ground_truth", defect), (*rel[:-2], "ground_truth", defect)):
        for name in (f"{stem}_mask.png", f"{stem}.png"):
            if (found := listing.get((*folder, name))) is not None:
                return found
    return None


def _screened(source: SlideSource, root: Path | None) -> SlideSource:
    """`source`, with a `reject` reason if it must not be opened (see the module docstring)."""
    if root is None:  # S3: a `..` or empty segment may name another object once normalised
        segments = source.uri[len("s3://") :].split("/")[1:]
        if any(part in ("", ".", "..") for part in segments):
            return replace(
                source,
                reject=f"{source.uri}: the key has a '.', '..' or empty path segment; "
                "rename the object so its key is a plain path under the site prefix",
            )
        return source
    for uri in (source.uri, source.annotation_uri):
        resolved = Path(uri).resolve() if uri else root
        if not resolved.is_relative_to(root):
            return replace(
                source,
                reject=f"{Path(uri).relative_to(root)}: links to {resolved}, outside the site "
                f"folder {root}; copy the file into the site folder instead of linking to it",
            )
    return source


def _one_file_per_id(
    found: list[SlideSource], source: str | Path, storage: StorageOptions | None
) -> list[SlideSource]:
    """Files that share a slide id (one stem in two folders) cannot both be that slide.

    Exact copies that agree on label and split: the first (by URI) is kept and the others are
    rejected as copies. Otherwise the id is ambiguous (which file do the label, the annotation
    and `reference.csv` mean?), so every one of them is rejected. The first keeps the id, the
    others get `<id>--dup-<hash of uri>`, so each has its own manifest row and reason file.
    """
    groups: dict[str, list[SlideSource]] = {}
    for item in found:
        groups.setdefault(item.slide_id, []).append(item)
    out: list[SlideSource] = []
    for slide_id, items in groups.items():
        if len(items) == 1:
            out += items
            continue
        items = sorted(items, key=lambda s: s.uri)
        names = ", ".join(_relative(s.uri, source) for s in items)
        same = len({(s.label, s.split) for s in items}) == 1 and _same_content(items, storage)
        for index, item in enumerate(items):
            if same and index == 0:
                out.append(item)
                continue
            if same:
                why = f"an exact copy of {_relative(items[0].uri, source)}, which is used"
            else:
                why = "the files differ, so which one the label and annotations mean is unknown"
            out.append(
                replace(
                    item,
                    slide_id=slide_id if index == 0 else _dup_id(slide_id, item.uri),
                    reject=item.reject
                    or f"slide id {slide_id!r} is shared by {len(items)} files ({names}): "
                    f"{why}; rename or remove all but one",
                )
            )
    return out


def _relative(uri: str, source: str | Path) -> str:
    base = str(source).rstrip("/") + "/"
    if uri.startswith(base):
        return uri[len(base) :]
    if not is_remote(source) and Path(uri).is_relative_to(Path(source).resolve()):
        return Path(uri).relative_to(Path(source).resolve()).as_posix()
    return uri


CASE_SUFFIX = "--case-"  # marks an id renamed because another differed from it only in case


def _distinct_ignoring_case(found: list[SlideSource]) -> list[SlideSource]:
    """Ids that differ only in case (`Case_A`, `case_a`) would write the same outputs on a
    case-insensitive file system (macOS, Windows, many NAS shares): the first (sorted) keeps
    its id, the others get `<id>--case-<hash of id>`; `label_gaps` lists them."""
    groups: dict[str, list[SlideSource]] = {}
    for item in found:
        groups.setdefault(item.slide_id.casefold(), []).append(item)
    out: list[SlideSource] = []
    for items in groups.values():
        items = sorted(items, key=lambda s: s.slide_id)
        out.append(items[0])
        for item in items[1:]:
            suffix = f"{CASE_SUFFIX}{hashlib.sha256(item.slide_id.encode()).hexdigest()[:8]}"
            renamed = item.slide_id[: MAX_ID_LENGTH - len(suffix)].rstrip("._-") + suffix
            out.append(replace(item, slide_id=renamed))
    return out


def _dup_id(slide_id: str, uri: str) -> str:
    suffix = f"--dup-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"
    return slide_id[: MAX_ID_LENGTH - len(suffix)].rstrip("._-") + suffix


def _same_content(items: list[SlideSource], storage: StorageOptions | None) -> bool:
    """Whether the files hold the same bytes: size, then SHA-256 (local) or ETag (S3)."""
    if any(s.reject for s in items):
        return False
    store = storage_for(items[0].uri, storage)
    try:
        if len({store.size(s.uri) for s in items}) > 1:
            return False
        if is_remote(items[0].uri):
            return len({store.etag(s.uri) for s in items}) == 1
        return len({_sha256(Path(s.uri)) for s in items}) == 1
    except OSError:
        return False  # unreadable: not provably the same, so every copy is rejected


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _hold_out_val(
    sources: list[SlideSource], val_fraction: float, domain: str = "pathology"
) -> list[SlideSource]:
    """Move a deterministic share of normal training slides to `val` for calibration.

    Industrial images are held out per category (each category's model is calibrated on its
    own good images), and not at all in a category whose release has its own validation split
    (MVTec AD 2's `validation/good`)."""
    if domain != "industrial":
        return _hold_out(sources, val_fraction)
    groups: dict[str, list[SlideSource]] = {}
    for s in sources:
        groups.setdefault(industrial_category(s.uri), []).append(s)
    out: list[SlideSource] = []
    for members in groups.values():
        own_val = any(s.split == "val" for s in members)
        out += members if own_val else _hold_out(members, val_fraction)
    return sorted(out, key=lambda s: s.slide_id)


def _hold_out(sources: list[SlideSource], val_fraction: float) -> list[SlideSource]:
    train_normals = [
        s for s in sources if s.split == "train" and s.label == "normal" and s.reject is None
    ]
    n_val = round(len(train_normals) * val_fraction)
    if val_fraction > 0 and len(train_normals) >= 2:
        n_val = max(1, min(n_val, len(train_normals) - 1))
    else:
        n_val = 0
    # Stable order independent of file-system listing: by a hash of the id.
    chosen = sorted(train_normals, key=lambda s: hashlib.sha1(s.slide_id.encode()).hexdigest())
    val_ids = {s.slide_id for s in chosen[:n_val]}
    return [replace(s, split="val") if s.slide_id in val_ids else s for s in sources]
