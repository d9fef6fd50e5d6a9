"""The FFCV-style packed file: one versioned file of page-aligned samples, memory-mapped to read.

Layout (all little-endian; both tables are numpy structured dtypes, read without parsing)::

    [0, HEADER_SIZE)            HEADER_DTYPE record, zero padded
    [metadata_offset, +n*40)    METADATA_DTYPE table, one row per sample, in source order
    [data_offset, file_size)    data pages of page_size bytes (data_offset is page aligned)

A sample never spans a page boundary: it goes into the current page when it fits, else it starts
the next page; a sample larger than a page gets its own run of pages (the next sample starts a
fresh page). A reader thus touches whole pages, which is what ``quasi_random`` order exploits.
Samples are the JPEG bytes exactly as stored in the source rec (``FMT_JPEG``; no second lossy
encode) or raw planar RGB pixels ``[3, H, W]`` (``FMT_RAW``, ``pack --raw`` or lossless sources
such as PNG).

The writer writes ``FILE.tmp`` and renames it at ``close()``; the header records the final file
size and a CRC32 of the metadata, so a truncated or altered file is refused with its name.
"""
from __future__ import annotations

import mmap
import operator
import os
import zlib
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np

MAGIC = b"UNPGPACK"
VERSION = 1
HEADER_SIZE = 512
FMT_JPEG, FMT_RAW = 0, 1
DEFAULT_PAGE_SIZE = 1 << 20
MIN_PAGE_SIZE = 4096
PathLike = Union[str, os.PathLike]

HEADER_DTYPE = np.dtype([
    ("magic", "S8"),
    ("version", "<u4"),
    ("header_size", "<u4"),
    ("page_size", "<u8"),
    ("num_samples", "<u8"),
    ("num_classes", "<u8"),
    ("image_height", "<u4"),
    ("image_width", "<u4"),
    ("metadata_offset", "<u8"),
    ("metadata_itemsize", "<u4"),
    ("metadata_crc32", "<u4"),
    ("data_offset", "<u8"),
    ("num_pages", "<u8"),
    ("file_size", "<u8"),
])
METADATA_DTYPE = np.dtype([
    ("data_ptr", "<u8"),  # absolute byte offset in the file
    ("size", "<u4"),  # bytes
    ("label", "<i8"),
    ("height", "<u2"),  # from the JPEG frame header (0: unreadable, the loader decides)
    ("width", "<u2"),
    ("fmt", "u1"),  # FMT_JPEG | FMT_RAW (planar RGB, [3, H, W])
    ("key", "<i8"),  # record key in the source rec (or file number for an image folder)
])
assert HEADER_DTYPE.itemsize <= HEADER_SIZE


class PackedFormatError(ValueError):
    """A packed file that is not one, is of another version, or is truncated/corrupt."""


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def check_page_size(page_size: int) -> int:
    page_size = operator.index(page_size)
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two >= {MIN_PAGE_SIZE} bytes "
                         f"(e.g. 1 MiB = 1048576 or 8 MiB), got {page_size}")
    return page_size


class PackedWriter:
    """Writes a packed file atomically. ``capacity`` bounds the sample count (the metadata table
    sits before the data); fewer samples may be added."""

    def __init__(self, path: PathLike, capacity: int, image_size: Tuple[int, int], *,
                 page_size: int = DEFAULT_PAGE_SIZE):
        self.path = Path(path)
        self.page_size = check_page_size(page_size)
        self.capacity = operator.index(capacity)
        if self.capacity < 1:
            raise ValueError(f"{self.path}: nothing to pack (capacity {capacity})")
        self.image_size = tuple(int(v) for v in image_size)
        self.meta = np.zeros(self.capacity, METADATA_DTYPE)
        self.n = 0
        self.data_offset = _align(HEADER_SIZE + self.capacity * METADATA_DTYPE.itemsize,
                                  self.page_size)
        self._pos = self.data_offset
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._f.seek(self.data_offset)

    def add(self, data, label: int, *, fmt: int = FMT_JPEG, height: int = 0, width: int = 0,
            key: int = -1) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: writer is closed")
        if self.n >= self.capacity:
            raise ValueError(f"{self.path}: more than the declared {self.capacity} samples")
        data = memoryview(data).cast("B")
        size, p = len(data), self.page_size
        if size >= 1 << 32:
            raise ValueError(f"{self.path}: sample {self.n} (key {key}) of {size} bytes exceeds 4 GiB")
        used = (self._pos - self.data_offset) % p
        if used and (used + size > p):  # does not fit: start the next page
            self._f.write(bytes(p - used))
            self._pos += p - used
        self.meta[self.n] = (self._pos, size, label, height, width, fmt, key)
        self._f.write(data)
        self._pos += size
        self.n += 1
        if size > p:  # its own run of pages: the next sample starts a fresh page
            tail = (self._pos - self.data_offset) % p
            if tail:
                self._f.write(bytes(p - tail))
                self._pos += p - tail

    def close(self, num_classes: int) -> None:
        if self._f is None:
            return
        try:
            if self.n == 0:
                raise ValueError(f"{self.path}: no samples were added; nothing written")
            meta = self.meta[: self.n]
            if meta["label"].min() < 0 or meta["label"].max() >= num_classes:
                raise ValueError(f"{self.path}: labels span [{meta['label'].min()}, "
                                 f"{meta['label'].max()}], outside [0, num_classes={num_classes})")
            blob = meta.tobytes()
            header = np.zeros(1, HEADER_DTYPE)
            header[0] = (MAGIC, VERSION, HEADER_SIZE, self.page_size, self.n, num_classes,
                         self.image_size[0], self.image_size[1], HEADER_SIZE,
                         METADATA_DTYPE.itemsize, zlib.crc32(blob), self.data_offset,
                         _align(self._pos - self.data_offset, self.page_size) // self.page_size,
                         self._pos)
            self._f.seek(0)
            self._f.write(header.tobytes().ljust(HEADER_SIZE, b"\0"))
            self._f.write(blob)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "PackedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class PackedFile:
    """Read-only memory map of a packed file. ``meta`` is a zero-copy view of the metadata table;
    ``sample(i)`` a zero-copy uint8 view of sample ``i``. The OS page cache behind the map is
    shared by every process (rank) on the host reading the same file."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE:
                raise PackedFormatError(f"{self.path}: truncated: {size} bytes, shorter than the "
                                        f"{HEADER_SIZE}-byte header; re-run python -m unpg.tools.pack")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._validate(size)
        except BaseException:
            self.close()
            raise

    def _validate(self, size: int) -> None:
        h = np.frombuffer(self._mm, HEADER_DTYPE, count=1).copy()[0]
        where = f"{self.path}"
        if h["magic"] != MAGIC:
            raise PackedFormatError(f"{where}: not a UNPG packed file (magic {bytes(h['magic'])!r}, "
                                    f"expected {MAGIC!r}); create one with python -m unpg.tools.pack")
        if h["version"] != VERSION:
            raise PackedFormatError(f"{where}: packed format version {int(h['version'])}, this "
                                    f"reader understands version {VERSION}; re-run "
                                    f"python -m unpg.tools.pack")
        if h["header_size"] != HEADER_SIZE or h["metadata_itemsize"] != METADATA_DTYPE.itemsize:
            raise PackedFormatError(f"{where}: header/metadata sizes {int(h['header_size'])}/"
                                    f"{int(h['metadata_itemsize'])} do not match version {VERSION}")
        if h["file_size"] != size:
            raise PackedFormatError(f"{where}: truncated or altered: the header records "
                                    f"{int(h['file_size'])} bytes, the file has {size}; re-run "
                                    f"python -m unpg.tools.pack")
        n = int(h["num_samples"])
        meta_end = int(h["metadata_offset"]) + n * METADATA_DTYPE.itemsize
        if n < 1 or meta_end > int(h["data_offset"]) or h["data_offset"] > size:
            raise PackedFormatError(f"{where}: inconsistent header ({n} samples, metadata ends at "
                                    f"{meta_end}, data at {int(h['data_offset'])}, {size} bytes)")
        check_page_size(int(h["page_size"]))
        meta_off = int(h["metadata_offset"])
        with memoryview(self._mm) as view:  # zero-copy checksum of the table
            crc = zlib.crc32(view[meta_off:meta_end])
        if crc != h["metadata_crc32"]:
            raise PackedFormatError(f"{where}: metadata checksum mismatch: the file is corrupt; "
                                    f"re-run python -m unpg.tools.pack")
        meta = np.frombuffer(self._mm, METADATA_DTYPE, count=n, offset=meta_off)
        end = meta["data_ptr"] + meta["size"]
        bad = np.flatnonzero((meta["data_ptr"] < h["data_offset"]) | (end > size)
                             | (meta["label"] < 0) | (meta["label"] >= h["num_classes"])
                             | (meta["fmt"] > FMT_RAW))
        if bad.size:
            i = int(bad[0])
            raise PackedFormatError(f"{where}: sample {i} (key {int(meta['key'][i])}) has an invalid "
                                    f"row {meta[i]} for a {size}-byte file with "
                                    f"{int(h['num_classes'])} classes")
        self.header, self.meta = h, meta
        self.num_samples, self.num_classes = n, int(h["num_classes"])
        self.image_size = (int(h["image_height"]), int(h["image_width"]))
        self.page_size, self.data_offset = int(h["page_size"]), int(h["data_offset"])

    def __len__(self) -> int:
        return self.num_samples

    @property
    def labels(self) -> np.ndarray:
        return self.meta["label"]

    @property
    def page_of(self) -> np.ndarray:
        """int64 [n]: the page index of each sample's first byte."""
        return ((self.meta["data_ptr"] - self.data_offset) // self.page_size).astype(np.int64)

    def sample(self, i: int) -> np.ndarray:
        row = self.meta[i]
        return np.frombuffer(self._mm, np.uint8, count=int(row["size"]), offset=int(row["data_ptr"]))

    def samples(self, indices: np.ndarray) -> List[np.ndarray]:
        """``sample(i)`` for each of ``indices``, with one vectorised lookup of their rows."""
        rows, mm = self.meta[indices], self._mm
        return [np.frombuffer(mm, np.uint8, count=size, offset=ptr)
                for ptr, size in zip(rows["data_ptr"].tolist(), rows["size"].tolist())]

    def close(self) -> None:
        mm, self._mm = getattr(self, "_mm", None), None
        self.meta = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the OS unmaps when it is freed

    def __enter__(self) -> "PackedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
