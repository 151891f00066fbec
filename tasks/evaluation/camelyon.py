"""The Camelyon16 evaluation mask, and the challenge's lesion-submission CSV.

Official definitions (Camelyon16 ``Evaluation_FROC.py``, ``computeEvaluationMask`` and
``computeITCList``), which ``evaluation_mask`` reproduces for a mask at any downsample:

- the ground-truth tumour mask is read at level 5 (32x downsample; 0.243 um/px at level 0, so
  7.776 um per mask pixel);
- every mask pixel whose Euclidean distance to the nearest tumour pixel is below
  75 / (2 * pixel size) is tumour: each annotation grows by 37.5 um, so annotations less than
  75 um ("about five tumour cells") apart merge into one lesion;
- holes are filled, and the result is labelled with 8-connectivity (``connectivity=2``);
- a region whose ``regionprops`` major axis length (of the grown region, in mask pixels) is
  below 275 / pixel size, i.e. whose major axis is under 275 um, is an isolated tumour cell
  cluster (ITC). A detection that hits an ITC is neither a true nor a false positive, and ITCs
  do not count towards the number of lesions.

Detections are submitted per slide as CSV lines ``probability,x,y`` (level-0 pixels, no header);
``write_camelyon_csv`` / ``read_camelyon_csv`` handle that format.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import label, regionprops

from vadflow.tasks.scoring.aggregate import Candidate
from vadflow.tasks.slides.ground_truth import ground_truth_mask

CAMELYON_MPP = 0.243  # level-0 um/px the official script assumes for every slide
CAMELYON_DOWNSAMPLE = 32  # level 5
DILATION_UM = 75.0  # annotations closer than this merge (each grows by half of it)
ITC_MAJOR_AXIS_UM = 275.0  # regions with a shorter major axis are isolated tumour cells


@dataclass(frozen=True, eq=False)
class EvaluationMask:
    """A Camelyon16 evaluation mask: labelled lesions, their scale, and which ones are ITCs.

    ``labels`` is int32, 0 outside lesions and 1..n for the 8-connected regions; mask pixel
    (row, col) covers level-0 [col*ds, (col+1)*ds) x [row*ds, (row+1)*ds) with
    ds = ``downsample``. ``itc`` holds the labels of isolated tumour cells (ignored by FROC).
    """

    labels: np.ndarray
    downsample: float
    itc: frozenset[int] = frozenset()

    @property
    def lesion_ids(self) -> list[int]:
        """Labels that count as lesions: every region that is not an ITC."""
        ids = np.unique(self.labels)
        return [int(i) for i in ids if i > 0 and int(i) not in self.itc]

    @property
    def n_lesions(self) -> int:
        return len(self.lesion_ids)


def evaluation_mask(
    tumour_mask: np.ndarray,
    downsample: float = CAMELYON_DOWNSAMPLE,
    mpp: float = CAMELYON_MPP,
    *,
    dilation_um: float = DILATION_UM,
    itc_um: float = ITC_MAJOR_AXIS_UM,
) -> EvaluationMask:
    """Camelyon16 evaluation mask from a binary tumour mask at ``downsample`` from level 0.

    ``mpp`` is the level-0 pixel size in um, so a mask pixel is ``mpp * downsample`` um wide
    (the official script: 0.243 * 2**5). Grow by ``dilation_um / 2`` (distance transform,
    strictly below), fill holes, label 8-connected, flag regions with major axis below
    ``itc_um`` as ITCs; see the module docstring for the official definitions.
    """
    mask = np.asarray(tumour_mask)
    if mask.ndim != 2:
        raise ValueError(f"tumour mask must be 2-D, got shape {mask.shape}")
    if not (downsample > 0 and mpp > 0):
        raise ValueError(f"downsample and mpp must be positive, got {downsample}, {mpp}")
    pixel_um = mpp * downsample
    tumour = mask.astype(bool)
    if not tumour.any():
        return EvaluationMask(np.zeros(mask.shape, np.int32), float(downsample))
    # Distance of every pixel to the nearest tumour pixel (0 on tumour), in mask pixels.
    distance = ndimage.distance_transform_edt(~tumour)
    grown = tumour | (distance < dilation_um / (2.0 * pixel_um))  # tumour itself even at 0
    filled = ndimage.binary_fill_holes(grown)
    labels = label(filled, connectivity=2).astype(np.int32)
    itc_px = itc_um / pixel_um
    itc = frozenset(int(p.label) for p in regionprops(labels) if p.axis_major_length < itc_px)
    return EvaluationMask(labels, float(downsample), itc)


def evaluation_mask_from_annotations(
    annotation_uri: str | None,
    width: int,
    height: int,
    mpp: float = CAMELYON_MPP,
    downsample: float = CAMELYON_DOWNSAMPLE,
) -> EvaluationMask:
    """Evaluation mask of one slide from its annotation (ASAP XML or mask image).

    The annotation is rasterised at ``downsample`` (``ground_truth_mask``; a mask pixel is
    tumour when at least half of it is) and passed to ``evaluation_mask``. Pass the slide's
    own level-0 ``mpp``; the official script assumes 0.243 for every slide.
    """
    truth = ground_truth_mask(annotation_uri, width, height, downsample)
    return evaluation_mask(truth >= 0.5, downsample, mpp)


def write_camelyon_csv(path: str | Path, candidates: Sequence[Candidate]) -> Path:
    """Write detections as the Camelyon16 submission CSV: ``probability,x,y`` per line.

    The official reader takes x and y as integers (level-0 pixels), so they are floored;
    probabilities are written with ``repr`` so they read back exactly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        for x, y, p in candidates:
            if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(p)):
                raise ValueError(f"{path.name}: candidate ({x}, {y}, {p}) is not finite")
            writer.writerow([repr(float(p)), math.floor(x), math.floor(y)])
    return path


def read_camelyon_csv(path: str | Path) -> list[Candidate]:
    """Detections (x, y, p) from a Camelyon16 submission CSV; a header line is tolerated."""
    path = Path(path)
    out: list[Candidate] = []
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip():
                continue
            try:
                p, x, y = (float(v) for v in row[:3])
            except ValueError as exc:
                if number == 1:
                    continue  # a header
                raise ValueError(f"{path}: line {number} is not probability,x,y ({exc})") from exc
            out.append((x, y, p))
    return out
