"""The insightface face-rec layout (train.rec/train.idx/property) on MXNet RecordIO.

Record 0 has an array label [a, b); keys 1..a-1 are images (label = class id), keys a..b-1 are
identity records with label [start, end). A rec without that header is read as image-only: every
key is an image carrying its own label.

Damage in one image record does not make the rec unusable: ``FaceRecIndex.open`` reads only the
header, the identity records and a probe of image headers, tolerates damaged image records
(listed in ``FaceRecIndex.damaged`` as ``(key, offset, reason)``; an image-only rec leaves them
out since their label is unknown), and reading such a record raises ``CorruptRecordError``.
Damage in the header or identity records, or a rec without any image, raises ``RecordIOError``.
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from unpg.fileio import atomic_write_text
from unpg.mxnet_recordio import (
    DAMAGED_WORD,
    IR_SIZE,
    CorruptRecordError,
    IndexedRecordIO,
    IRHeader,
    PathLike,
    RecordIOError,
    _corrupt,
    _err,
    encode_record,
    pack,
    unpack,
)

__all__ = ["FaceRecIndex", "FaceRecWriter"]

_F32_EXACT = 1 << 24  # the largest range of integers float32 labels hold exactly
_CHUNK = 1 << 20  # rows per vectorised header gather (bounds temporary memory)


def _unpack_key(rec: IndexedRecordIO, key) -> Tuple[IRHeader, bytes]:
    payload = rec.read_idx(key)
    try:
        return unpack(payload)
    except RecordIOError as e:
        raise _corrupt(rec.rec_path, key, rec.offset_of(key), str(e)) from None


def _header_labels(rec: IndexedRecordIO, positions: np.ndarray, damaged: List[tuple]) -> np.ndarray:
    """float64 scalar label of each record (label[0] for array labels), vectorised over the map;
    NaN for a damaged record, which is appended to ``damaged`` as (key, offset, reason)."""
    out = np.empty(positions.size, np.float64)
    for lo in range(0, positions.size, _CHUNK):
        pos = positions[lo:lo + _CHUNK]
        words = rec.header_words(pos, IR_SIZE // 4, damaged)
        labels = words.view("<f4")[:, 1].astype(np.float64)
        bad = words[:, 0] == DAMAGED_WORD
        flagged = np.flatnonzero((words[:, 0] > 0) & ~bad)
        if flagged.size:
            more = rec.header_words(pos[flagged], IR_SIZE // 4 + 1, damaged)
            labels[flagged] = more.view("<f4")[:, -1]
            bad[flagged[more[:, 0] == DAMAGED_WORD]] = True
        labels[bad] = np.nan
        out[lo:lo + pos.size] = labels
    return out


def _as_ints(rec: IndexedRecordIO, positions: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
    ok = np.isfinite(values) & (values >= 0) & (values == np.floor(values))
    if not ok.all():
        i = int(np.flatnonzero(~ok.reshape(len(positions), -1).all(axis=1))[0])
        raise _err(rec.rec_path, int(rec.key_array[positions[i]]), int(rec.offsets[positions[i]]),
                   f"{what} {values[i].tolist()} is not a non-negative integer")
    return values.astype(np.int64)


def _read_property(path: Path) -> Optional[Tuple[int, int, int]]:
    if not path.exists():
        return None
    text = path.read_text().strip()
    try:
        vals = tuple(int(v) for v in text.split(","))
        if len(vals) != 3 or min(vals) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
    return vals


class FaceRecIndex:
    """Image keys, int64 labels and identity ranges of an insightface face rec (train.rec/.idx)."""

    def __init__(self, rec: IndexedRecordIO, image_keys: np.ndarray, labels: np.ndarray,
                 num_classes: int, identity_ranges: Optional[np.ndarray], image_size,
                 damaged: Optional[List[Tuple[int, int, str]]] = None):
        self.rec, self.image_keys, self.labels = rec, image_keys, labels
        self.num_classes, self.identity_ranges, self.image_size = num_classes, identity_ranges, image_size
        # Image records found damaged while opening: (key, byte offset, reason). Not exhaustive for
        # the header + identity layout (only probed records are read); reads raise on the rest.
        self.damaged: List[Tuple[int, int, str]] = list(damaged or [])

    @classmethod
    def open(cls, directory: PathLike) -> "FaceRecIndex":
        d = Path(directory)
        prop_path = d / "property"
        prop = _read_property(prop_path)
        rec = IndexedRecordIO(d / "train.idx", d / "train.rec", "r")
        damaged: List[Tuple[int, int, str]] = []
        try:
            try:
                head = _unpack_key(rec, 0)[0] if 0 in rec else None
            except CorruptRecordError as e:  # not an image: the layout itself is unknown
                raise RecordIOError(f"{e}: the header record (key 0) is damaged; the rec cannot be "
                                    f"read as the insightface layout") from None
            if head is not None and head.flag > 0:
                keys, labels, ranges = cls._from_identity_records(rec, head.label, damaged)
                if prop is not None and prop[0] != len(ranges):
                    raise RecordIOError(f"{prop_path}: num_classes {prop[0]} disagrees with the {len(ranges)} "
                                        f"identity records in {rec.rec_path}; fix or delete the property file")
                num_classes = len(ranges)
            else:  # no header: every key is an image carrying its own label
                keys, ranges = rec.key_array.copy(), None
                pos = np.arange(keys.size)
                found = _header_labels(rec, pos, damaged)
                ok = ~np.isnan(found)  # a damaged record's label is unknown: it is left out
                keys, pos = keys[ok], pos[ok]
                labels = _as_ints(rec, pos, found[ok], "image label")
                num_classes = int(labels.max()) + 1 if labels.size else 0
                if prop is not None:
                    if num_classes > prop[0]:
                        raise RecordIOError(f"{prop_path}: num_classes {prop[0]} but {rec.rec_path} "
                                            f"has label {num_classes - 1}")
                    num_classes = prop[0]
            if keys.size == 0:
                raise RecordIOError(f"{rec.rec_path}: the rec has no images ({len(rec)} records in "
                                    f"{rec.idx_path}" + (f", {len(damaged)} of them damaged" if damaged
                                                          else "") + "); point at a rec that holds images")
        except BaseException:
            rec.close()
            raise
        return cls(rec, keys, labels, num_classes, ranges, None if prop is None else (prop[1], prop[2]),
                   damaged)

    @staticmethod
    def _from_identity_records(rec: IndexedRecordIO, head_label: np.ndarray, damaged: List[tuple]):
        bounds = np.asarray(head_label[:2], np.float64)
        if len(head_label) < 2 or not 1 <= bounds[0] <= bounds[1]:
            raise _err(rec.rec_path, 0, rec.offset_of(0),
                       f"header label {head_label.tolist()} is not [first identity key, end key)")
        first_id, end = _as_ints(rec, rec.positions([0]), bounds[None], "header record label")[0].tolist()
        image_keys = np.arange(1, first_id, dtype=np.int64)
        rec.positions(image_keys)  # every image key must be indexed
        id_pos = rec.positions(np.arange(first_id, end, dtype=np.int64))
        try:
            words = rec.header_words(id_pos, IR_SIZE // 4 + 2)
        except CorruptRecordError as e:  # without its identity records the layout is unknown
            raise RecordIOError(f"{e}: an identity record is damaged; the rec cannot be read as the "
                                f"insightface layout") from None
        bad = np.flatnonzero(words[:, 0] != 2)
        if bad.size:
            p = id_pos[bad[0]]
            raise _err(rec.rec_path, int(rec.key_array[p]), int(rec.offsets[p]),
                       f"identity record has flag {words[bad[0], 0]}, expected 2 (label [start, end))")
        ranges = _as_ints(rec, id_pos, words.view("<f4")[:, -2:].astype(np.float64), "identity range")
        starts, ends = ranges[:, 0], ranges[:, 1]
        # The ranges must tile keys [1, first_id) in class order, so np.repeat yields every label.
        expect = np.concatenate([[1], ends[:-1]])
        bad = np.flatnonzero((starts != expect) | (ends < starts))
        if bad.size or (ends[-1] if ends.size else 1) != first_id:
            i = int(bad[0]) if bad.size else ends.size - 1
            raise _err(rec.rec_path, first_id + i, int(rec.offsets[id_pos[i]]) if ends.size else "n/a",
                       f"identity range {ranges[i].tolist() if ends.size else []} does not continue at key "
                       f"{expect[i] if bad.size else '...'}; ranges must tile image keys [1, {first_id})")
        labels = np.repeat(np.arange(ends.size, dtype=np.int64), ends - starts)
        # Cheap consistency check: the first and last image of each identity carry its class id.
        cls_ids = np.flatnonzero(ends > starts)
        probe = np.concatenate([starts[cls_ids], ends[cls_ids] - 1])
        probe_pos = rec.positions(probe)
        got = _header_labels(rec, probe_pos, damaged)  # a damaged probe (NaN) is only reported
        bad = np.flatnonzero(~np.isnan(got) & (got != np.concatenate([cls_ids, cls_ids])))
        damaged[:] = sorted(set(damaged))  # a one-image class is probed twice
        if bad.size:
            i, c = int(bad[0]), int(np.concatenate([cls_ids, cls_ids])[bad[0]])
            raise _err(rec.rec_path, int(probe[i]), int(rec.offsets[probe_pos[i]]),
                       f"image header label {got[i]} disagrees with identity record {first_id + c} "
                       f"(class {c}, keys {ranges[c].tolist()})")
        return image_keys, labels, ranges

    @classmethod
    def scan(cls, directory: PathLike) -> "FaceRecIndex":
        """Every readable image record of the rec, found by reading each record's IRHeader (not
        the header and identity records, which may be the damaged part): records with a scalar
        label are images, ordered by (label, key); array-label records are skipped and damaged
        ones listed in ``damaged``. For repairing a rec that ``open`` refuses."""
        d = Path(directory)
        prop = _read_property(d / "property")
        rec = IndexedRecordIO(d / "train.idx", d / "train.rec", "r")
        damaged: List[Tuple[int, int, str]] = []
        try:
            pos = np.arange(len(rec))
            words = np.concatenate([rec.header_words(pos[lo:lo + _CHUNK], IR_SIZE // 4, damaged)
                                    for lo in range(0, pos.size, _CHUNK)] or [np.zeros((0, 6), np.uint32)])
            image = words[:, 0] == 0  # flag 0: a scalar label (damaged rows hold DAMAGED_WORD)
            labels_f = words.view("<f4")[:, 1].astype(np.float64)
            ok = image & np.isfinite(labels_f) & (labels_f >= 0) & (labels_f == np.floor(labels_f))
            keys, labels = rec.key_array[ok], labels_f[ok].astype(np.int64)
            order = np.lexsort((keys, labels))
            keys, labels = keys[order], labels[order]
            if keys.size == 0:
                raise RecordIOError(f"{rec.rec_path}: the rec has no readable images ({len(rec)} records)")
            num_classes = int(labels.max()) + 1
        except BaseException:
            rec.close()
            raise
        return cls(rec, keys, labels, num_classes, None, None if prop is None else (prop[1], prop[2]),
                   sorted(set(damaged)))

    def __len__(self) -> int:
        return int(self.image_keys.size)

    def read_key(self, key) -> Tuple[IRHeader, bytes]:
        return _unpack_key(self.rec, key)

    def read_image(self, i: int) -> Tuple[int, bytes]:
        """(label, JPEG bytes) of the i-th image; its header label must agree with the index."""
        key = int(self.image_keys[i])
        header, jpeg = self.read_key(key)
        label = header.label if header.flag == 0 else float(header.label[0])
        if label != self.labels[i]:
            raise _corrupt(self.rec.rec_path, key, self.rec.offset_of(key),
                           f"header label {label} disagrees with the index label {int(self.labels[i])}")
        return int(self.labels[i]), jpeg

    def close(self) -> None:
        self.rec.close()

    def __enter__(self) -> "FaceRecIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FaceRecWriter:
    """Writes an insightface-layout rec (train.rec, train.idx, property) atomically: images with
    labels 0, 1, 2, ... in non-decreasing contiguous order, identity records and header at close()."""

    def __init__(self, directory: PathLike, image_size=(112, 112)):
        self.directory = Path(directory)
        self.image_size = tuple(int(v) for v in image_size)
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"image_size must be (height, width) > 0, got {image_size!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rec = IndexedRecordIO(self.directory / "train.idx", self.directory / "train.rec", "w")
        # Key 0 at offset 0, like insightface: reserve the header record now, patch its label at
        # close(). Its payload is always 32 bytes (flag 2, label 0.0, id 0, id2 0, two float32
        # key bounds) and never holds the magic word at an aligned offset: the fixed fields are 0/2
        # and the magic 0xced7230a read as float32 is negative while key bounds are >= 0. So it
        # is always one cflag-0 part of 40 bytes and rewriting it in place keeps the file valid.
        self._header_record = encode_record(self._header_payload(0, 0))
        self._rec.write_idx(0, self._header_payload(0, 0))
        self._starts: list = []  # first image key of each class
        self._next_key = 1

    @staticmethod
    def _header_payload(first_id: int, end: int) -> bytes:
        return pack(IRHeader(2, [float(first_id), float(end)], 0, 0), b"")

    def add(self, label: int, jpeg: bytes) -> None:
        label, n_cls = operator.index(label), len(self._starts)
        if label not in (n_cls - 1, n_cls):
            raise ValueError(f"{self.directory}: label {label} out of order; labels must come in "
                             f"non-decreasing contiguous order 0, 1, 2, ... (last label was {n_cls - 1})")
        key = self._next_key
        if key + n_cls + 1 > _F32_EXACT:
            raise RecordIOError(f"{self.directory}: key {key}, byte offset {self._rec._pos}: the insightface "
                                f"layout stores keys as float32 labels, exact only below {_F32_EXACT}")
        if label == n_cls:
            self._starts.append(key)
        self._rec.write_idx(key, pack(IRHeader(0, float(label), key, 0), jpeg))
        self._next_key += 1

    def close(self) -> None:
        if self._rec._frec is None:
            return
        try:
            if not self._starts:
                raise ValueError(f"{self.directory}: no images were added; nothing written")
            first_id = self._next_key
            for c, (start, end) in enumerate(zip(self._starts, self._starts[1:] + [first_id])):
                self._rec.write_idx(first_id + c, pack(IRHeader(2, [float(start), float(end)], 0, 0), b""))
            header = encode_record(self._header_payload(first_id, first_id + len(self._starts)))
            assert len(header) == len(self._header_record), "header record size changed"
            self._rec._overwrite(0, header)
            h, w = self.image_size
            atomic_write_text(self.directory / "property", f"{len(self._starts)},{h},{w}\n")
            self._rec.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._rec.abort()

    def __enter__(self) -> "FaceRecWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
