"""A synthetic site laid out exactly as a public release is, to test vadflow on that layout.

`as_camelyon16_release` rearranges a site made by `make_pathology_site` into the Camelyon16
download's folders and file names: slides numbered from 001, `training/lesion_annotations/`,
`testing/images/`, a header-less `testing/reference.csv` with `Test_NNN,Tumor|Normal,...` rows
(capitalised, as released) and the test annotations zipped as `testing/lesion_annotations.zip`.
Slides are hard links where the file system allows (no pixel is copied).
"""

from __future__ import annotations

import csv
import os
import shutil
import zipfile
from pathlib import Path

import yaml

from vadflow.tasks.site import read_yaml_mapping


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def as_camelyon16_release(site: Path, out: Path, *, zipped: bool = True) -> Path:
    """Write `site` (from `make_pathology_site`) to `out` in the Camelyon16 release layout.

    `out/site.yaml` keeps the synthetic site's settings (its name and FROC rule), as a user adds
    one beside a download. Returns `out`; refuses an `out` that is not empty.
    """
    site, out = Path(site), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new folder for the release layout")
    annotations = site / "lesion_annotations"
    for kind in ("normal", "tumor"):
        for index, slide in enumerate(sorted((site / "training" / kind).glob("*.tif")), start=1):
            name = f"{kind}_{index:03d}"
            _place(slide, out / "training" / kind / f"{name}.tif")
            xml = annotations / f"{slide.stem}.xml"
            if xml.exists():
                _place(xml, out / "training" / "lesion_annotations" / f"{name}.xml")
    labels = _reference(site / "testing" / "reference.csv")
    rows, test_xml = [], []
    for index, slide in enumerate(sorted((site / "testing" / "images").glob("*.tif")), start=1):
        name = f"test_{index:03d}"
        _place(slide, out / "testing" / "images" / f"{name}.tif")
        tumour = labels[slide.stem] == "tumor"
        rows.append([name.capitalize(), "Tumor" if tumour else "Normal"])
        rows[-1] += ["Macro", "Primary"] if tumour else ["None", "None"]
        xml = annotations / f"{slide.stem}.xml"
        if xml.exists():
            test_xml.append((xml, f"{name}.xml"))
    if rows:
        with (out / "testing" / "reference.csv").open("w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)  # no header, as released
    if zipped and test_xml:
        with zipfile.ZipFile(out / "testing" / "lesion_annotations.zip", "w") as bundle:
            for xml, name in test_xml:
                bundle.write(xml, f"lesion_annotations/{name}")
    else:
        for xml, name in test_xml:
            _place(xml, out / "testing" / "lesion_annotations" / name)
    settings = read_yaml_mapping(site / "site.yaml")
    (out / "site.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return out


def _reference(path: Path) -> dict[str, str]:
    """The synthetic site's own `image,label` reference: stem -> 'tumor' | 'normal'."""
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        return {
            row[0]: row[1].strip().lower()
            for row in csv.reader(handle)
            if len(row) >= 2 and row[1].strip().lower() in ("tumor", "normal")
        }
