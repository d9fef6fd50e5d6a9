"""MXNet-compatible RecordIO (.rec/.idx) and the insightface face-rec layout: one import path.

Byte format and ``IndexedRecordIO``: ``unpg.mxnet_recordio`` (dmlc-core RecordIO as MXNet 1.9.1
writes it; multi-part records, float-array labels; no mxnet import). The insightface layout
(``FaceRecIndex``, ``FaceRecWriter``): ``unpg.face_rec``. Everything public is re-exported here,
the import path the rest of the project and outside code use.
"""
from __future__ import annotations

from unpg.face_rec import FaceRecIndex, FaceRecWriter
from unpg.mxnet_recordio import (
    IR_SIZE,
    MAGIC,
    CorruptRecordError,
    IndexedRecordIO,
    IRHeader,
    RecordIOError,
    encode_record,
    pack,
    parse_idx,
    unpack,
)

__all__ = ["IR_SIZE", "MAGIC", "CorruptRecordError", "FaceRecIndex", "FaceRecWriter",
           "IRHeader", "IndexedRecordIO", "RecordIOError", "encode_record", "pack", "parse_idx",
           "unpack"]
