"""Read tile pixels named by a tile manifest, for training and scoring.

- `read_tiles(slide, rows)`: one batch of one slide's tiles, read in grid order so neighbouring
  tiles share decoded image tiles, returned in the rows' order.
- `iter_tile_batches(slide, tiles, batch_size)`: consecutive batches for scoring, decoded by a
  background thread a bounded number of batches ahead, so decode overlaps the model.
- `TileDataset`: a torch map-style dataset over manifest rows of any number of slides. It holds
  only coordinates; each DataLoader worker opens the slides it needs lazily and keeps one handle
  per slide (a few at most), and `__getitems__` lets the DataLoader ask for a whole batch at once,
  so a batch is read slide by slide in grid order.
- `TileCache`: encoded tiles (JPEG, or lossless PNG) in one file on local disk, for training
  runs that read the same tiles for many epochs, about the size of the slide's own JPEG tiles
  (decoded pixels took 12x that). benchmarks/tiling.py measures when it pays and
  benchmarks/whole_slide.py its size.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from torch.utils.data import Dataset

from vadflow.tasks.slides.reader import Slide
from vadflow.tasks.slides.storage import StorageOptions

TILE_COLUMNS = ("x", "y", "extent", "level", "size")


def read_tiles(slide: Slide, rows: pl.DataFrame) -> np.ndarray:
    """(B, H, W, 3) uint8 for `rows` (one slide's manifest rows), in the rows' order."""
    if rows.height == 0:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    xs, ys, extents, levels, sizes = (rows[c].to_numpy() for c in TILE_COLUMNS)
    size = int(sizes[0])
    if (sizes != size).any():
        raise ValueError(f"{slide.uri}: tiles of one batch must share a size, got {set(sizes)}")
    out = np.empty((rows.height, size, size, 3), dtype=np.uint8)
    for i in np.lexsort((xs, ys)):  # grid order: row by row
        out[i] = slide.read_tile(int(xs[i]), int(ys[i]), int(extents[i]), int(levels[i]), size)
    return out


PREFETCH_BATCHES = 2  # batches decoded ahead of the one being scored


def iter_tile_batches(
    slide: Slide,
    tiles: pl.DataFrame,
    batch_size: int,
    prefetch: int = PREFETCH_BATCHES,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[pl.DataFrame, np.ndarray]]:
    """Yield (rows, pixels (B, H, W, 3)) for consecutive batches of one slide's tiles.

    With `prefetch` > 0 a background thread decodes (and `transform`s, e.g. stain-normalises)
    up to `prefetch` batches ahead while the caller scores the current one: libvips and the
    JPEG decoder release the GIL, so decode and the model's forward pass overlap. The queue is
    bounded, so at most `prefetch` + 2 batches are held (queued, being decoded, being scored).
    `prefetch=0` reads each batch when asked, in this thread. Only the loader thread touches
    `slide` while the iterator runs. An error in the loader is raised here, at the batch it
    hit; closing the iterator early stops the loader.
    """
    batches = (tiles.slice(start, batch_size) for start in range(0, tiles.height, batch_size))

    def load(rows: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
        pixels = read_tiles(slide, rows)
        return rows, pixels if transform is None else transform(pixels)

    if prefetch <= 0:
        for rows in batches:
            yield load(rows)
        return
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def hand_over(item: object) -> bool:
        """Put `item` on the queue unless the consumer went away; False when it did."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def loader() -> None:
        try:
            for rows in batches:
                if stop.is_set() or not hand_over(load(rows)):
                    return
        except BaseException as error:  # handed to the consumer, raised at its batch
            hand_over(_LoaderFailed(error))
            return
        hand_over(_END)

    thread = threading.Thread(target=loader, name=f"tile-loader:{slide.uri}", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _LoaderFailed):
                raise item.error
            yield item
    finally:
        stop.set()  # a consumer that stops early (error, close) ends the loader
        thread.join()


_END = object()  # the loader's last item: no more batches


class _LoaderFailed:
    """An exception raised in the loader thread, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def sample_tiles(tiles: pl.DataFrame, limit: int, seed: int) -> pl.DataFrame:
    """At most `limit` tiles, drawn without replacement, in a reproducible order."""
    if tiles.height <= limit:
        return tiles.sort("tile_id")
    return tiles.sort("tile_id").sample(n=limit, seed=seed, shuffle=True)


def load_tiles(
    tiles: pl.DataFrame, uri_by_slide: dict[str, str], storage: StorageOptions | None = None
) -> np.ndarray:
    """All pixels of the given tiles, (N, H, W, 3) uint8: a training cache, so keep N bounded."""
    if tiles.height == 0:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    dataset = TileDataset(tiles, uri_by_slide, storage=storage, max_open_slides=1)
    return dataset.read_batch(range(len(dataset)))


TILE_CACHE_CODECS = ("jpeg", "png")
TILE_CACHE_JPEG_QUALITY = 90
_INDEX_RECORD = np.dtype([("offset", "<i8"), ("length", "<i8")])  # 16 bytes per tile


def encode_tile(tile: np.ndarray, codec: str) -> bytes:
    """One (H, W, 3) uint8 tile as `codec` bytes: JPEG (quality `TILE_CACHE_JPEG_QUALITY`,
    4:4:4, lossy: about 1.5 grey levels off on tissue) or PNG (lossless, several times the
    JPEG's size)."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(tile, dtype=np.uint8))
    if codec == "jpeg":
        # 4:4:4: chroma subsampling would blur stain colour by several levels at tissue edges.
        image.save(buffer, format="JPEG", quality=TILE_CACHE_JPEG_QUALITY, subsampling=0)
    elif codec == "png":
        image.save(buffer, format="PNG", compress_level=1)  # fast; higher levels gain ~5%
    else:
        raise ValueError(f"tile cache codec {codec!r}: use one of {TILE_CACHE_CODECS}")
    return buffer.getvalue()


def decode_tile_into(data: bytes, out: np.ndarray) -> None:
    """Decode `encode_tile` bytes into `out`, a (H, W, 3) uint8 array of the tile's shape."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out[...] = np.asarray(image.convert("RGB"))


class TileCache:
    """Tiles of one dataset, encoded, in `<folder>/<key>.<codec>`, filled as first read.

    Each tile is stored compressed (`encode_tile`): JPEG by default, about the size of the
    slide's own JPEG tiles where the decoded pixels took 12x that; `codec="png"` is lossless
    at about 4x. With JPEG a tile is handed out as its cached version from the first read on
    (`put` returns the round-tripped pixels), so every epoch sees the same pixels; they differ
    from the slide's by about one grey level (benchmarks/whole_slide.py measures it).

    Layout: `<key>.<codec>` holds the encoded tiles back to back, appended under an exclusive
    `flock`, so DataLoader workers can fill it together; `<key>.<codec>.index` holds (offset,
    length) per tile, written after the bytes, so a killed run leaves unfilled tiles, never torn
    ones (length 0 = not cached). After a machine crash (no fsync) delete the folder. `key`
    names the exact rows, so a changed manifest gets a new file rather than stale pixels.
    """

    def __init__(
        self, folder: str | Path, key: str, count: int, size: int, codec: str = "jpeg"
    ) -> None:
        if codec not in TILE_CACHE_CODECS:
            raise ValueError(f"tile cache codec {codec!r}: use one of {TILE_CACHE_CODECS}")
        self.folder = Path(folder)
        self.key, self.count, self.size, self.codec = key, count, size, codec
        self.folder.mkdir(parents=True, exist_ok=True)
        self._data_path = self.folder / f"{key}.{codec}"
        self._index_path = self.folder / f"{key}.{codec}.index"
        if not self._index_path.exists():  # created once, by the process building the dataset
            self._data_path.write_bytes(b"")
            tmp = self.folder / f"{key}.{codec}.index.tmp"
            with open(tmp, "wb") as handle:
                handle.truncate(count * _INDEX_RECORD.itemsize)  # all zero: nothing cached
            tmp.replace(self._index_path)  # last: its presence means both files are whole
        self._fds: tuple[int, int, int] | None = None  # (pid, data fd, index fd)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": None}  # each worker opens its own descriptors

    def __del__(self) -> None:
        if getattr(self, "_fds", None) is not None and self._fds[0] == os.getpid():
            os.close(self._fds[1])
            os.close(self._fds[2])

    def _open(self) -> tuple[int, int]:
        if self._fds is None or self._fds[0] != os.getpid():
            data = os.open(self._data_path, os.O_RDWR)
            index = os.open(self._index_path, os.O_RDWR)
            self._fds = (os.getpid(), data, index)
        return self._fds[1], self._fds[2]

    def get_into(self, index: int, out: np.ndarray) -> bool:
        """Decode tile `index` into `out` (a (size, size, 3) uint8 array) if it is cached."""
        data, table = self._open()
        record = np.frombuffer(
            os.pread(table, _INDEX_RECORD.itemsize, index * _INDEX_RECORD.itemsize),
            _INDEX_RECORD,
        )[0]
        if record["length"] == 0:
            return False
        decode_tile_into(os.pread(data, int(record["length"]), int(record["offset"])), out)
        return True

    def get(self, index: int) -> np.ndarray | None:
        out = np.empty((self.size, self.size, 3), dtype=np.uint8)
        return out if self.get_into(index, out) else None

    def put(self, index: int, tile: np.ndarray) -> np.ndarray:
        """Cache tile `index`; return the pixels a later `get` gives (after JPEG, not `tile`)."""
        encoded = encode_tile(tile, self.codec)
        data, table = self._open()
        fcntl.flock(data, fcntl.LOCK_EX)  # one appender at a time across workers
        try:
            offset = os.fstat(data).st_size
            os.pwrite(data, encoded, offset)
        finally:
            fcntl.flock(data, fcntl.LOCK_UN)
        record = np.array([(offset, len(encoded))], dtype=_INDEX_RECORD)
        os.pwrite(table, record.tobytes(), index * _INDEX_RECORD.itemsize)
        if self.codec == "png":
            return tile
        out = np.empty_like(tile)
        decode_tile_into(encoded, out)
        return out

    def _lengths(self) -> np.ndarray:
        return np.fromfile(self._index_path, dtype=_INDEX_RECORD)["length"]

    @property
    def filled(self) -> int:
        return int((self._lengths() > 0).sum())

    def nbytes(self) -> int:
        """Bytes the cache takes on disk now (encoded tiles and index)."""
        return self._data_path.stat().st_size + self._index_path.stat().st_size


class TileDataset(Dataset):
    """Tiles named by manifest rows, read lazily; items are (H, W, 3) uint8 arrays.

    The default collate turns a batch into a (B, H, W, 3) uint8 tensor, which every detector's
    `fit`/`score` accepts. `uri_by_slide` maps slide ids to their URIs (the slide manifest's
    `uri` column). With `cache_dir`, tiles are kept encoded in a `TileCache` there
    (`cache_codec`: "jpeg", or "png" for pixels exactly as decoded from the slide).
    """

    def __init__(
        self,
        tiles: pl.DataFrame,
        uri_by_slide: dict[str, str],
        *,
        storage: StorageOptions | None = None,
        cache_dir: str | Path | None = None,
        cache_codec: str = "jpeg",
        transform: Callable[[np.ndarray], object] | None = None,
        max_open_slides: int = 4,
    ) -> None:
        missing = sorted(set(tiles["slide_id"].unique().to_list()) - set(uri_by_slide))
        if missing:
            raise KeyError(f"no URI for slides {missing[:5]}: pass the slide manifest's uris")
        slide_ids = tiles["slide_id"].to_list()
        self.uris = sorted({uri_by_slide[s] for s in slide_ids})
        index_of = {uri: i for i, uri in enumerate(self.uris)}
        # Plain numpy columns: cheap to pickle into every worker, no DataFrame per item.
        self.slide = np.array([index_of[uri_by_slide[s]] for s in slide_ids], dtype=np.int32)
        self.x, self.y, self.extent, self.level, self.size = (
            tiles[c].to_numpy().astype(np.int64) for c in TILE_COLUMNS
        )
        self.storage = storage
        self.transform = transform
        self.max_open_slides = max(1, max_open_slides)
        self.cache = None
        if cache_dir is not None and len(self.slide):
            size = int(self.size[0])
            if (self.size != size).any():
                raise ValueError("a tile cache needs tiles of one size")
            self.cache = TileCache(
                cache_dir, self.cache_key(), len(self.slide), size, codec=cache_codec
            )
        self._open: OrderedDict[int, Slide] = OrderedDict()

    def cache_key(self) -> str:
        digest = hashlib.sha256("\n".join(self.uris).encode())
        for column in (self.slide, self.x, self.y, self.extent, self.level, self.size):
            digest.update(np.ascontiguousarray(column).tobytes())
        return digest.hexdigest()[:24]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}  # each worker opens its own handles

    def __len__(self) -> int:
        return len(self.slide)

    def _slide(self, index: int) -> Slide:
        slide = self._open.get(index)
        if slide is None:
            slide = Slide(self.uris[index], self.storage)
            self._open[index] = slide
            while len(self._open) > self.max_open_slides:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(index)
        return slide

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        """(B, H, W, 3) uint8 for `indices`, read slide by slide in grid order, in the asked order.

        Each tile's pixels are copied once, from libvips' buffer (or the cache) into the batch.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        size = int(self.size[indices[0]])
        out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        order = np.lexsort((self.x[indices], self.y[indices], self.slide[indices]))
        for k in order.tolist():
            i = int(indices[k])
            if self.cache is not None and self.cache.get_into(i, out[k]):
                continue
            slide = self._slide(int(self.slide[i]))
            out[k] = slide.read_tile(
                int(self.x[i]),
                int(self.y[i]),
                int(self.extent[i]),
                int(self.level[i]),
                int(self.size[i]),
            )
            if self.cache is not None:
                out[k] = self.cache.put(i, out[k])  # the pixels later epochs will get
        return out

    def __getitem__(self, i: int):
        tile = self.read_batch([int(i)])[0]
        return tile if self.transform is None else self.transform(tile)

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A whole batch in one call (the DataLoader's batched fetch): a list of its tiles."""
        batch = self.read_batch(indices)
        if self.transform is None:
            return list(batch)
        return [self.transform(tile) for tile in batch]
