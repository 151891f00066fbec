"""Site configuration and the on-disk layout of a site's outputs.

A *site* is one hospital or one production line. Its settings are validated by pydantic so a
typo in a site file fails at load time with the field's name, not hours into a nightly run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vadflow.tasks.detectors.registry import check_family
from vadflow.tasks.slides.storage import StorageOptions, is_remote, join

SITE_FILE = "site.yaml"

# The families a site trains when its file names none, per domain (README, the site settings
# table, says why): padim on tissue (it ranks lesions, holds up best with an unlabelled tumour
# slide in training and trains nothing); patch_knn on a line, at the industrial defaults
# (`tasks/detectors/settings.py: DOMAIN_DEFAULTS`), the best row of the hard industrial line.
DOMAIN_FAMILIES: dict[str, tuple[str, ...]] = {
    "pathology": ("padim",),
    "industrial": ("patch_knn",),
}


class TilingConfig(BaseModel):
    """How tiles are cut and how coarse the slide heatmap is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_size: int = Field(64, ge=16, le=1024, description="tile edge in pixels at the working MPP")
    stride: int | None = Field(None, ge=8, description="step between tiles; default = tile_size")
    target_mpp: float | None = Field(
        0.5, gt=0, description="working resolution in um/px; None reads level 0 (industrial)"
    )
    mask_mpp: float = Field(
        8.0, gt=0, description="finest resolution (um/px) the tissue mask is computed at"
    )
    mask_mpp_max: float = Field(
        16.0, gt=0, description="coarsest mask resolution (um/px), used for very large slides"
    )
    mask_preset: str | None = Field(
        None,
        description="named masking settings (tasks/tiling/presets.py MASK_PRESETS); "
        "None: 'he' for pathology, 'object-dark' for industrial",
    )
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)
    min_object_um2: float | None = Field(
        None, ge=0, description="tissue specks smaller than this (um^2) are dropped; None: preset's"
    )
    heatmap_downsample: int = Field(16, ge=1, description="heatmap pixel = this many level-0 px")
    foreground_mask: bool = Field(
        False,
        description="industrial only: True tiles only the object found on a plain background; "
        "False (the MVTec AD protocol) scores every pixel of the image",
    )

    @property
    def step(self) -> int:
        return self.stride or self.tile_size

    @model_validator(mode="after")
    def _known_preset(self) -> TilingConfig:
        # The presets are data (tiling/presets.py imports nothing from tiling), so a site file
        # is checked without loading the masking code or its image libraries.
        from vadflow.tasks.tiling.presets import mask_preset

        if self.mask_preset is not None:
            mask_preset(self.mask_preset)  # raises, naming the known presets
        if self.mask_mpp_max < self.mask_mpp:
            raise ValueError("tiling.mask_mpp_max must be >= tiling.mask_mpp")
        return self


class QcConfig(BaseModel):
    """Artefact quality control (tasks/tiling/qc.py) between tissue masking and tiling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="look for artefacts on pathology slides")
    kinds: tuple[Literal["pen", "bubble", "crack", "fold", "edge", "blur"], ...] = Field(
        ("pen", "bubble", "crack", "fold", "edge", "blur"), description="which artefacts to find"
    )
    edge_um: float = Field(15.0, ge=0, description="band inside the tissue's border that is QC'd")
    qc_mpp: float = Field(2.0, gt=0, description="resolution (um/px) the artefacts are found at")
    keep_artefacts: bool = Field(
        False,
        description="True: tiles under QC count in slide scores and lesion candidates as well",
    )


class StorageConfig(BaseModel):
    """How to reach an S3(-compatible) store for `s3://` sources and outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph...); None: AWS or $AWS_ENDPOINT_URL"
    )
    cache_dir: str | None = Field(
        None, description="where S3 slides are downloaded; None: $VADFLOW_HOME/cache/slides"
    )
    max_attempts: int = Field(5, ge=1, le=20, description="boto3 standard-mode retry attempts")
    addressing_style: Literal["auto", "path", "virtual"] = "auto"

    def options(self) -> StorageOptions:
        return StorageOptions(
            endpoint_url=self.endpoint_url,
            cache_dir=self.cache_dir,
            max_attempts=self.max_attempts,
            addressing_style=self.addressing_style,
        )


class ParallelConfig(BaseModel):
    """Where slides are tiled in parallel: local processes by default, or a Dask cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["process", "dask", "serial"] = "process"
    workers: int | None = Field(
        None, ge=1, description="processes (or local Dask workers); None: the CPU count"
    )
    dask_address: str | None = Field(
        None, description="scheduler address (tcp://host:8786); None starts a local cluster"
    )
    min_megapixels: float = Field(
        1000.0,
        ge=0,
        description="workers start only when the slides left to tile add up to this many level-0 "
        "megapixels: a spawned worker spends seconds importing, more than a few small slides take",
    )


class LimitsConfig(BaseModel):
    """Sizes a slide may have, checked at registration from its header, before any pixel is
    decoded; a slide past them is quarantined with its figures (defaults fit a 2-core, 8 GB
    worker and a whole Camelyon16 slide at the default tiling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_mask_megapixels: float = Field(
        400.0,
        gt=0,
        description="pixels the tissue mask must decode at least (the smallest pyramid level); "
        "a 40,000 x 40,000 px image without a pyramid is 1,600",
    )
    max_tiles_per_slide: int = Field(
        2_000_000, ge=1, description="tile grid positions at the working resolution"
    )
    max_tiles_per_run: int = Field(
        400_000_000,
        ge=1,
        description="tile grid positions of all the slides a run would tile (400 Camelyon16 "
        "slides are ~250 million); past it the run stops before tiling, naming the largest",
    )


class CandidatesConfig(BaseModel):
    """Lesion candidates a person reads: one per lesion-sized neighbourhood, the strongest few."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suppress_um: float = Field(
        100.0,
        gt=0,
        description="a weaker candidate closer than this to a stronger one is the same lesion "
        "(um; level-0 px for images without an MPP)",
    )
    max_per_slide: int = Field(
        100, ge=1, description="the strongest this many per slide (FROC reads up to 8 false ones)"
    )


class AggregationConfig(BaseModel):
    """How a slide's tile scores become its slide score (`tasks/scoring/tail.py`).

    `tail`: tile scores become tail p-values against the held-out normal tiles, and the slide
    score is how surprising the slide's count of unlikely tiles (p < `alpha`) is; `max`: the
    heatmap maximum; `auto` (default): `tail` when the site holds out at least two normal
    slides (the reference must see how normal slides differ from each other) and the family
    learned without lesion labels, else `max` (a classifier's tile scores have no outliers on
    normal tissue to count past: supervised_cnn, seed 1, 0.84 with `tail`, 1.00 with `max`);
    `forest`: the cross-validated random forest on heatmap features (needs labelled test
    slides; slides it cannot score fall back to `max`). On the medium hard synthetic site
    (seeds 0-4, with artefact QC) `tail` gave slide AUC 0.82 on average against the maximum's
    0.66 (patch_knn and padim): normal slides have isolated outlier tiles (folds, edges),
    lesions many. `baseline` aligns each slide on a low quantile of its own tile scores before
    the count (`tasks/scoring/tail.py`, `slide_tail_scores`): slide AUC 0.952 against 0.908
    for patch_knn, 0.940 against 0.908 for padim, seeds 0-9 of the same site.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    slide_score: Literal["auto", "tail", "max", "forest"] = "auto"
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="a tile is unlikely when its tail p-value is below this (0.05 measured best "
        "on the medium synthetic site's ~130-tile slides; large real slides may want 0.01)",
    )
    baseline: float | None = Field(
        0.1,
        ge=0,
        le=0.5,
        description="tail: each slide's tile scores are aligned on this quantile of their own "
        "before the count, so a slide whose tissue all scores a little high (stain, thickness, "
        "scanner) is not called for it; null compares raw scores",
    )


class PromotionConfig(BaseModel):
    """The champion gate: which evaluation metric decides, by how much it must improve, and the
    floor a version must clear even with no champion to beat (`min`: metric -> minimum; with
    no labels, the model's normal-validation statistics are checked instead, see
    `vadflow.tasks.tracking.registry.floor_failure`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["slide_auroc", "froc", "pixel_auroc", "pro", "slide_f1_max"] = "slide_auroc"
    margin: float = Field(0.0, ge=0, description="challenger must beat the champion by more")
    higher_is_better: bool = True
    min: dict[str, float] = Field(
        default_factory=lambda: {"slide_auroc": 0.6},
        description="metric -> the least a version needs to become champion ({} for no floor)",
    )


class AugmentationConfig(BaseModel):
    """Training-time augmentation (`tasks/detectors/components/augment.py`), never when scoring.

    The defaults are flips only, what every family did before the other kinds existed. On the
    stain-shift test (tests/test_cross_site.py) HED jitter up to 0.2 did not shrink ae_l2's
    cross-site drop while Macenko normalisation removed it, so jitter stays opt-in.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    flips: bool = Field(True, description="random horizontal and vertical flips")
    rot90: bool = Field(False, description="random quarter turns (square tiles)")
    hed_jitter: float = Field(
        0.0, ge=0, le=0.5, description="H and E scaled by U(1-s,1+s), shifted by U(-s,s) in OD"
    )
    hsv_jitter: float = Field(
        0.0, ge=0, le=0.5, description="hue turned by U(-s,s) of a circle, saturation x U(1-s,1+s)"
    )
    brightness: float = Field(0.0, ge=0, le=0.5, description="U(-b,b) added to every channel")
    contrast: float = Field(0.0, ge=0, le=0.9, description="distance from the mean x U(1-c,1+c)")


class SiteConfig(BaseModel):
    """Everything the nightly flow needs to know about one site."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    domain: Literal["pathology", "industrial"]
    source: str = Field(description="folder (or URI) holding the site's slides or images")
    families: list[str] = Field(
        default_factory=lambda: list(DOMAIN_FAMILIES["pathology"]),
        description="families trained each night; default per domain (DOMAIN_FAMILIES)",
    )
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    qc: QcConfig = Field(default_factory=QcConfig)
    detectors: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-family overrides of the family's config dataclass"
    )
    mpp_override: float | None = Field(
        None, gt=0, description="level-0 um/px for slides whose files carry no (or an absurd) MPP"
    )
    mpp_bounds: tuple[float, float] = Field(
        (0.05, 20.0), description="a level-0 MPP outside this range (um/px) is not believed"
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    val_fraction: float = Field(
        0.25, ge=0, lt=1, description="share of normal training slides held out for calibration"
    )
    target_fpr: float = Field(0.05, gt=0, lt=1, description="threshold = normal quantile 1-fpr")
    max_train_tiles: int = Field(4000, ge=16)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    contracts: Literal["strict", "quarantine"] = Field(
        "strict", description="on a contract failure: stop the run, or quarantine the slides"
    )
    stain_normalisation: Literal["none", "reinhard", "macenko"] = Field(
        "none", description="fitted on this site's normal training tiles, saved with the model"
    )
    augmentation: AugmentationConfig = Field(
        default_factory=AugmentationConfig,
        description="training-time augmentation for every family with an `augment` field; "
        "`detectors: {family: {augment: ...}}` overrides it for one family",
    )
    pseudonymise_ids: bool = Field(
        False, description="slide ids in outputs become keyed hashes (no patient identifiers)"
    )
    pseudonym_key_block: str | None = Field(
        None, description="Prefect Secret block holding the key; else $VADFLOW_PSEUDONYM_KEY"
    )
    leakage: Literal["warn", "refuse"] = Field(
        "warn",
        description="a test slide that is a byte copy of a training slide: warn (listed in the "
        "run summary) or refuse to run",
    )
    froc_itc_um: float = Field(
        275.0,
        ge=0,
        description="Camelyon16 ignores lesions with a shorter major axis (isolated tumour cells)",
    )
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _domain_families(cls, data: Any) -> Any:
        # A site file that names no families trains its domain's (DOMAIN_FAMILIES).
        if (
            isinstance(data, dict)
            and "families" not in data
            and data.get("domain") in DOMAIN_FAMILIES
        ):
            return {**data, "families": list(DOMAIN_FAMILIES[data["domain"]])}
        return data

    @model_validator(mode="after")
    def _known_families(self) -> SiteConfig:
        # Names only (no family is imported): a typo fails here, in milliseconds.
        for family in (*self.families, *self.detectors):
            check_family(family)
        return self

    @model_validator(mode="after")
    def _plausible_mpp(self) -> SiteConfig:
        lo, hi = self.mpp_bounds
        if not 0 < lo < hi:
            raise ValueError(f"mpp_bounds must be two increasing positive numbers, got {lo}, {hi}")
        if self.mpp_override is not None and not lo <= self.mpp_override <= hi:
            raise ValueError(
                f"mpp_override {self.mpp_override} um/px is outside mpp_bounds {lo}-{hi}"
            )
        return self

    @model_validator(mode="after")
    def _industrial_defaults(self) -> SiteConfig:
        if self.domain == "industrial" and self.tiling.target_mpp is not None:
            raise ValueError(
                "industrial sites have no MPP: set tiling.target_mpp to null in the site file"
            )
        return self


def load_site(site_dir: str | Path, name: str | None = None) -> SiteConfig:
    """Read `<site_dir>/site.yaml`; without one, guess the domain from the folder layout."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise FileNotFoundError(f"site folder {site_dir} does not exist: give a folder of slides")
    path = site_dir / SITE_FILE
    if path.exists():
        data = read_yaml_mapping(path)
    else:
        data = {"domain": _guess_domain(site_dir)}
        if data["domain"] == "industrial":
            data["tiling"] = {"target_mpp": None, "heatmap_downsample": 1}
    data.setdefault("name", name or _slug(site_dir.name))
    # The slides sit beside site.yaml unless it names a source: s3://bucket/prefix, or a folder
    # (relative to the site folder).
    source = data.get("source")
    if not source:
        data["source"] = str(site_dir.resolve())
    elif not is_remote(source):
        data["source"] = str((site_dir / Path(source).expanduser()).resolve())
    return SiteConfig.model_validate(data)


MAX_CONFIG_BYTES = 1 << 20  # a site file is a few hundred bytes; 1 MiB is already absurd
MAX_CONFIG_ALIASES = 64  # YAML aliases (*name) a settings file may use
MAX_CONFIG_NODES = 100_000  # values, lists and mappings, aliases counted where they point
MAX_CONFIG_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing the shapes only a hostile file has: many aliases (a
    539-byte "billion laughs" file expands to hundreds of millions of values), too many nodes,
    or nesting too deep for any setting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = self._nodes = self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_CONFIG_ALIASES:
                raise _limit(self, f"more than {MAX_CONFIG_ALIASES} aliases (*name)")
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise _limit(self, f"more than {MAX_CONFIG_NODES:,} values")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _limit(self, f"nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps the last of two equal keys without a word; a setting written twice is
        # a mistake whichever one was meant. (`<<` merges may still be overridden.)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"the key {key!r} is given twice: keep one",
                    problem_mark=key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _ConfigLimitError(yaml.constructor.ConstructorError):
    """A settings file past one of the loader's limits."""


def _limit(loader: yaml.SafeLoader, what: str) -> yaml.YAMLError:
    return _ConfigLimitError(
        problem=f"{what}: a settings file never needs this many", problem_mark=loader.get_mark()
    )


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file of settings as a dict ({} when empty); ValueError naming the file, line and
    column of a syntax error, saying the top level is not a mapping, or naming the limit a
    hostile file broke (size, aliases, values, depth), checked before anything is expanded."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{path}: {size:,} bytes, more than a settings file's {MAX_CONFIG_BYTES:,}; "
            "is this the right file?"
        )
    try:
        data = yaml.load(path.read_text(), Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        what = "refused" if isinstance(exc, _ConfigLimitError) else "not valid YAML"
        raise ValueError(f"{path}:{where}: {what} ({problem}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of settings (key: value lines) at the top level, "
            f"got a {type(data).__name__}"
        )
    return data


def _guess_domain(site_dir: Path) -> Literal["pathology", "industrial"]:
    # MVTec AD layout: <category>/train/good
    return "industrial" if any(site_dir.glob("*/train/good")) else "pathology"


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return out or "site"


class SiteLayout:
    """Paths under `<root>/<site>/`, the same locally and under an S3 prefix.

    The `Path` properties serve local roots. The `*_uri` properties are strings that work for
    both, and are what the storage-aware functions (tiling, registration) take.
    """

    def __init__(self, root: str | Path, site: str) -> None:
        self.site = site
        self.root_uri = join(root, site)
        self.remote = is_remote(root)
        self._root = Path(root) / site if not self.remote else None

    @property
    def root(self) -> Path:
        if self._root is None:
            raise ValueError(
                f"{self.root_uri}: an S3 output root has no local path; use the *_uri properties"
            )
        return self._root

    def uri(self, *parts: str) -> str:
        return join(self.root_uri, *parts)

    @property
    def slides_manifest_uri(self) -> str:
        return self.uri("slides.parquet")

    @property
    def tiles_uri(self) -> str:
        return self.uri("tiles")

    @property
    def masks_uri(self) -> str:
        return self.uri("masks")

    @property
    def quarantine_uri(self) -> str:
        return self.uri("quarantine")

    @property
    def slides_manifest(self) -> Path:
        return self.root / "slides.parquet"

    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def model_dir(self, family: str, version: str) -> Path:
        return self.root / "models" / family / version

    def scores(self, model: str) -> Path:
        return self.root / "scores" / model

    def heatmaps(self, model: str) -> Path:
        return self.root / "heatmaps" / model

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
