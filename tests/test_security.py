"""Security: safe slide ids, weights-only loading, no leaked credentials, pseudonyms, no labels.

The credential test inspects the bad-input corpus run (tests/corpus.py), which ran the nightly
flow with fake AWS credentials and a fake pseudonym key in its environment.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from vadflow.tasks.slides.identity import (
    MAX_ID_LENGTH,
    PSEUDONYM_KEY_ENV,
    PseudonymKeyError,
    UnsafeSlideIdError,
    check_slide_id,
    is_safe_slide_id,
    path_under,
    pseudonym_key,
    pseudonymise,
    safe_slide_id,
)
from vadflow.tasks.slides.storage import join

pytest_plugins = ["tests.corpus"]

ROOT = Path(__file__).resolve().parents[1]
NASTY = [
    "../../etc/passwd",
    "..",
    "...",
    "a/../../b",
    "..\\..\\windows\\system32",
    "C:\\slides\\x",
    "/abs/path",
    "",
    " ",
    ".hidden",
    "-rf",
    "a:b",  # a colon would break tile ids (<slide_id>:<x>:<y>)
    "a b",
    "a_b",
    "tumör_Ärztin",
    "切片",
    "\u202eevil",  # right-to-left override
    "nul\x00byte",
    "x" * 300,
    "s3://bucket/key",
    "%2e%2e%2fetc",
]


# --- slide ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NASTY)
def test_every_name_becomes_a_safe_id_that_stays_in_its_folder(name: str, tmp_path: Path):
    slide_id = safe_slide_id(name)
    assert is_safe_slide_id(slide_id) and check_slide_id(slide_id) == slide_id
    assert len(slide_id) <= MAX_ID_LENGTH and ":" not in slide_id
    assert safe_slide_id(name) == slide_id  # deterministic: reruns find their own outputs
    for suffix in (".parquet", ".done.json", ".json", ".png", ".heatmap.tif"):
        path_under(tmp_path, f"{slide_id}{suffix}")  # raises if it left tmp_path
        key = join("s3://bucket/out/site/tiles", f"{slide_id}{suffix}")
        segments = key.removeprefix("s3://").split("/")
        assert segments[:4] == ["bucket", "out", "site", "tiles"] and len(segments) == 5
        assert all(s not in ("", ".", "..") for s in segments)


def test_safe_names_are_kept_and_unsafe_ones_never_collide() -> None:
    for name in ("normal_001", "test_042", "tumor-7.scan2", "Slide_A"):
        assert safe_slide_id(name) == name
    ids = [safe_slide_id(n) for n in NASTY]
    assert len(set(ids)) == len(NASTY)  # "a b" and "a_b" differ, thanks to the hash


def test_unsafe_ids_are_refused_where_paths_are_built(tmp_path: Path) -> None:
    from vadflow.tasks.site import TilingConfig
    from vadflow.tasks.slides.register import write_quarantine
    from vadflow.tasks.tiling.grid import tile_slide_safely

    for bad in ("../escape", "a/b", "..", ""):
        with pytest.raises(UnsafeSlideIdError, match="not a safe file name"):
            check_slide_id(bad)
    row = {"slide_id": "../../escape", "uri": str(tmp_path / "x.tif"), "status": "quarantined"}
    with pytest.raises(UnsafeSlideIdError):
        write_quarantine([{**row, "reason": "x"}], tmp_path / "quarantine")
    result = tile_slide_safely(
        {**row, "mpp": 0.25, "sha256": "0", "split": "test", "site": "s"},
        TilingConfig(),
        "pathology",
        tmp_path / "out" / "tiles",
        tmp_path / "out" / "masks",
    )
    assert result.status == "failed" and "not a safe file name" in result.reason
    assert not any(tmp_path.rglob("*escape*"))
    with pytest.raises(UnsafeSlideIdError, match="outside"):
        path_under(tmp_path / "out", "..", "x")


def test_discover_rejects_links_out_of_the_site_and_sanitises_ids(tmp_path: Path) -> None:
    from tests.corpus import write_pyramid
    from vadflow.tasks.slides.discover import discover
    from vadflow.tasks.slides.register import register_slide

    pixels = np.full((256, 256, 3), 200, np.uint8)
    site = tmp_path / "site"
    write_pyramid(site / "testing" / "images" / "ok.tif", pixels)
    write_pyramid(site / "testing" / "images" / "naïve name.tif", pixels)
    outside = write_pyramid(tmp_path / "elsewhere" / "secret.tif", pixels)
    (tmp_path / "elsewhere" / "x.xml").write_text("<ASAP_Annotations/>")
    (site / "testing" / "images" / "link.tif").symlink_to(outside)
    (site / "lesion_annotations").mkdir()
    (site / "lesion_annotations" / "ok.xml").symlink_to(tmp_path / "elsewhere" / "x.xml")
    found = {s.slide_id: s for s in discover(site, "pathology", val_fraction=0)}
    assert set(found) == {"ok", "link", safe_slide_id("naïve name")}
    assert found["link"].reject and "outside the site folder" in found["link"].reject
    assert found["ok"].annotation_uri is None  # a linked-out annotation is never read
    row = register_slide(found["link"], "s", "pathology")
    assert row["status"] == "quarantined" and row["size_bytes"] is None  # never opened


def test_s3_keys_with_dot_segments_are_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.server import ThreadedMotoServer

    from tests.corpus import write_pyramid
    from vadflow.tasks.slides.discover import discover
    from vadflow.tasks.slides.storage import StorageOptions, storage_for

    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = StorageOptions(endpoint_url=f"http://{host}:{port}", cache_dir=str(tmp_path))
        store = storage_for("s3://keys/x", options)
        store.client.create_bucket(Bucket="keys")
        body = write_pyramid(tmp_path / "a.tif", np.full((64, 64, 3), 200, np.uint8)).read_bytes()
        keys = ["ok", "../../other/evil", "./dot", "/empty"]
        for key in keys:
            store.write_bytes(f"s3://keys/site/testing/images/{key}.tif", body)
        found = {s.slide_id: s for s in discover("s3://keys/site", "pathology", 0, storage=options)}
    finally:
        server.stop()
    assert set(found) == {"ok", "evil", "dot", "empty"}
    assert found["ok"].reject is None
    for slide_id in ("evil", "dot", "empty"):
        assert "'..' or empty path segment" in found[slide_id].reject


def test_exact_copies_keep_one_and_differing_copies_are_all_rejected(tmp_path: Path) -> None:
    from tests.corpus import write_pyramid
    from vadflow.tasks.slides.discover import discover

    pixels = np.full((64, 64, 3), 200, np.uint8)
    images = tmp_path / "testing" / "images"
    first = write_pyramid(images / "copy.tif", pixels)
    (images / "again").mkdir()
    (images / "again" / "copy.tif").write_bytes(first.read_bytes())
    write_pyramid(images / "differ.tif", pixels)
    write_pyramid(images / "again" / "differ.tif", pixels[:, ::-1] // 2)
    found = discover(tmp_path, "pathology", val_fraction=0)
    by_id = {s.slide_id: s for s in found}
    assert len(found) == 4 and len(by_id) == 4  # every file has its own id
    copies = [s for s in found if s.slide_id.startswith("copy")]
    kept = min(str(first.resolve()), str((images / "again" / "copy.tif").resolve()))
    assert by_id["copy"].reject is None and by_id["copy"].uri == kept  # the first by URI
    [copy] = [s for s in copies if s.slide_id != "copy"]
    assert copy.slide_id.startswith("copy--dup-") and "an exact copy of" in copy.reject
    differ = [s for s in found if s.slide_id.startswith("differ")]
    assert len(differ) == 2 and all("the files differ" in s.reject for s in differ)


# --- weights-only loading -------------------------------------------------------------------

PROJECT_DIRS = ("flows", "tasks", "data_contracts", "deployments", "benchmarks", "tests")


def unsafe_torch_loads(source: str, filename: str = "<string>") -> list[str]:
    """`file:line` of every torch.load(...) call without a literal `weights_only=True`."""
    tree = ast.parse(source, filename)
    aliases = {"torch.load"}  # what names mean torch.load in this module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, ast.Import):
            aliases |= {f"{a.asname}.load" for a in node.names if a.name == "torch" and a.asname}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name not in aliases and name != "torch.serialization.load":
            continue
        flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            bad.append(f"{filename}:{node.lineno}")
    return bad


def test_the_scanner_finds_unsafe_loads() -> None:
    bad = (
        "import torch\nimport torch as T\nfrom torch import load as L\n"
        "torch.load('a')\nT.load('b', weights_only=False)\nL('c')\n"
        "torch.load('d', weights_only=True)\nflag = True\ntorch.load('e', weights_only=flag)\n"
    )
    assert unsafe_torch_loads(bad) == ["<string>:4", "<string>:5", "<string>:6", "<string>:9"]


def test_every_torch_load_is_weights_only() -> None:
    files = [p for d in PROJECT_DIRS if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    loads, bad = 0, []
    for path in files:
        text = path.read_text(encoding="utf-8")
        loads += text.count("torch.load(")
        bad += unsafe_torch_loads(text, str(path.relative_to(ROOT)))
    assert loads >= 2  # the detectors and the trainer load weights (so the scan finds them)
    assert not bad, f"torch.load without weights_only=True: {bad}"


# --- credentials ------------------------------------------------------------------------------


def _files_holding(folder: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n[:6]!r}..." for n in needles if n in data]
    return hits


@pytest.mark.slow
@pytest.mark.flow
def test_credentials_reach_no_log_param_tag_or_output(corpus_run: dict, state_dir: Path) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from tests.corpus import FAKE_SECRETS

    secrets = list(FAKE_SECRETS.values())
    needles = [s.encode() for s in secrets]
    # Every file the run wrote: outputs, MLflow store and artifacts, Prefect's home and the
    # test API's database (flow-run parameters, task results, logs).
    api_database, mlflow_store = Path(tempfile.gettempdir()), state_dir / "home" / "mlflow"
    for folder in (state_dir, api_database):
        assert not _files_holding(folder, needles)
    # The scan reads what it must: the run's site name is in the API database (the flow-run
    # parameters) and in the MLflow store (tags).
    assert _files_holding(api_database, [b"corpus-site"])
    assert _files_holding(mlflow_store, [b"corpus-site"])
    client = MlflowClient(corpus_run["tracking"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values(), *run.data.params]
        assert not [v for v in values for s in secrets if s in v], run.info.run_id
    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs()
        assert flow_runs
        for flow_run in flow_runs:
            assert not any(s in repr(flow_run.parameters) for s in secrets)
        logs = prefect.read_logs(limit=200)
        assert logs and not [x.message for x in logs for s in secrets if s in x.message]


def test_no_flow_parameter_or_site_field_carries_a_credential() -> None:
    import inspect
    import re

    from vadflow.flows.nightly import nightly
    from vadflow.tasks.site import SiteConfig

    credential = re.compile(r"secret|password|passwd|token|access_key|credential|api_key", re.I)

    def fields(model, prefix: str = "") -> list[str]:
        names = []
        for name, info in model.model_fields.items():
            names.append(prefix + name)
            kind = info.annotation
            if isinstance(kind, type) and hasattr(kind, "model_fields"):
                names += fields(kind, f"{prefix}{name}.")
        return names

    assert not [f for f in fields(SiteConfig) if credential.search(f)]
    assert not [p for p in inspect.signature(nightly.fn).parameters if credential.search(p)]


# --- pseudonymised ids ----------------------------------------------------------------------


def test_pseudonyms_are_stable_keyed_and_safe() -> None:
    key, other = b"k" * 32, b"o" * 32
    ids = ["normal_001", "Doe_Jane_1961-04-02", safe_slide_id("Müller, Anna")]
    names = [pseudonymise(i, key) for i in ids]
    assert names == [pseudonymise(i, key) for i in ids]  # the same every night
    assert len(set(names)) == len(ids) and all(is_safe_slide_id(n) for n in names)
    assert all(n.startswith("p-") and "Doe" not in n for n in names)
    assert [pseudonymise(i, other) for i in ids] != names  # unreadable without the key


@pytest.mark.slow
@pytest.mark.flow
def test_pseudonym_key_comes_from_env_or_a_secret_block(
    prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    monkeypatch.delenv(PSEUDONYM_KEY_ENV, raising=False)
    with pytest.raises(PseudonymKeyError, match=PSEUDONYM_KEY_ENV):
        pseudonym_key()
    Secret(value="from-a-block-0123456789abcdef").save("vadflow-test-pseudonym", overwrite=True)
    assert pseudonym_key("vadflow-test-pseudonym") == b"from-a-block-0123456789abcdef"
    with pytest.raises(PseudonymKeyError, match="no-such-block"):
        pseudonym_key("no-such-block")
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "short")
    with pytest.raises(PseudonymKeyError, match="at least 16"):
        pseudonym_key()
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "from-the-environment-0123456789")
    assert pseudonym_key("vadflow-test-pseudonym") == b"from-the-environment-0123456789"


def test_discover_with_a_key_hides_every_file_name(tmp_path: Path) -> None:
    from tests.corpus import write_pyramid
    from vadflow.tasks.slides.discover import discover

    pixels = np.full((64, 64, 3), 200, np.uint8)
    for name in ("Doe_Jane", "Roe_Rich", "Poe_Edgar", "Moe_Sam"):
        write_pyramid(tmp_path / "training" / "normal" / f"{name}.tif", pixels)
    write_pyramid(tmp_path / "testing" / "images" / "Smith_Ann.tif", pixels)
    plain = discover(tmp_path, "pathology", val_fraction=0.25)
    hidden = discover(tmp_path, "pathology", val_fraction=0.25, pseudonym_key=b"k" * 32)
    by_uri = {s.uri: s for s in hidden}
    for s in plain:  # same files, splits and labels; only the ids change
        twin = by_uri[s.uri]
        assert (twin.split, twin.label) == (s.split, s.label)
        assert twin.slide_id == pseudonymise(s.slide_id, b"k" * 32)
    assert not [s for s in hidden if any(n in s.slide_id for n in ("Doe", "Roe", "Smith"))]


# --- label and macro images -------------------------------------------------------------------

APERIO = "Aperio Image Library v12.0.15\n"
LABEL_GREEN, MACRO_BLUE = (0, 255, 0), (0, 0, 255)


def _svs_like(path: Path, *, label: bool, tiled_macro: bool = False) -> Path:
    """An Aperio-style TIFF: level 0, thumbnail (strips), level 1, then label and macro pages.

    The label is pure green and the macro pure blue: colours no stained tissue has. With
    `tiled_macro` the macro page is tiled like a level (OpenSlide then lists it as one).
    """
    level0 = np.full((768, 1024, 3), 235, np.uint8)
    level0[200:600, 300:800] = (180, 90, 160)
    mpp = "|AppMag = 20|MPP = 0.25"
    with tifffile.TiffWriter(path) as tif:

        def page(pixels: np.ndarray, text: str, tiled: bool) -> None:
            tile = {"tile": (256, 256)} if tiled else {}
            tif.write(
                pixels,
                description=APERIO + text,
                photometric="rgb",
                compression="zlib",
                metadata=None,
                **tile,
            )

        page(level0, f"1024x768 (256x256) RAW{mpp}", True)
        page(level0[::4, ::4], f"1024x768 -> 256x192{mpp}", False)  # the thumbnail
        page(level0[::2, ::2], f"1024x768 -> 512x384{mpp}", True)
        if label:
            page(np.full((200, 300, 3), LABEL_GREEN, np.uint8), "label 300x200", False)
            page(np.full((192, 256, 3), MACRO_BLUE, np.uint8), "macro 256x192", tiled_macro)
    return path


@pytest.mark.parametrize("tiled_macro", [False, True], ids=["strip-macro", "tiled-macro"])
def test_label_and_macro_are_never_levels_nor_exported(tmp_path: Path, tiled_macro: bool):
    from vadflow.tasks.exports.overlay import heatmap_overlay
    from vadflow.tasks.slides.reader import Slide

    with_label = _svs_like(tmp_path / "with.svs", label=True, tiled_macro=tiled_macro)
    without = _svs_like(tmp_path / "without.svs", label=False)
    for backend in ("auto", "vips"):
        with Slide(with_label, backend=backend) as slide:
            assert [(lv.width, lv.height) for lv in slide.levels] == [(1024, 768), (512, 384)]
            assert not hasattr(slide, "associated_images")
            for downsample in (1, 2, 4, 16, 64):
                thumb = slide.thumbnail(downsample)
                for colour in (LABEL_GREEN, MACRO_BLUE):
                    assert not (thumb == colour).all(axis=2).any(), (backend, downsample)
    with Slide(with_label) as slide:
        assert slide.format == "openslide-aperio"  # the vendor backend was exercised
    heat = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    pngs = [
        heatmap_overlay(str(p), heat, 16, tmp_path / f"{p.stem}.png", 0.0, 1.0)
        for p in (with_label, without)
    ]
    from PIL import Image

    exported, reference = (np.asarray(Image.open(p)) for p in pngs)
    assert np.array_equal(exported, reference)  # the label and macro change nothing exported


def test_a_pickled_object_in_a_weights_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    """torch's own refusal names no file and suggests weights_only=False; ours names the file
    and says what to do instead, and never falls back to a full unpickle."""
    import argparse

    import torch

    from vadflow.tasks.detectors.base import load_tensors

    hostile = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2), "x": argparse.Namespace(run="code")}, hostile)
    with pytest.raises(ValueError) as caught:
        load_tensors(hostile)
    message = str(caught.value)
    assert str(hostile) in message and "state_dict" in message
    assert "weights_only=False" not in message
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken.pt: cannot read these weights"):
        load_tensors(broken)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    assert torch.equal(load_tensors(good)["w"], torch.ones(3))
