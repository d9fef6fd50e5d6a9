"""MXNet-compatible RecordIO (.rec/.idx) reading and writing (no mxnet import).

Byte format (dmlc-core RecordIO as MXNet 1.9.1 writes it; every record starts 4-byte aligned):
    u32 magic 0xced7230a | u32 lrecord = cflag << 29 | length | data[length] | zero pad to 4 bytes
A payload is split at every 4-byte-aligned (relative to the payload start) occurrence of the magic
word into parts (cflag 0 whole record, 1 first, 2 middle, 3 last) and the magic word is dropped;
the reader joins the parts with the magic word between them. The .idx holds `key\\toffset\\n` lines.
Image payloads start with IRHeader ('<IfQQ' = flag, label, id, id2, 24 bytes), then `flag` float32
labels when the label is an array, then the data (a JPEG).
The insightface face-rec layout on top of this codec is ``unpg.face_rec``.
"""
from __future__ import annotations

import mmap
import numbers
import operator
import os
import struct
from array import array
from collections import namedtuple
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<II")  # magic, lrecord
_LEN_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24
DAMAGED_WORD = 0xFFFFFFFF  # header_words' fill for a damaged record (no valid IRHeader flag is this)
PathLike = Union[str, os.PathLike]

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])


class RecordIOError(ValueError):
    """Malformed or inconsistent RecordIO input; the message names the file, key and byte offset."""


class CorruptRecordError(RecordIOError):
    """One record is damaged (bad magic, impossible length, broken multi-part chain, short or
    inconsistent IRHeader) while the rest of the file stays readable. Readers treat it like an
    undecodable image (skip or stop, per their policy). `path`, `key` and `offset` name it."""

    def __init__(self, path: str, key, offset, what: str):
        super().__init__(f"{path}: key {key}, byte offset {offset}: {what}")
        self.path, self.key, self.offset, self.reason = path, key, offset, what

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.key, self.offset, self.reason))


def _err(path: str, key, offset, what: str) -> RecordIOError:
    return RecordIOError(f"{path}: key {key}, byte offset {offset}: {what}")


def _corrupt(path: str, key, offset, what: str) -> CorruptRecordError:
    return CorruptRecordError(path, key, offset, what)


def pack(header, data: bytes) -> bytes:
    """IRHeader + data as one payload, like mxnet.recordio.pack (scalar label: flag is forced to 0,
    as MXNet does, since a non-zero flag would make unpack() read image bytes as labels)."""
    flag, label, id_, id2 = IRHeader(*header)
    if isinstance(label, numbers.Number):
        return _IR.pack(0, float(label), id_, id2) + bytes(data)
    label_f32 = np.asarray(label, dtype="<f4").ravel()
    return _IR.pack(label_f32.size, 0.0, id_, id2) + label_f32.tobytes() + bytes(data)


def unpack(payload: bytes) -> Tuple[IRHeader, bytes]:
    """(IRHeader, data); the label is a float32 array when flag > 0, else a Python float."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(payload)
    if flag == 0:
        return IRHeader(0, label, id_, id2), bytes(payload[IR_SIZE:])
    end = IR_SIZE + 4 * flag
    if len(payload) < end:
        raise RecordIOError(f"payload of {len(payload)} bytes is too short for its {flag} float32 labels (flag {flag})")
    label_f32 = np.frombuffer(payload, "<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return IRHeader(flag, label_f32, id_, id2), bytes(payload[end:])


def encode_record(payload: bytes) -> bytes:
    """The bytes MXNet's RecordIOWriter::WriteRecord emits for one payload (parts + padding)."""
    n = len(payload)
    if n > _LEN_MASK:
        raise RecordIOError(f"payload of {n} bytes exceeds RecordIO's limit of {_LEN_MASK} bytes")
    out, start, j = [], 0, payload.find(_MAGIC_BYTES)
    while j >= 0:  # bytes.find runs in C; only aligned hits split the record
        if j % 4:
            j = payload.find(_MAGIC_BYTES, j + 1)
            continue
        out += [_HEAD.pack(MAGIC, (2 if out else 1) << 29 | (j - start)), payload[start:j]]
        start = j + 4
        j = payload.find(_MAGIC_BYTES, start)
    # Earlier parts have aligned lengths, so only the last part needs padding.
    out += [_HEAD.pack(MAGIC, (3 if out else 0) << 29 | (n - start)), payload[start:], bytes(-n % 4)]
    return b"".join(out)


def parse_idx(data: bytes, path: str = "<idx>") -> Tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) as int64 arrays, in file order, from .idx text."""
    if not data.strip():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not data.endswith(b"\n"):
        data += b"\n"
    # Fast path for the exact `digits\tdigits\n` layout MXNet writes (MS1MV2: 5.9M lines < 1 s).
    if not data.translate(None, b"0123456789\t\n"):
        b = np.frombuffer(data, np.uint8)
        seps = np.flatnonzero(b < 48)  # every tab and newline
        widths = np.diff(seps, prepend=-1) - 1
        if (seps.size % 2 == 0 and (b[seps[0::2]] == 9).all() and (b[seps[1::2]] == 10).all()
                and widths.min() >= 1 and widths.max() <= 18):
            kv = np.fromstring(data, dtype=np.int64, sep=" ").reshape(-1, 2)
            return kv[:, 0].copy(), kv[:, 1].copy()
    # Slow path: other whitespace (\r\n, spaces, blank lines), and the exact line of an error.
    keys, offsets, start = [], [], 0
    for lineno, line in enumerate(data.split(b"\n"), 1):
        fields = line.split()
        if fields:
            try:
                key, off = (int(f) for f in fields) if len(fields) == 2 else (None, -1)
                if off < 0 or off >= 1 << 63 or abs(key) >= 1 << 63:
                    raise ValueError
            except ValueError:
                raise RecordIOError(f"{path}: line {lineno}, byte offset {start}: malformed index line "
                                    f"{line[:80]!r} (key {fields[0][:20]!r}); expected 'key<TAB>offset'") from None
            keys.append(key)
            offsets.append(off)
        start += len(line) + 1
    return np.array(keys, np.int64), np.array(offsets, np.int64)


class IndexedRecordIO:
    """MXIndexedRecordIO without MXNet. Mode 'r' maps the .rec read-only (positionless, shared
    by forked workers; a pickled copy re-maps lazily). Mode 'w' writes `*.tmp` files and renames
    them at close(); an exception inside `with` removes them instead."""

    def __init__(self, idx_path: PathLike, rec_path: PathLike, mode: str = "r"):
        self.idx_path, self.rec_path, self.mode = os.fspath(idx_path), os.fspath(rec_path), mode
        self._mm, self._keys_list, self._closed = None, None, False
        if mode == "r":
            with open(self.idx_path, "rb") as f:
                self.key_array, self.offsets = parse_idx(f.read(), self.idx_path)
            self._build_lookup()
            size = len(self._map())
            bad = np.flatnonzero(self.offsets >= size)
            if bad.size:
                raise _err(self.rec_path, int(self.key_array[bad[0]]), int(self.offsets[bad[0]]),
                           f"offset from {self.idx_path} is past the end of the file ({size} bytes)")
        elif mode == "w":
            self._wkeys, self._pos, self._seen, self._max_key = array("q"), 0, None, None
            self._frec = open(self.rec_path + ".tmp", "wb")
            try:
                self._fidx = open(self.idx_path + ".tmp", "wb")
            except BaseException:
                self.abort()
                raise
        else:
            raise ValueError(f"IndexedRecordIO mode must be 'r' or 'w', got {mode!r}")

    def _build_lookup(self) -> None:
        keys = self.key_array
        n = keys.size
        self._dense = bool(n) and bool((keys == np.arange(n)).all())  # key == position: O(1)
        if not self._dense:
            self._order = np.argsort(keys, kind="stable")
            self._sorted = keys[self._order]
            dup = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
            if dup.size:
                first, second = self._order[dup[0]], self._order[dup[0] + 1]
                raise _err(self.idx_path, int(self._sorted[dup[0]]), int(self.offsets[second]),
                           f"key appears twice (index entries {first + 1} and {second + 1})")

    def _map(self):
        if self._closed:
            raise ValueError(f"{self.rec_path}: reading from a closed IndexedRecordIO")
        if self._mm is None:
            with open(self.rec_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._mm

    @property
    def keys(self) -> list:
        """Keys in .idx order (a list, like MXNet; `key_array` is the int64 array)."""
        if self.mode == "w":
            return list(self._wkeys)
        if self._keys_list is None:
            self._keys_list = self.key_array.tolist()
        return self._keys_list

    def __len__(self) -> int:
        return len(self._wkeys) if self.mode == "w" else int(self.key_array.size)

    def __contains__(self, key) -> bool:
        try:
            self._position(key)
        except RecordIOError:
            return False
        return True

    def _position(self, key) -> int:
        key, n = operator.index(key), self.key_array.size
        if self._dense:
            if 0 <= key < n:
                return key
        else:
            i = int(np.searchsorted(self._sorted, key))
            if i < n and self._sorted[i] == key:
                return int(self._order[i])
        raise _err(self.idx_path, key, "n/a", f"key not in the index ({n} keys) of {self.rec_path}")

    def positions(self, keys) -> np.ndarray:
        """Index positions (int64) of many keys at once; raises naming the first missing key."""
        query = np.asarray(keys, dtype=np.int64)
        n = self.key_array.size
        if self._dense:
            pos, found = query, (query >= 0) & (query < n)
        elif n:
            i = np.minimum(np.searchsorted(self._sorted, query), n - 1)
            pos, found = self._order[i], self._sorted[i] == query
        else:
            pos, found = query, np.zeros(query.shape, bool)
        if not found.all():
            self._position(int(query[~found][0]))
        return pos

    def offset_of(self, key) -> int:
        return int(self.offsets[self._position(key)])

    def read_idx(self, key) -> bytes:
        """The payload stored under `key` (multi-part records joined)."""
        return self._read(self.offset_of(key), key)

    def read_at(self, offset: int) -> bytes:
        """The payload of the record starting at byte `offset` of the .rec."""
        return self._read(operator.index(offset), "(read by offset)")

    def _read(self, offset: int, key) -> bytes:
        buf = self._map()
        size, pos, parts = len(buf), offset, []
        while True:
            where = f" (in the multi-part record starting at byte offset {offset})" if parts else ""
            if pos < 0 or pos >= size:
                raise _corrupt(self.rec_path, key, pos, f"offset is past the end of the file ({size} bytes){where}")
            if pos + 8 > size:
                raise _corrupt(self.rec_path, key, pos, f"truncated file: record header cut off at {size} bytes{where}")
            magic, lrec = _HEAD.unpack_from(buf, pos)
            if magic != MAGIC:
                raise _corrupt(self.rec_path, key, pos, f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}: the .idx "
                           f"does not point at a record or the file is corrupt{where}")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            end = pos + 8 + length
            if end + (-length % 4) > size:
                raise _corrupt(self.rec_path, key, pos, f"record length {length} runs past the end of the "
                           f"file ({size} bytes): truncated or corrupt{where}")
            if cflag not in ((2, 3) if parts else (0, 1)):
                raise _corrupt(self.rec_path, key, pos, f"malformed multi-part record: part with cflag {cflag} "
                           + (f"after a cflag 1/2 part{where}" if parts else "does not start a record"))
            parts.append(buf[pos + 8:end])
            pos = end + (-length % 4)
            if cflag in (0, 3):
                return parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)

    def header_words(self, positions, nwords: int, damaged: Optional[list] = None) -> np.ndarray:
        """uint32 [n, nwords]: the first `nwords` payload words of the records at index `positions`,
        read straight from the map (no record copies); unusual records (unaligned, multi-part with
        a short first part) go through the full reader, which raises CorruptRecordError on a
        damaged record -- or, given a `damaged` list, appends `(key, offset, reason)` to it and
        fills that row with DAMAGED_WORD."""
        pos = np.asarray(positions, np.int64)
        off = self.offsets[pos]
        buf = self._map()
        size = len(buf)
        out = np.zeros((pos.size, nwords), np.uint32)
        fast = (off % 4 == 0) & (off + 8 + 4 * nwords <= size)
        if size // 4 >= 2 + nwords:
            words = np.frombuffer(buf, "<u4", count=size // 4)
            w0 = np.where(fast, off // 4, 0)
            lrec = words[w0 + 1]
            fast &= (words[w0] == MAGIC) & ((lrec >> 29) <= 1) & ((lrec & _LEN_MASK) >= 4 * nwords)
            for j in range(nwords):
                out[:, j] = words[w0 + 2 + j]
            del words  # a live view would keep close() from unmapping
        else:
            fast[:] = False
        for i in np.flatnonzero(~fast):
            key, o = int(self.key_array[pos[i]]), int(off[i])
            try:
                payload = self._read(o, key)
                if len(payload) < 4 * nwords:
                    raise _corrupt(self.rec_path, key, o, f"payload of {len(payload)} bytes is too short "
                                   f"for its header")
            except CorruptRecordError as e:
                if damaged is None:
                    raise
                damaged.append((key, o, e.reason))
                out[i] = DAMAGED_WORD
                continue
            out[i] = np.frombuffer(payload, "<u4", count=nwords)
        return out

    def write_idx(self, key, payload: bytes) -> None:
        """Append `payload` to the .rec and `key\\toffset` to the .idx."""
        if self.mode != "w" or self._frec is None:
            raise ValueError(f"{self.rec_path}: write_idx needs an open IndexedRecordIO in mode 'w'")
        key = operator.index(key)
        if self._seen is None and self._max_key is not None and key <= self._max_key:
            self._seen = set(self._wkeys)  # keys stopped increasing: track them to catch duplicates
        if self._seen is not None:
            if key in self._seen:
                raise _err(self.idx_path, key, self._pos, "key already written; keys must be unique")
            self._seen.add(key)
        try:
            record = encode_record(bytes(payload))
        except RecordIOError as e:
            raise _err(self.rec_path, key, self._pos, str(e)) from None
        self._frec.write(record)
        self._fidx.write(b"%d\t%d\n" % (key, self._pos))
        self._max_key = key if self._max_key is None else max(key, self._max_key)
        self._wkeys.append(key)
        self._pos += len(record)

    def _overwrite(self, offset: int, record: bytes) -> None:
        """Rewrite bytes of an already written record in place (FaceRecWriter's header)."""
        self._frec.seek(offset)
        self._frec.write(record)
        self._frec.seek(0, os.SEEK_END)

    def abort(self) -> None:
        """Writer: close and remove the temporaries; nothing is published."""
        for f in (getattr(self, "_frec", None), getattr(self, "_fidx", None)):
            if f is not None:
                f.close()
        self._frec = self._fidx = None
        for path in (self.rec_path, self.idx_path):
            Path(path + ".tmp").unlink(missing_ok=True)

    def close(self) -> None:
        if self.mode == "w":
            if self._frec is None:
                return
            try:
                for f in (self._frec, self._fidx):
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                os.replace(self.rec_path + ".tmp", self.rec_path)
                os.replace(self.idx_path + ".tmp", self.idx_path)  # the .idx last: it completes the pair
            except BaseException:
                self.abort()
                raise
            self._frec = self._fidx = None
            return
        mm, self._mm, self._closed = self._mm, None, True
        if isinstance(mm, mmap.mmap):
            try:
                mm.close()
            except BufferError:
                pass  # a numpy view still exports it; the OS unmaps it when that view is freed

    def __enter__(self) -> "IndexedRecordIO":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.mode == "w":
            self.abort()
        else:
            self.close()

    def __getstate__(self) -> dict:
        if self.mode == "w":
            raise TypeError(f"{self.rec_path}: an IndexedRecordIO writer cannot be pickled")
        state = self.__dict__.copy()
        state["_mm"], state["_keys_list"] = None, None  # the worker maps the file itself, lazily
        return state
