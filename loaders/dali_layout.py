"""On-disk layout of a DALI-ready rec folder (written by ``python -m unpg.tools.prepare_dali``).

DALI's ``fn.readers.mxnet`` reads records in file order and treats every record as an image; it
ignores the keys of the ``.idx``. insightface recs break it: record 0 is a header and the records
after the images are identity ranges, all without image data. A prepared folder holds only image
records, globally shuffled, split into shards::

    part-00000.rec / part-00000.idx   MXNet RecordIO (keys = the source rec's keys; readable by
    part-00001.rec / ...               unpg.recordio and MXNet); payloads copied byte for byte
    dali.idx                           ONE index over all shards with *global* offsets (offsets into
                                       the concatenation of the shards), which is what DALI's
                                       mxnet reader wants for several files
    dali_manifest.json                 counts, classes, seed, shards (written last)

``read_prepared`` validates a folder and refuses an insightface rec with a message saying how to
prepare it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Union

FORMAT = "unpg-dali-rec"
VERSION = 1
MANIFEST = "dali_manifest.json"
DALI_INDEX = "dali.idx"
PathLike = Union[str, os.PathLike]
_MAGIC = 0xCED7230A


def shard_names(i: int):
    return f"part-{i:05d}.rec", f"part-{i:05d}.idx"


def _fix(rec_dir: Path) -> str:
    return (f"prepare it with: python -m unpg.tools.prepare_dali --rec {rec_dir} --out "
            f"{rec_dir}_dali, then set data.dali_dir={rec_dir}_dali")


def _first_flag(rec_path: Path) -> int:
    """The IRHeader flag of the first record (flag > 0: an array label, i.e. a header record)."""
    with open(rec_path, "rb") as f:
        head = f.read(12)
    if len(head) < 12:
        raise ValueError(f"{rec_path}: empty or truncated RecordIO file ({len(head)} bytes)")
    magic, _, flag = struct.unpack("<III", head)
    if magic != _MAGIC:
        raise ValueError(f"{rec_path}: not a RecordIO file (magic 0x{magic:08x})")
    return flag


def read_prepared(directory: PathLike) -> Dict[str, Any]:
    """The manifest of a prepared folder (with absolute ``rec_paths`` and ``index_path`` added),
    after checking that every shard is present, complete and starts with an image record."""
    d = Path(directory)
    manifest_path = d / MANIFEST
    rec = d / "train.rec"
    if rec.is_file() and _first_flag(rec) > 0:
        raise ValueError(f"{rec}: insightface layout with header and identity records (record 0 "
                         f"has an array label); DALI's mxnet reader would decode them as "
                         f"images. {_fix(d)}")
    if not manifest_path.is_file():
        raise ValueError(f"{d}: no {MANIFEST}: not a folder written by unpg.tools.prepare_dali; "
                         f"{_fix(d)}")
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e}); re-run prepare_dali") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(f"{manifest_path}: expected format {FORMAT!r} version {VERSION}, got "
                         f"{m.get('format') if isinstance(m, dict) else m!r} version "
                         f"{m.get('version') if isinstance(m, dict) else None}; re-run prepare_dali")
    rec_paths = []
    for shard in m["shards"]:
        rec, idx = d / shard["rec"], d / shard["idx"]
        for p in (rec, idx):
            if not p.is_file():
                raise ValueError(f"{p}: listed in {manifest_path} but missing; re-run prepare_dali")
        if rec.stat().st_size != shard["bytes"]:
            raise ValueError(f"{rec}: {rec.stat().st_size} bytes, {manifest_path} says "
                             f"{shard['bytes']}: stale or incomplete; re-run prepare_dali")
        if _first_flag(rec) != 0:
            raise ValueError(f"{rec}: starts with a header record, not an image; re-run "
                             f"prepare_dali")
        rec_paths.append(str(rec))
    index = d / m["dali_index"]
    if not index.is_file():
        raise ValueError(f"{index}: listed in {manifest_path} but missing; re-run prepare_dali")
    return dict(m, rec_paths=rec_paths, index_path=str(index), directory=str(d))
