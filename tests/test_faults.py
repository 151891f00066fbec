"""Faults: a training run killed with SIGKILL, a flaky or stalled S3 endpoint, a full disk.

Each test counts the tiles (or epochs) a fault could lose or duplicate: the target is none.
Other faults have their own tests: SIGKILL during tiling (tests/test_tiling_resume.py), the
tracking server down (tests/test_tracking_outage.py) and a NaN loss (tests/test_detectors.py,
tests/test_detector_families.py, tests/test_gan_families.py, tests/test_registry.py).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import pyvips
import torch
from polars.testing import assert_frame_equal

from vadflow.tasks.site import TilingConfig
from vadflow.tasks.slides.discover import SlideSource
from vadflow.tasks.slides.register import register_slide
from vadflow.tasks.slides.storage import StorageError, StorageOptions, read_parquet, storage_for
from vadflow.tasks.tiling.grid import tile_slides

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # imports vadflow as we do


def _slide(path: Path, seed: int, size: int = 2048) -> Path:
    rng = np.random.default_rng(seed)
    array = np.full((size, size, 3), 238, np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 4, size // 2, 2)
        array[y : y + h, x : x + w] = (190, 100, 165)
    path.parent.mkdir(parents=True, exist_ok=True)
    pyvips.Image.new_from_array(array).tiffsave(
        str(path), tile=True, pyramid=True, compression="jpeg", xres=4000.0, yres=4000.0
    )
    return path


def _rows(folder: Path, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        path = _slide(folder / f"slide_{i}.tif", seed=i)
        source = SlideSource(path.stem, str(path), "normal", "normal", "train", None)
        rows.append(register_slide(source, "faults", "pathology"))
    return rows


def _all_tiles(manifests: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(manifests).sort("slide_id", maintain_order=True)


def lost_and_duplicated(got: pl.DataFrame, want: pl.DataFrame) -> tuple[int, int]:
    """Tiles of `want` missing from `got`, and tile ids `got` holds more than once."""
    have = set(got["tile_id"])
    lost = sum(1 for t in want["tile_id"] if t not in have)
    return lost, got.height - got["tile_id"].n_unique()


# --- SIGKILL during training ----------------------------------------------------------------

EPOCHS = 6
TRAIN_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from vadflow.tasks.detectors.registry import create_detector

mode, folder = sys.argv[1], Path(sys.argv[2])
rng = np.random.default_rng(0)
train = rng.integers(60, 200, (96, 32, 32, 3), dtype=np.uint8)
val = rng.integers(60, 200, (32, 32, 32, 3), dtype=np.uint8)
detector = create_detector(
    "ae_l2", tile_size=32, base_channels=8, latent_channels=8, bottleneck=4,
    epochs=int(sys.argv[3]), batch_size=16, patience=100, device="cpu",
)
log = folder / f"{mode}.epochs.jsonl"

def on_epoch(epoch, train_loss, val_loss):
    with log.open("a") as handle:
        handle.write(json.dumps([epoch, train_loss, val_loss]) + "\\n")
    if mode == "killed":
        time.sleep(0.5)  # the test's window to kill it between epochs or inside the next

checkpoints = folder / "checkpoints"
if mode == "resume":
    report = detector.fit(train, val, on_epoch=on_epoch, resume_from=checkpoints)
else:
    folder_for = checkpoints if mode == "killed" else folder / "ref-checkpoints"
    report = detector.fit(train, val, on_epoch=on_epoch, checkpoint_dir=folder_for)
detector.save(folder / f"{mode}-model")
(folder / f"{mode}.report.json").write_text(json.dumps(
    {"epochs": report.epochs, "train_loss": report.train_loss, "val_loss": report.val_loss}))
"""


def _train(mode: str, folder: Path, epochs: int = EPOCHS) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_CHILD, mode, str(folder), str(epochs)],
        env=CHILD_ENV,
        cwd=ROOT,
    )


def _epochs(path: Path) -> list[list[float]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("]")]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkilled_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    started = time.perf_counter()
    reference = _train("reference", tmp_path)
    killed = _train("killed", tmp_path)
    deadline = time.monotonic() + 240
    while len(_epochs(tmp_path / "killed.epochs.jsonl")) < 2:  # two epochs checkpointed
        assert killed.poll() is None, "the training child exited before it could be killed"
        assert time.monotonic() < deadline, "the training child made no progress"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    before = _epochs(tmp_path / "killed.epochs.jsonl")
    assert 2 <= len(before) < EPOCHS and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "killed-model").exists()

    resumed = _train("resume", tmp_path)
    assert resumed.wait(timeout=300) == 0 and reference.wait(timeout=300) == 0
    after = _epochs(tmp_path / "resume.epochs.jsonl")
    report = json.loads((tmp_path / "resume.report.json").read_text())
    ref = json.loads((tmp_path / "reference.report.json").read_text())

    # Not restarted from zero: the resumed run trains only the epochs the killed one had not
    # checkpointed, and its curve starts with the killed run's epochs.
    checkpoint = torch.load(
        tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True
    )
    assert len(checkpoint["train_loss"]) == EPOCHS
    done_before = [e for e, *_ in before]
    assert [e for e, *_ in after] == list(range(len(done_before) + 1, EPOCHS + 1))
    assert report["epochs"] == ref["epochs"] == EPOCHS  # same final epoch count
    assert report["train_loss"][: len(before)] == [t for _, t, _ in before]
    # ... and it ends where an uninterrupted run ends: same curve, same weights.
    np.testing.assert_allclose(report["train_loss"], ref["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(report["val_loss"], ref["val_loss"], rtol=1e-6)
    mine, theirs = _weights(tmp_path / "resume-model"), _weights(tmp_path / "reference-model")
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-6, atol=1e-7)
    print(f"training SIGKILL: {len(before)} epochs kept, {EPOCHS - len(before)} resumed, "
          f"0 lost, 0 repeated, {time.perf_counter() - started:.1f}s")  # fmt: skip


# --- S3: 503 SlowDown and timeouts, through a faulty proxy in front of moto --------------------

BUCKET = "vadflow-faults"
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyProxy:
    """An HTTP proxy to moto that answers some requests with 503 SlowDown or stalls them.

    `plan(n, method, path)` picks, for the n-th request (0-based), "forward", "503" or "stall"
    (hold the connection `stall_s` seconds, then drop it unanswered: a read timeout).
    """

    def __init__(
        self, upstream: str, plan: Callable[[int, str, str], str], stall_s: float = 1.5
    ) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.plan, self.stall_s = plan, stall_s
        self.log: list[tuple[str, str, str]] = []  # (method, path, what the proxy did)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    action = proxy.plan(len(proxy.log), self.command, self.path)
                    proxy.log.append((self.command, self.path, action))
                if action == "stall":
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                if action == "503":
                    payload = b"" if self.command == "HEAD" else SLOW_DOWN
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, action: str) -> int:
        return sum(1 for *_, did in self.log if did == action)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        storage = storage_for("s3://x", StorageOptions(endpoint_url=url))
        storage.client.create_bucket(Bucket=BUCKET)
        yield url
        server.stop()


@pytest.fixture()
def proxied(moto_endpoint: str, tmp_path: Path):
    """`make(plan, **options)` -> (proxy, StorageOptions through it); proxies closed after."""
    made: list[FaultyProxy] = []

    def make(plan, stall_s: float = 1.5, **options) -> tuple[FaultyProxy, StorageOptions]:
        proxy = FaultyProxy(moto_endpoint, plan, stall_s)
        made.append(proxy)
        defaults = {"max_attempts": 5, "cache_dir": str(tmp_path / "cache")}
        return proxy, StorageOptions(endpoint_url=proxy.url, **{**defaults, **options})

    yield make
    for proxy in made:
        proxy.close()


def _put(moto_endpoint: str, uri: str, data: bytes) -> None:
    storage_for(uri, StorageOptions(endpoint_url=moto_endpoint)).write_bytes(uri, data)


def test_s3_slowdown_is_retried_then_succeeds(proxied, moto_endpoint: str) -> None:
    prefix = f"s3://{BUCKET}/retry"
    for name in ("a.tif", "b.tif"):
        _put(moto_endpoint, f"{prefix}/{name}", name.encode() * 100)
    proxy, options = proxied(lambda n, method, path: "503" if n < 2 else "forward")
    store = storage_for(prefix, options)
    assert store.list_files(prefix) == [f"{prefix}/a.tif", f"{prefix}/b.tif"]
    assert proxy.count("503") == 2 and proxy.count("forward") == 1  # retried twice, then served
    store.write_bytes(f"{prefix}/c.bin", b"payload")
    assert store.read_bytes(f"{prefix}/c.bin") == b"payload"


def test_s3_slowdown_that_never_ends_fails_clearly(proxied) -> None:
    proxy, options = proxied(lambda n, method, path: "503", max_attempts=3)
    uri = f"s3://{BUCKET}/always-slow/x.parquet"
    started = time.perf_counter()
    with pytest.raises(StorageError) as caught:
        storage_for(uri, options).write_bytes(uri, b"x")
    message = str(caught.value)
    assert uri in message and proxy.url in message, message  # what, and where
    assert "SlowDown" in message and "reached max retries: 2" in message, message
    assert proxy.count("503") == 3 and time.perf_counter() - started < 30


def test_s3_timeouts_are_retried_then_fail_clearly(proxied, moto_endpoint: str) -> None:
    uri = f"s3://{BUCKET}/stall/x.bin"
    _put(moto_endpoint, uri, b"content")
    proxy, options = proxied(
        lambda n, method, path: "stall" if n == 0 else "forward",
        stall_s=1.0,
        read_timeout=0.3,
        connect_timeout=0.3,
    )
    assert storage_for(uri, options).read_bytes(uri) == b"content"
    assert [did for *_, did in proxy.log] == ["stall", "forward"]

    proxy, options = proxied(
        lambda n, method, path: "stall", stall_s=1.0, read_timeout=0.3, max_attempts=2
    )
    with pytest.raises(StorageError) as caught:
        storage_for(uri, options).read_bytes(uri)
    message = str(caught.value)
    assert uri in message and proxy.url in message and "timeout" in message.lower(), message
    assert proxy.count("stall") == 2


def test_tiling_to_s3_through_intermittent_503s_loses_and_duplicates_nothing(
    proxied, moto_endpoint: str, tmp_path: Path
) -> None:
    rows = _rows(tmp_path / "site", 2)
    tiling = TilingConfig()
    reference = tile_slides(rows, tiling, "pathology", tmp_path / "ref", tmp_path / "ref-masks")
    proxy, options = proxied(lambda n, method, path: "503" if n % 3 == 1 else "forward")
    out = f"s3://{BUCKET}/flaky/site"
    results = tile_slides(
        rows, tiling, "pathology", f"{out}/tiles", f"{out}/masks", storage=options
    )
    assert [r.status for r in results] == ["ok", "ok"]
    got = _all_tiles([read_parquet(r.manifest, options) for r in results])
    want = _all_tiles([pl.read_parquet(r.manifest) for r in reference])
    assert lost_and_duplicated(got, want) == (0, 0) and want.height > 0
    assert_frame_equal(got, want)
    assert proxy.count("503") >= 3  # every third request failed once and was retried
    listed = storage_for(out, options).list_files(out)
    assert sorted(Path(u).name for u in listed if u.endswith(".done.json")) == [
        "slide_0.done.json",
        "slide_1.done.json",
    ]


# --- disk full on the output folder ---------------------------------------------------------

# RLIMIT_FSIZE makes any write past `limit` bytes fail with EFBIG, as a full disk fails with
# ENOSPC: the process sees an OSError mid-write. SIGXFSZ would kill it first, so it is ignored.
DISK_CHILD = """
import json, resource, signal, sys
from pathlib import Path
import polars as pl
from vadflow.tasks.manifests import write_parquet_atomic
from vadflow.tasks.site import TilingConfig
from vadflow.tasks.tiling.grid import tile_slides

rows = json.loads(Path(sys.argv[1]).read_text())
out, limit = Path(sys.argv[2]), int(sys.argv[3])
frame = pl.DataFrame({"slide_id": [f"s{i}" for i in range(20000)], "x": range(20000)})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
report = {}
results = tile_slides(rows, TilingConfig(tile_size=16), "pathology", out / "tiles", out / "masks")
report["tiling"] = [[r.status, r.reason] for r in results]
try:
    write_parquet_atomic(frame, out / "slides.parquet")
    report["slides"] = "written"
except OSError as exc:
    report["slides"] = str(exc)
(out.parent / "report.json").write_text(json.dumps(report))
"""


def test_disk_full_names_the_path_and_leaves_no_half_manifest(tmp_path: Path) -> None:
    rows = _rows(tmp_path / "site", 1)
    out = tmp_path / "out" / "site"
    previous = pl.DataFrame({"slide_id": ["from-last-night"], "x": [1]})
    out.mkdir(parents=True)
    previous.write_parquet(out / "slides.parquet")  # last night's complete manifest
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    child = subprocess.run(
        [sys.executable, "-c", DISK_CHILD, str(tmp_path / "rows.json"), str(out), "4096"],
        env=CHILD_ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    [(status, reason)] = report["tiling"]
    manifest = out / "tiles" / "slide_0.parquet"
    # The first write past the limit fails (the tissue overlay PNG, before the manifest): the
    # reason names that file and says what to do.
    assert status == "failed" and "no room" in reason and "free space in" in reason, reason
    named = Path(reason.split("StorageError: ")[1].split(": no room")[0])
    assert named.is_relative_to(out) and named.suffix in (".png", ".parquet"), reason
    assert str(out / "slides.parquet") in report["slides"], report["slides"]
    assert "could not be written" in report["slides"]
    # Nothing half-written is left looking complete: no manifest, no done marker, no temporary,
    # and last night's slide manifest is still whole.
    assert not manifest.exists() and not (out / "tiles" / "slide_0.done.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert_frame_equal(pl.read_parquet(out / "slides.parquet"), previous)
    # With room again, a rerun writes the whole manifest: nothing lost, nothing duplicated.
    tiling = TilingConfig(tile_size=16)
    rerun = tile_slides(rows, tiling, "pathology", out / "tiles", out / "masks")
    reference = tile_slides(rows, tiling, "pathology", tmp_path / "ref", tmp_path / "ref-m")
    got = pl.read_parquet(rerun[0].manifest)
    want = pl.read_parquet(reference[0].manifest)
    assert lost_and_duplicated(got, want) == (0, 0) and want.height > 100
    assert_frame_equal(got, want)
