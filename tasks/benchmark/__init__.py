"""The honest results table: every detector family on the same hard synthetic site.

Each registered family trains with the same budget (epochs, tile size, seed, device) on the
normal training tiles of a small hard-mode site (tasks/synth/pathology.py: lesions at the
host's stain, folds, fat, cracks, stroma bands) and scores its validation and test slides.
Tiling, scoring, heatmaps and metrics are the nightly flow's own functions (`tile_slide`,
`score_slide`, `evaluate_site`), without Prefect or MLflow:

- tile AUROC: tiles at least half lesion against lesion-free tiles (tiles in between are left
  out of this number, not of the others);
- slide AUC: slide score = maximum of its heatmap; tumour against normal test slides;
- FROC: Camelyon16's, from heatmap local maxima, lesions from 10 um up (FROC_ITC_UM);
- pixel AUROC: heatmaps against the ground-truth masks of the test slides;
- seconds: fit plus scoring, on this machine;
- direction: "inverted" when tile AUROC < 0.5, i.e. the family ranks lesions *below* normal
  tissue, the failure a residual score shows on lesions that are easier to reconstruct than
  stroma. It is flagged, not hidden.

A family that fails (raises) gets a row with its error, and the others still run. The site has
annotated tumour training slides too, so the labelled baselines (supervised_cnn from tile
labels, mil from slide labels) train on it the way the nightly flow trains them and sit in the
same table as what labels buy; the unsupervised families never see those slides.

Modules: `hard_site` (the site and its sizes), `tiles` (tiling it as the pipeline does),
`families` (configuring, fitting, scoring one family; the whole run), `table` (printing),
`industrial` (the same on a hard industrial line: a row per family and category).
"""

from vadflow.tasks.benchmark.families import (
    FROC_ITC_UM,
    SCORES,
    BenchmarkRow,
    benchmark_detectors,
    benchmark_families,
    benchmark_settings,
    configured_detector,
    fit_family,
    run_family,
    score_and_evaluate,
)
from vadflow.tasks.benchmark.hard_site import SIZES, SiteSize, build_hard_site, site_size
from vadflow.tasks.benchmark.industrial import (
    LINE_DETECTORS,
    LINE_SIZES,
    LINE_TILING,
    LineSize,
    benchmark_industrial,
    build_hard_line,
    industrial_row,
    line_categories,
    line_size,
)
from vadflow.tasks.benchmark.table import (
    format_industrial_table,
    format_table,
    print_industrial_table,
    print_table,
)
from vadflow.tasks.benchmark.tiles import (
    TILE_POSITIVE,
    BenchmarkData,
    TileSet,
    contaminated_training,
    load_benchmark_tiles,
    tile_auroc,
)

__all__ = [
    "FROC_ITC_UM",
    "LINE_DETECTORS",
    "LINE_SIZES",
    "LINE_TILING",
    "SCORES",
    "SIZES",
    "TILE_POSITIVE",
    "BenchmarkData",
    "BenchmarkRow",
    "LineSize",
    "SiteSize",
    "TileSet",
    "benchmark_detectors",
    "benchmark_families",
    "benchmark_industrial",
    "benchmark_settings",
    "build_hard_line",
    "build_hard_site",
    "configured_detector",
    "fit_family",
    "format_industrial_table",
    "format_table",
    "industrial_row",
    "line_categories",
    "line_size",
    "contaminated_training",
    "load_benchmark_tiles",
    "print_industrial_table",
    "print_table",
    "run_family",
    "score_and_evaluate",
    "site_size",
    "tile_auroc",
]
