"""Where slides and manifests live: a local folder or an S3 prefix, behind one small interface.

Every stage names files by URI: a local path (`/data/site-a/x.tif`) or `s3://bucket/prefix/key`.
`storage_for(uri)` returns the backend that lists, reads and writes it; `local_path(uri)` gives a
file on this machine, because libvips and OpenSlide open files, not streams: an S3 object is
downloaded once into a cache folder keyed by its ETag, so a changed object is fetched again and an
unchanged one never is.

S3 goes through boto3 with the *standard* retry mode. `endpoint_url` (site file
`storage.endpoint_url`, or boto3's own `AWS_ENDPOINT_URL`) points it at any S3-compatible store:
MinIO, Ceph, moto in the tests. Credentials come from boto3's usual chain (environment, profile,
instance role); nothing here reads or stores them.

Multi-file formats (MIRAX `.mrxs` with its data folder, `.vms`) are opened from local folders
only: `local_path` downloads one object.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import polars as pl

S3_SCHEME = "s3://"
# Disk full, over quota, over the process's file-size limit: the output folder has no room.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@dataclass(frozen=True)
class StorageOptions:
    """How to reach remote storage; small and picklable, so it travels to tiling workers."""

    endpoint_url: str | None = None  # None: boto3 decides (AWS_ENDPOINT_URL, then AWS itself)
    cache_dir: str | None = None  # S3 downloads; None: $VADFLOW_HOME/cache/slides
    max_attempts: int = 5  # attempts in all (boto3 standard retry mode: throttling, 5xx...)
    addressing_style: str = "auto"  # "path" for stores without virtual-host buckets
    connect_timeout: float = 10.0  # seconds; a timed-out attempt is retried like a 503
    read_timeout: float = 60.0


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the cause."""


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith(S3_SCHEME)


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a local folder or an S3 prefix; returns a string URI either way."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def name_of(uri: str | Path) -> str:
    """The last path component: the file name."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


class Storage(Protocol):
    """The operations the pipeline needs; URIs in, bytes or local files out."""

    def list_files(self, prefix: str) -> list[str]:
        """Every file under `prefix` (recursively), as sorted URIs."""

    def exists(self, uri: str) -> bool: ...

    def size(self, uri: str) -> int: ...

    def read_bytes(self, uri: str) -> bytes: ...

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Whole-object write: readers see the old or the new content, never half of it."""

    def delete(self, uri: str) -> None: ...

    def local_path(self, uri: str) -> Path:
        """A local file with the object's content (a download into the cache for S3)."""


class LocalStorage:
    """Plain files; writes go to a temporary name and are renamed, so a kill leaves no half file."""

    def list_files(self, prefix: str) -> list[str]:
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())

    def exists(self, uri: str) -> bool:
        return Path(uri).is_file()

    def size(self, uri: str) -> int:
        return Path(uri).stat().st_size

    def read_bytes(self, uri: str) -> bytes:
        return Path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary per writer: two workers committing the same slide do not collide.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
                raise StorageError(
                    f"{path}: no room to write it ({os.strerror(exc.errno)}); free space in "
                    f"{path.parent} or point the output root elsewhere, then rerun"
                ) from exc
            raise

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def local_path(self, uri: str) -> Path:
        return Path(uri)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    if not is_remote(uri):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name after s3://")
    return bucket, key


_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client(options: StorageOptions):
    """One boto3 client per process and options (clients are thread-safe, not fork-safe)."""
    key = (
        os.getpid(),
        options.endpoint_url,
        options.max_attempts,
        options.addressing_style,
        options.connect_timeout,
        options.read_timeout,
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "total_max_attempts": options.max_attempts},
                s3={"addressing_style": options.addressing_style},
                connect_timeout=options.connect_timeout,
                read_timeout=options.read_timeout,
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=options.endpoint_url, config=config
            )
            _CLIENTS[key] = client
    return client


class S3Storage:
    """An S3 (or S3-compatible) bucket; objects are written whole, so every PUT is atomic."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()

    @property
    def client(self):
        return s3_client(self.options)

    def _fail(self, uri: str, exc: Exception) -> StorageError:
        where = f" at {self.options.endpoint_url}" if self.options.endpoint_url else ""
        return StorageError(f"{uri}{where}: {exc}")

    def list_files(self, prefix: str) -> list[str]:
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                out += [
                    f"{S3_SCHEME}{bucket}/{item['Key']}"
                    for item in page.get("Contents", [])
                    if not item["Key"].endswith("/")  # folder placeholders
                ]
        except Exception as exc:  # botocore's ClientError, endpoint and credential errors
            raise self._fail(prefix, exc) from exc
        return sorted(out)

    def _head(self, uri: str) -> dict | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(uri, exc) from exc

    def exists(self, uri: str) -> bool:
        return self._head(uri) is not None

    def size(self, uri: str) -> int:
        head = self._head(uri)
        if head is None:
            raise FileNotFoundError(f"{uri}: no such object")
        return int(head["ContentLength"])

    def etag(self, uri: str) -> str:
        head = self._head(uri)
        if head is None:
            raise FileNotFoundError(f"{uri}: no such object")
        return str(head["ETag"]).strip('"')

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            response = getattr(exc, "response", None) or {}  # None on timeouts
            if response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{uri}: no such object") from None
            raise self._fail(uri, exc) from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise self._fail(uri, exc) from exc

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise self._fail(uri, exc) from exc

    def local_path(self, uri: str) -> Path:
        """Download into `<cache>/<hash of uri>/<etag>/<name>` unless that file is already there.

        The ETag changes whenever the object does, so a replaced slide is fetched again; the
        download goes to a temporary name first, so a killed download is never mistaken for a
        finished one.
        """
        head = self._head(uri)
        if head is None:
            raise FileNotFoundError(f"{uri}: no such object")
        etag = re.sub(r"[^A-Za-z0-9_-]", "", str(head["ETag"])) or "noetag"
        folder = cache_root(self.options) / hashlib.sha1(uri.encode()).hexdigest()[:16] / etag
        path = folder / name_of(uri)
        if path.is_file() and path.stat().st_size == int(head["ContentLength"]):
            return path
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
        os.close(fd)
        bucket, key = split_s3(uri)
        try:
            self.client.download_file(bucket, key, tmp)
            os.replace(tmp, path)
        except Exception as exc:
            Path(tmp).unlink(missing_ok=True)
            raise self._fail(uri, exc) from exc
        return path


def cache_root(options: StorageOptions | None = None) -> Path:
    if options is not None and options.cache_dir:
        return Path(options.cache_dir)
    home = os.environ.get("VADFLOW_HOME", ".vadflow")
    return Path(home) / "cache" / "slides"


def storage_for(uri: str | Path, options: StorageOptions | None = None) -> Storage:
    """The backend for `uri`: S3 for `s3://`, the local file system otherwise."""
    return S3Storage(options) if is_remote(uri) else LocalStorage()


ARCHIVE_MEMBER = "!/"  # `<archive.zip>!/<member>`: a file inside a zip (annotations ship zipped)


def split_member(uri: str | Path) -> tuple[str, str | None]:
    """`a.zip!/b.xml` -> (`a.zip`, `b.xml`); a plain URI -> (uri, None)."""
    container, sep, member = str(uri).partition(ARCHIVE_MEMBER)
    return (container, member) if sep else (container, None)


def local_path(uri: str | Path, options: StorageOptions | None = None) -> Path:
    """A local file holding `uri`'s content: the path itself, or a cached S3 download.

    For a zip member (`<archive>!/<member>`) the archive is made local and the member kept.
    """
    container, member = split_member(uri)
    local = storage_for(container, options).local_path(container)
    return Path(f"{local}{ARCHIVE_MEMBER}{member}") if member is not None else local


def write_parquet(
    frame: pl.DataFrame, uri: str | Path, options: StorageOptions | None = None
) -> str:
    """Write a manifest whole to a local path or S3; a reader never sees half a file."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    storage_for(uri, options).write_bytes(str(uri), buffer.getvalue())
    return str(uri)


def read_parquet(uri: str | Path, options: StorageOptions | None = None) -> pl.DataFrame:
    if not is_remote(uri):
        return pl.read_parquet(uri)
    return pl.read_parquet(io.BytesIO(storage_for(uri, options).read_bytes(str(uri))))
