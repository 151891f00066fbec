"""Read tile pixels named by a tile manifest, for training and scoring.

- `read_tiles(slide, rows)`: one batch of one slide's tiles, read in grid order so neighbouring
  tiles share decoded image tiles, returned in the rows' order.
- `TileDataset`: a torch map-style dataset over manifest rows of any number of slides. It holds
  only coordinates; each DataLoader worker opens the slides it needs lazily and keeps one handle
  per slide (a few at most), and `__getitems__` lets the DataLoader ask for a whole batch at once,
  so a batch is read slide by slide in grid order.
- `TileCache`: decoded tiles in a flat file on local disk, for training runs that read the same
  tiles for many epochs. benchmarks/tiling.py measures when it pays: a hit is several times
  cheaper than decoding a JPEG tile, the first epoch pays for writing it, and the file is about
  12x the size of the JPEG tiles it holds.
"""

from __future__ import annotations

import hashlib
import os
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


def iter_tile_batches(
    slide: Slide, tiles: pl.DataFrame, batch_size: int
) -> Iterator[tuple[pl.DataFrame, np.ndarray]]:
    """Yield (rows, pixels (B, H, W, 3) uint8) for consecutive batches of one slide's tiles."""
    for start in range(0, tiles.height, batch_size):
        rows = tiles.slice(start, batch_size)
        yield rows, read_tiles(slide, rows)


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


class TileCache:
    """Decoded tiles of one dataset in `<folder>/<key>.tiles`, filled as tiles are first read.

    A flat file of (count, size, size, 3) uint8 written with `pwrite` and read with `preadv`
    (several times faster than filling a memory map, which faults in every page), shared by
    DataLoader workers through the page cache. A tile's flag byte (in `<key>.filled`) is written
    after its pixels, so a killed run leaves unfilled tiles, never torn ones; after a machine crash
    (no fsync) delete the folder. `key` names the exact rows, so a changed manifest gets a new
    file rather than stale pixels.
    """

    def __init__(self, folder: str | Path, key: str, count: int, size: int) -> None:
        self.folder = Path(folder)
        self.key, self.count, self.size = key, count, size
        self.tile_bytes = size * size * 3
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pixels_path = self.folder / f"{key}.tiles"
        self._flags_path = self.folder / f"{key}.filled"
        if not self._flags_path.exists():  # created once, by the process building the dataset
            with open(self._pixels_path, "wb") as handle:
                handle.truncate(count * self.tile_bytes)  # sparse: disk is used as tiles arrive
            tmp = self.folder / f"{key}.filled.tmp"
            tmp.write_bytes(bytes(count))
            tmp.replace(self._flags_path)  # last: its presence means both files are whole
        self._fds: tuple[int, int, int] | None = None  # (pid, pixels fd, flags fd)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": None}  # each worker opens its own descriptors

    def __del__(self) -> None:
        if getattr(self, "_fds", None) is not None and self._fds[0] == os.getpid():
            os.close(self._fds[1])
            os.close(self._fds[2])

    def _open(self) -> tuple[int, int]:
        if self._fds is None or self._fds[0] != os.getpid():
            pixels = os.open(self._pixels_path, os.O_RDWR)
            flags = os.open(self._flags_path, os.O_RDWR)
            self._fds = (os.getpid(), pixels, flags)
        return self._fds[1], self._fds[2]

    def get_into(self, index: int, out: np.ndarray) -> bool:
        """Copy tile `index` into `out` (a C-contiguous (size, size, 3) uint8 view) if cached."""
        pixels, flags = self._open()
        if os.pread(flags, 1, index) != b"\x01":
            return False
        os.preadv(pixels, [memoryview(out).cast("B")], index * self.tile_bytes)
        return True

    def get(self, index: int) -> np.ndarray | None:
        out = np.empty((self.size, self.size, 3), dtype=np.uint8)
        return out if self.get_into(index, out) else None

    def put(self, index: int, tile: np.ndarray) -> None:
        pixels, flags = self._open()
        os.pwrite(pixels, np.ascontiguousarray(tile, dtype=np.uint8), index * self.tile_bytes)
        os.pwrite(flags, b"\x01", index)

    @property
    def filled(self) -> int:
        return self._flags_path.read_bytes().count(1)

    def nbytes(self) -> int:
        return self.count * self.tile_bytes


class TileDataset(Dataset):
    """Tiles named by manifest rows, read lazily; items are (H, W, 3) uint8 arrays.

    The default collate turns a batch into a (B, H, W, 3) uint8 tensor, which every detector's
    `fit`/`score` accepts. `uri_by_slide` maps slide ids to their URIs (the slide manifest's
    `uri` column). With `cache_dir`, decoded tiles are kept in a `TileCache` there.
    """

    def __init__(
        self,
        tiles: pl.DataFrame,
        uri_by_slide: dict[str, str],
        *,
        storage: StorageOptions | None = None,
        cache_dir: str | Path | None = None,
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
            self.cache = TileCache(cache_dir, self.cache_key(), len(self.slide), size)
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
                self.cache.put(i, out[k])
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
