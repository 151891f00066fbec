"""Local and S3 storage behind one interface; S3 is moto's server on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import pyvips
from polars.testing import assert_frame_equal

from vadflow.tasks.site import SiteLayout, TilingConfig
from vadflow.tasks.slides.discover import NoSlidesError, discover
from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.slides.register import register_slide, write_quarantine
from vadflow.tasks.slides.storage import (
    LocalStorage,
    StorageError,
    StorageOptions,
    local_path,
    read_parquet,
    s3_client,
    storage_for,
)
from vadflow.tasks.tiling.grid import finished_tiling, tile_slides

BUCKET = "vadflow-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free port, with throwaway credentials set for this session only."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_SESSION_TOKEN", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture()
def s3(s3_endpoint: str, tmp_path: Path) -> StorageOptions:
    options = StorageOptions(endpoint_url=s3_endpoint, cache_dir=str(tmp_path / "cache"))
    client = s3_client(options)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return options


def _slide(path: Path, colour=(190, 100, 165), size: int = 2048) -> Path:
    array = np.full((size, size, 3), 238, np.uint8)
    array[300:1500, 400:1600] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    pyvips.Image.new_from_array(array).tiffsave(
        str(path), tile=True, pyramid=True, compression="jpeg", xres=4000.0, yres=4000.0
    )
    return path


def _upload(options: StorageOptions, local_root: Path, prefix: str) -> None:
    store = storage_for(f"s3://{BUCKET}/{prefix}", options)
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            key = f"s3://{BUCKET}/{prefix}/{path.relative_to(local_root).as_posix()}"
            store.write_bytes(key, path.read_bytes())


def _camelyon_site(root: Path) -> Path:
    _slide(root / "training" / "normal" / "normal_001.tif")
    _slide(root / "training" / "normal" / "normal_002.tif", colour=(170, 90, 150))
    _slide(root / "testing" / "images" / "test_001.tif")
    (root / "testing" / "reference.csv").write_text("test_001,Tumor,Macro\n")
    (root / "lesion_annotations").mkdir()
    from vadflow.tasks.slides.annotations import write_asap_xml

    square = np.array([[400, 300], [1000, 300], [1000, 900], [400, 900]], float)
    write_asap_xml(root / "lesion_annotations" / "test_001.xml", [square])
    (root / "training" / "normal" / "broken.tif").write_bytes(b"II*\x00 not really")
    return root


def test_local_storage_writes_whole_files(tmp_path: Path) -> None:
    store = LocalStorage()
    target = str(tmp_path / "a" / "b.bin")
    store.write_bytes(target, b"one")
    store.write_bytes(target, b"two")
    assert store.read_bytes(target) == b"two" and store.size(target) == 3
    assert store.list_files(str(tmp_path)) == [target]  # no temporary left behind
    assert storage_for(target) is not None and local_path(target) == Path(target)


def test_client_uses_standard_retries_and_the_endpoint(s3: StorageOptions) -> None:
    client = s3_client(s3)
    assert client.meta.config.retries["mode"] == "standard"
    assert client.meta.config.retries["total_max_attempts"] == s3.max_attempts
    assert client.meta.endpoint_url == s3.endpoint_url


def test_discover_register_read_and_tile_from_s3_to_s3(s3: StorageOptions, tmp_path: Path):
    local = _camelyon_site(tmp_path / "site")
    _upload(s3, local, "sites/site-a")

    found = discover(f"s3://{BUCKET}/sites/site-a", "pathology", val_fraction=0, storage=s3)
    here = discover(local, "pathology", val_fraction=0)
    assert [(s.slide_id, s.label, s.split) for s in found] == [
        (s.slide_id, s.label, s.split) for s in here
    ]
    assert all(s.uri.startswith(f"s3://{BUCKET}/sites/site-a/") for s in found)
    tumour = next(s for s in found if s.slide_id == "test_001")
    assert tumour.label == "anomalous" and tumour.annotation_uri.endswith("test_001.xml")

    rows = {s.slide_id: register_slide(s, "site-a", "pathology", storage=s3) for s in found}
    assert rows["broken"]["status"] == "quarantined" and "broken.tif" in rows["broken"]["reason"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 3
    expected = hashlib.sha256((local / "testing/images/test_001.tif").read_bytes()).hexdigest()
    assert rows["test_001"]["sha256"] == expected and rows["test_001"]["mpp_source"] == "metadata"

    # Outputs to S3 through the same interface; the manifest equals a local run's.
    layout = SiteLayout(f"s3://{BUCKET}/outputs", "site-a")
    tiling = TilingConfig()
    remote = tile_slides(ok, tiling, "pathology", layout.tiles_uri, layout.masks_uri, storage=s3)
    here_by_id = {s.slide_id: s for s in here}
    local_rows = [
        {
            **r,
            "uri": here_by_id[r["slide_id"]].uri,
            "annotation_uri": here_by_id[r["slide_id"]].annotation_uri,
        }
        for r in ok
    ]
    mine = tile_slides(local_rows, tiling, "pathology", tmp_path / "tiles", tmp_path / "masks")
    for a, b in zip(remote, mine, strict=True):
        assert a.manifest == f"s3://{BUCKET}/outputs/site-a/tiles/{a.slide_id}.parquet"
        assert a.tiles == b.tiles > 0
        assert_frame_equal(read_parquet(a.manifest, s3), pl.read_parquet(b.manifest))
    tumour_tiles = read_parquet(remote[-1].manifest, s3)
    assert tumour_tiles["label_fraction"].max() == 1.0  # annotation read from S3 too
    # Finished slides on S3 are recognised, so a rerun does no work.
    assert all(finished_tiling(r, tiling, layout.tiles_uri, s3) is not None for r in ok)
    written = write_quarantine(list(rows.values()), layout.quarantine_uri, s3)
    assert written == [f"s3://{BUCKET}/outputs/site-a/quarantine/broken.json"]


def test_slide_cache_is_keyed_by_etag(s3: StorageOptions, tmp_path: Path) -> None:
    uri = f"s3://{BUCKET}/cache-test/x.tif"
    store = storage_for(uri, s3)
    store.write_bytes(uri, _slide(tmp_path / "a.tif", size=512).read_bytes())
    first = local_path(uri, s3)
    assert local_path(uri, s3) == first  # no second download
    store.write_bytes(uri, _slide(tmp_path / "b.tif", colour=(90, 60, 160), size=512).read_bytes())
    second = local_path(uri, s3)
    assert second != first and second.read_bytes() == (tmp_path / "b.tif").read_bytes()
    assert Slide(uri, s3).read_region(0, 450, 450, 1, 1)[0, 0, 0] < 120  # the new colour


def test_missing_bucket_and_dead_endpoint_name_the_uri(s3: StorageOptions, tmp_path: Path):
    with pytest.raises(StorageError, match="s3://no-such-bucket"):
        discover("s3://no-such-bucket/site", "pathology", storage=s3)
    with pytest.raises(NoSlidesError, match="no slides found"):
        discover(f"s3://{BUCKET}/empty-prefix", "pathology", storage=s3)
    dead = StorageOptions(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageError, match="127.0.0.1:9"):
        storage_for("s3://b/k", dead).list_files("s3://b/k")


def test_site_file_names_an_s3_source_and_endpoint(tmp_path: Path) -> None:
    from vadflow.tasks.site import load_site

    (tmp_path / "site.yaml").write_text(
        "domain: pathology\nsource: s3://slides/site-a\n"
        "storage: {endpoint_url: 'http://minio.local:9000', addressing_style: path}\n"
    )
    site = load_site(tmp_path, name="site-a")
    assert site.source == "s3://slides/site-a"
    options = site.storage.options()
    assert (options.endpoint_url, options.addressing_style) == ("http://minio.local:9000", "path")
    layout = SiteLayout("s3://out/root", "site-a")
    assert layout.tiles_uri == "s3://out/root/site-a/tiles"
    with pytest.raises(ValueError, match="use the \\*_uri properties"):
        _ = layout.root
    assert SiteLayout(tmp_path, "site-a").tiles_uri == str(tmp_path / "site-a" / "tiles")
