"""unpg.recordio against files written by real MXNet 1.9.1, an independent port of dmlc-core's
RecordIO loops, write/read round trips, and every bad-input case (message names file/key/offset)."""
import hashlib
import json
import multiprocessing
import pickle
import random
import struct

import cv2
import numpy as np
import pytest

from unpg.recordio import (
    CorruptRecordError,
    FaceRecIndex,
    FaceRecWriter,
    IndexedRecordIO,
    IRHeader,
    RecordIOError,
    encode_record,
    pack,
    parse_idx,
    unpack,
)

MAGIC = struct.pack("<I", 0xCED7230A)


# ----------------------------------------------------------------------------- references
def ref_write_record(buf: bytes) -> bytes:
    """Line-by-line port of dmlc-core RecordIOWriter::WriteRecord (scan every aligned word)."""
    n, dptr, out = len(buf), 0, bytearray()
    for i in range(0, n // 4 * 4, 4):
        if buf[i:i + 4] == MAGIC:
            out += MAGIC + struct.pack("<I", (1 if dptr == 0 else 2) << 29 | (i - dptr)) + buf[dptr:i]
            dptr = i + 4
    out += MAGIC + struct.pack("<I", (3 if dptr else 0) << 29 | (n - dptr)) + buf[dptr:]
    return bytes(out + bytes(-n % 4))


def ref_read_all(rec: bytes) -> list:
    """Port of dmlc-core RecordIOReader::NextRecord over a whole file: list of payloads."""
    out, pos = [], 0
    while pos < len(rec):
        payload = b""
        while True:
            magic, lrec = struct.unpack_from("<4sI", rec, pos)
            assert magic == MAGIC
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            payload += rec[pos + 8:pos + 8 + length]
            pos += 8 + (length + 3) // 4 * 4
            if cflag in (0, 3):
                break
            payload += MAGIC
        out.append(payload)
    return out


def write_rec(tmp_path, items, name="x"):
    idx, rec = tmp_path / f"{name}.idx", tmp_path / f"{name}.rec"
    with IndexedRecordIO(idx, rec, "w") as w:
        for key, payload in items:
            w.write_idx(key, payload)
    return idx, rec


def idx_dict(path) -> dict:
    keys, offsets = parse_idx(path.read_bytes())
    return dict(zip(keys.tolist(), offsets.tolist()))


def assert_names(exc_info, *parts):
    msg = str(exc_info.value)
    for p in parts:
        assert str(p) in msg, f"{p!r} not in message: {msg}"


# ----------------------------------------------------------------------------- MXNet fixtures
def test_ms1m_tiny_matches_manifest(fixtures_dir):
    d = fixtures_dir / "ms1m_tiny"
    manifest = json.loads((d / "manifest.json").read_text())
    with FaceRecIndex.open(d) as index:
        assert index.num_classes == manifest["num_classes"] == 12
        assert len(index) == manifest["num_images"] == 96
        assert index.image_size == (112, 112)
        assert index.image_keys.dtype == np.int64 and index.labels.dtype == np.int64
        assert index.image_keys.tolist() == [r["idx"] for r in manifest["records"]]
        assert index.labels.tolist() == [r["label"] for r in manifest["records"]]
        assert index.identity_ranges.tolist() == manifest["identity_ranges"]
        for i, r in enumerate(manifest["records"]):
            label, jpeg = index.read_image(i)
            assert label == r["label"] and len(jpeg) == r["jpeg_bytes"]
            assert hashlib.md5(jpeg).hexdigest() == r["jpeg_md5"]
            assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)
        rec = index.rec
        assert rec.keys == list(range(109)) and len(rec) == 109 and rec.offsets[0] == 0
        head, rest = unpack(rec.read_idx(0))
        assert head.flag == 2 and head.label.tolist() == [97.0, 109.0] and rest == b""
        for c, (start, end) in enumerate(manifest["identity_ranges"]):
            h, rest = index.read_key(97 + c)
            assert (h.flag, h.id, h.id2, h.label.tolist(), rest) == (2, 0, 0, [start, end], b"")
        # the index's records are exactly what a sequential reader finds
        raw = (d / "train.rec").read_bytes()
        assert [rec.read_idx(k) for k in rec.keys] == ref_read_all(raw)


def test_face_rec_writer_recreates_ms1m_tiny_byte_for_byte(fixtures_dir, tmp_path):
    d = fixtures_dir / "ms1m_tiny"
    with FaceRecIndex.open(d) as index, FaceRecWriter(tmp_path / "out") as writer:
        for i in range(len(index)):
            writer.add(*index.read_image(i))
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "out" / name).read_bytes() == (d / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["property", "train.idx", "train.rec"]


def test_multipart_fixture_reads_expected_records(fixtures_dir):
    d = fixtures_dir / "recordio_multipart"
    expected = json.loads((d / "expected.json").read_text())
    raw = (d / "parts.rec").read_bytes()
    with IndexedRecordIO(d / "parts.idx", d / "parts.rec", "r") as rec:
        assert rec.keys == [e["idx"] for e in expected]
        # the fixture really is multi-part: key 1 starts with cflag 1, key 2 holds an empty middle part
        assert struct.unpack_from("<I", raw, rec.offset_of(1) + 4)[0] >> 29 == 1
        assert struct.unpack_from("<I", raw, 80 + 8 + 32 + 4)[0] == 2 << 29
        for e in expected:
            header, data = unpack(rec.read_idx(e["idx"]))
            assert data == bytes.fromhex(e["payload_hex"])
            if isinstance(e["label"], list):
                assert header.flag == len(e["label"]) and header.label.dtype == np.float32
                assert header.label.tolist() == e["label"]
            else:
                assert header.flag == 0 and isinstance(header.label, float) and header.label == e["label"]
            assert rec.read_at(rec.offset_of(e["idx"])) == rec.read_idx(e["idx"])


def test_writer_recreates_multipart_fixture_byte_for_byte(fixtures_dir, tmp_path):
    d = fixtures_dir / "recordio_multipart"
    expected = json.loads((d / "expected.json").read_text())
    raw = (d / "parts.rec").read_bytes()
    offsets = idx_dict(d / "parts.idx")
    items = []
    for e in expected:  # id/id2 are not in expected.json: take them from the raw header bytes
        ids = struct.unpack_from("<QQ", raw, offsets[e["idx"]] + 8 + 8)
        items.append((e["idx"], pack(IRHeader(0, e["label"], *ids), bytes.fromhex(e["payload_hex"]))))
    idx, rec = write_rec(tmp_path, items, "parts")
    assert rec.read_bytes() == raw
    assert idx.read_bytes() == (d / "parts.idx").read_bytes()


# ----------------------------------------------------------------------------- round trips
def _magic_payloads():
    base = [b"", MAGIC, MAGIC * 3, b"ab" + MAGIC, b"abcd" + MAGIC, MAGIC + b"x", b"a" + MAGIC + b"bc",
            b"abc" + MAGIC * 2 + b"d", b"abcd" + MAGIC + MAGIC[:3], bytes(range(256)) * 3]
    rng = random.Random(1234)
    for _ in range(150):
        chunks = []
        for _ in range(rng.randint(0, 6)):
            chunks.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 9))))
            chunks.append(MAGIC * rng.randint(1, 3) if rng.random() < 0.7 else MAGIC[: rng.randint(1, 3)])
        base.append(b"".join(chunks))
    return base


def test_encode_record_matches_dmlc_port():
    split = 0
    for payload in _magic_payloads():
        record = encode_record(payload)
        assert record == ref_write_record(payload)
        assert len(record) % 4 == 0 and ref_read_all(record) == [payload]
        split += struct.unpack_from("<I", record, 4)[0] >> 29 == 1
    assert split > 50  # the loop really exercised multi-part records
    assert encode_record(MAGIC) == MAGIC + struct.pack("<I", 1 << 29) + MAGIC + struct.pack("<I", 3 << 29)
    assert encode_record(b"ab" + MAGIC) == MAGIC + struct.pack("<I", 6) + b"ab" + MAGIC + b"\0\0"


def test_round_trip_random_and_magic_payloads(tmp_path):
    rng = np.random.default_rng(7)
    items = []
    for key, payload in enumerate(_magic_payloads()):
        if key % 3 == 0:
            label = rng.normal(size=rng.integers(1, 6)).astype(np.float32)
        else:
            label = float(rng.integers(0, 1000))
        items.append((key * 3 + 1, label, payload + rng.bytes(int(rng.integers(0, 7)))))
    rng.shuffle(items)  # keys out of order in the .idx: lookup goes through the sorted index
    idx, rec = write_rec(tmp_path, [(k, pack(IRHeader(0, lab, k, 7), p)) for k, lab, p in items])
    with IndexedRecordIO(idx, rec, "r") as reader:
        assert reader.keys == [k for k, _, _ in items]
        assert ref_read_all(rec.read_bytes()) == [reader.read_idx(k) for k in reader.keys]
        for key, label, payload in items:
            header, data = unpack(reader.read_idx(key))
            assert data == payload and (header.id, header.id2) == (key, 7)
            if isinstance(label, float):
                assert header.flag == 0 and header.label == label
            else:
                assert header.flag == label.size and np.array_equal(header.label, label)
        assert 2 not in reader and 1 in reader


def test_pack_semantics_follow_mxnet():
    h, data = unpack(pack(IRHeader(5, 3.0, 1, 2), b"xyz"))  # scalar label: MXNet forces flag 0
    assert h == IRHeader(0, 3.0, 1, 2) and data == b"xyz"
    payload = pack(IRHeader(0, np.array([[1, 2], [3, 4]]), 9, 0), b"d")
    assert struct.unpack_from("<IfQQ", payload) == (4, 0.0, 9, 0) and len(payload) == 24 + 16 + 1
    assert unpack(payload)[0].label.tolist() == [1, 2, 3, 4]


def test_writer_is_atomic(tmp_path):
    idx, rec = tmp_path / "a.idx", tmp_path / "a.rec"
    w = IndexedRecordIO(idx, rec, "w")
    w.write_idx(0, b"abc")
    assert not idx.exists() and not rec.exists()  # only *.tmp while writing
    w.close()
    assert rec.read_bytes() == encode_record(b"abc") and idx.read_text() == "0\t0\n"
    with pytest.raises(RuntimeError):
        with IndexedRecordIO(tmp_path / "b.idx", tmp_path / "b.rec", "w") as w2:
            w2.write_idx(0, b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]
    with pytest.raises(RecordIOError) as e, IndexedRecordIO(tmp_path / "c.idx", tmp_path / "c.rec", "w") as w3:
        w3.write_idx(4, b"x")
        w3.write_idx(2, b"y")
        w3.write_idx(4, b"z")
    assert_names(e, "c.idx", "key 4", "byte offset 24")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]


def _synthetic_jpegs(rng, sizes):
    out = []
    for label, n in enumerate(sizes):
        for _ in range(n):
            out.append((label, rng.bytes(int(rng.integers(0, 40))) + MAGIC * int(rng.integers(0, 3))))
    return out


def test_face_rec_writer_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(3)
    sizes = [1, 4, 2, 7, 3]
    images = _synthetic_jpegs(rng, sizes)
    with FaceRecWriter(tmp_path, image_size=(112, 96)) as w:
        for label, jpeg in images:
            w.add(label, jpeg)
    n, c = len(images), len(sizes)
    assert (tmp_path / "property").read_text() == f"{c},112,96\n"
    assert (tmp_path / "train.idx").read_text().splitlines()[0] == "0\t0"
    with FaceRecIndex.open(tmp_path) as index:
        assert index.num_classes == c and index.image_size == (112, 96)
        assert index.image_keys.tolist() == list(range(1, n + 1))
        assert index.labels.tolist() == [lab for lab, _ in images]
        ends = np.cumsum(sizes) + 1
        assert index.identity_ranges.tolist() == np.stack([ends - sizes, ends], 1).tolist()
        assert [index.read_image(i) for i in range(n)] == images
        head, _ = index.read_key(0)
        assert (head.flag, head.label.tolist(), head.id, head.id2) == (2, [n + 1, n + 1 + c], 0, 0)
        assert index.rec.keys == list(range(n + 1 + c))
        h, _ = index.read_key(3)
        assert (h.flag, h.label, h.id, h.id2) == (0, 1.0, 3, 0)


def test_face_rec_writer_rejects_bad_order_and_cleans_up(tmp_path):
    for labels, bad in (([1], 1), ([0, 2], 2), ([0, 1, 0], 0)):
        with pytest.raises(ValueError) as e, FaceRecWriter(tmp_path / "w") as w:
            for lab in labels:
                w.add(lab, b"jpeg")
        assert_names(e, f"label {bad}")
        assert list((tmp_path / "w").iterdir()) == []
    with pytest.raises(ValueError, match="no images"):
        FaceRecWriter(tmp_path / "w").close()
    assert list((tmp_path / "w").iterdir()) == []


def test_rec_without_header_records(tmp_path):
    labels = {5: 2.0, 3: 0.0, 10: 1.0, 0: 4.0, 8: np.array([3.0, 9.5], np.float32)}
    # id 0xced7230a puts the magic word at payload offset 8: key 8 is split before its array
    # label, so the vectorised header gather must fall back to the full reader for it.
    ids = {k: 0xCED7230A if k == 8 else k for k in labels}
    write_rec(tmp_path, [(k, pack(IRHeader(0, lab, ids[k], 0), b"img%d" % k)) for k, lab in labels.items()],
              "train")
    raw = (tmp_path / "train.rec").read_bytes()
    assert struct.unpack_from("<I", raw, idx_dict(tmp_path / "train.idx")[8] + 4)[0] == 1 << 29 | 8
    with FaceRecIndex.open(tmp_path) as index:
        assert index.image_keys.tolist() == list(labels)
        assert index.labels.tolist() == [2, 0, 1, 4, 3]
        assert index.identity_ranges is None and index.num_classes == 5 and index.image_size is None
        assert index.read_image(2) == (1, b"img10")
    (tmp_path / "property").write_text("7,112,112\n")
    with FaceRecIndex.open(tmp_path) as index:
        assert index.num_classes == 7 and index.image_size == (112, 112)
    (tmp_path / "property").write_text("4,112,112\n")
    with pytest.raises(RecordIOError) as e:
        FaceRecIndex.open(tmp_path)
    assert_names(e, tmp_path / "property", "label 4")


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def three(tmp_path):
    idx, rec = write_rec(tmp_path, [(k, bytes([65 + k]) * 100) for k in range(3)])
    return idx, rec, [0, 108, 216]


def test_truncated_file(three):
    idx, rec, offs = three
    data = rec.read_bytes()
    rec.write_bytes(data[:-50])
    with IndexedRecordIO(idx, rec, "r") as r:
        assert r.read_idx(1) == b"B" * 100
        with pytest.raises(RecordIOError) as e:
            r.read_idx(2)
    assert_names(e, rec, "key 2", f"byte offset {offs[2]}", "runs past")
    rec.write_bytes(data[:offs[2] + 5])
    with pytest.raises(RecordIOError) as e:
        IndexedRecordIO(idx, rec, "r").read_idx(2)
    assert_names(e, rec, "key 2", f"byte offset {offs[2]}", "truncated")


def test_wrong_magic_and_offset_past_end(three):
    idx, rec, offs = three
    idx.write_text(f"0\t0\n1\t{offs[1] + 4}\n2\t{offs[2]}\n")
    with pytest.raises(RecordIOError) as e:
        IndexedRecordIO(idx, rec, "r").read_idx(1)
    assert_names(e, rec, "key 1", f"byte offset {offs[1] + 4}", "magic")
    idx.write_text("0\t0\n1\t999999\n")
    with pytest.raises(RecordIOError) as e:
        IndexedRecordIO(idx, rec, "r")
    assert_names(e, rec, "key 1", "byte offset 999999", "past the end")
    with pytest.raises(RecordIOError) as e:
        IndexedRecordIO(idx, rec, "r").read_at(999999)
    assert_names(e, rec, "byte offset 999999")


def test_missing_key_and_duplicate_key(three):
    idx, rec, offs = three
    with IndexedRecordIO(idx, rec, "r") as r, pytest.raises(RecordIOError) as e:
        r.read_idx(7)
    assert_names(e, idx, "key 7", "byte offset")
    idx.write_text(f"0\t0\n2\t{offs[2]}\n0\t{offs[1]}\n")
    with pytest.raises(RecordIOError) as e:
        IndexedRecordIO(idx, rec, "r")
    assert_names(e, idx, "key 0", f"byte offset {offs[1]}", "twice")


@pytest.mark.parametrize("text, line, start", [
    ("0\t0\n1\tabc\n", 2, 4), ("0\t0\n\n1 2 3\n", 3, 5), ("0\t0\n5\t-4\n", 2, 4), ("x\n", 1, 0)])
def test_malformed_idx_line(three, text, line, start):
    idx, rec, _ = three
    idx.write_text(text)
    with pytest.raises(RecordIOError) as e:
        IndexedRecordIO(idx, rec, "r")
    assert_names(e, idx, f"line {line}", f"byte offset {start}", "key")


def test_length_runs_past_file(tmp_path):
    idx, rec = tmp_path / "r.idx", tmp_path / "r.rec"
    rec.write_bytes(encode_record(b"ok") + MAGIC + struct.pack("<I", 1000) + b"short")
    idx.write_text("0\t0\n1\t12\n")
    with IndexedRecordIO(idx, rec, "r") as r, pytest.raises(RecordIOError) as e:
        r.read_idx(1)
    assert_names(e, rec, "key 1", "byte offset 12", "1000")


def test_malformed_multipart(tmp_path):
    idx, rec = tmp_path / "m.idx", tmp_path / "m.rec"
    head = lambda cflag, n: MAGIC + struct.pack("<I", cflag << 29 | n)  # noqa: E731
    rec.write_bytes(head(2, 4) + b"abcd" + head(3, 0)            # starts with a middle part
                    + head(1, 4) + b"abcd" + head(0, 4) + b"efgh"  # first part, then a whole record
                    + head(1, 0))                                   # first part at end of file
    idx.write_text("0\t0\n1\t20\n2\t44\n")
    with IndexedRecordIO(idx, rec, "r") as r:
        for key, at, what in ((0, 0, "cflag 2"), (1, 32, "cflag 0"), (2, 52, "past the end")):
            with pytest.raises(RecordIOError) as e:
                r.read_idx(key)
            assert_names(e, rec, f"key {key}", f"byte offset {at}", what)


def test_unpack_short_payloads(tmp_path):
    with pytest.raises(RecordIOError, match="shorter than"):
        unpack(b"\0" * 10)
    with pytest.raises(RecordIOError, match="flag 3"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)
    write_rec(tmp_path, [(0, pack(IRHeader(0, 1.0, 0, 0), b"a")), (1, b"tiny")], "train")
    # An image-only rec: the damaged record's label is unknown, so it is left out and reported.
    with FaceRecIndex.open(tmp_path) as index:
        assert index.image_keys.tolist() == [0] and index.labels.tolist() == [1]
        assert [(k, o) for k, o, _ in index.damaged] == [(1, 36)]
        assert "too short" in index.damaged[0][2]


def _face_rec(tmp_path, image_labels, ranges, first_id=None, identity_id=0):
    first_id = len(image_labels) + 1 if first_id is None else first_id
    items = [(0, pack(IRHeader(0, [first_id, first_id + len(ranges)], 0, 0), b""))]
    items += [(k + 1, pack(IRHeader(0, float(lab), k + 1, 0), b"j")) for k, lab in enumerate(image_labels)]
    items += [(first_id + c, pack(IRHeader(0, list(r), identity_id, 0), b"")) for c, r in enumerate(ranges)]
    return write_rec(tmp_path, items, "train")


def test_face_rec_consistency_checks(tmp_path):
    idx, rec = _face_rec(tmp_path, [0, 0, 1, 2, 1], [(1, 3), (3, 4), (4, 6)])
    offsets = idx_dict(idx)
    with pytest.raises(RecordIOError) as e:  # last image of class 2 says 1
        FaceRecIndex.open(tmp_path)
    assert_names(e, rec, "key 5", f"byte offset {offsets[5]}", "class 2")
    _face_rec(tmp_path, [0, 0, 1, 2, 2], [(1, 3), (4, 4), (4, 6)])
    offsets = idx_dict(idx)
    with pytest.raises(RecordIOError) as e:  # class 1's range skips key 3
        FaceRecIndex.open(tmp_path)
    assert_names(e, rec, "key 7", f"byte offset {offsets[7]}", "tile")
    _face_rec(tmp_path, [0, 0, 1, 2, 2], [(1, 3), (3, 4), (4, 6)])
    (tmp_path / "property").write_text("4,112,112\n")
    with pytest.raises(RecordIOError) as e:
        FaceRecIndex.open(tmp_path)
    assert_names(e, tmp_path / "property", "4", "3 identity records")
    (tmp_path / "property").write_text("3,112\n")
    with pytest.raises(RecordIOError, match="num_classes,height,width"):
        FaceRecIndex.open(tmp_path)
    (tmp_path / "property").write_text("3,112,112\n")
    with FaceRecIndex.open(tmp_path) as index:
        assert index.labels.tolist() == [0, 0, 1, 2, 2] and index.num_classes == 3
    # id 0xced7230a splits each identity record inside its header (magic at payload offset 8):
    # the vectorised header gather must fall back to the full reader to find the ranges.
    _face_rec(tmp_path, [0, 0, 1, 2, 2], [(1, 3), (3, 4), (4, 6)], identity_id=0xCED7230A)
    with FaceRecIndex.open(tmp_path) as index:
        assert index.identity_ranges.tolist() == [[1, 3], [3, 4], [4, 6]]
        assert index.labels.tolist() == [0, 0, 1, 2, 2]


# ----------------------------------------------------------------------------- damaged records
def _small_face_rec(d, classes=3, per_class=3):
    images = [(c, f"img-{c}-{k}".encode()) for c in range(classes) for k in range(per_class)]
    with FaceRecWriter(d) as w:
        for label, data in images:
            w.add(label, data)
    return images


def _smash(rec_path, offset, what=b"\xde\xad\xbe\xef"):
    with open(rec_path, "r+b") as f:  # overwrite the record's magic word in place
        f.seek(offset)
        f.write(what)


def test_damaged_image_record_header_is_reported_not_fatal(tmp_path):
    images = _small_face_rec(tmp_path)
    offsets = idx_dict(tmp_path / "train.idx")
    _smash(tmp_path / "train.rec", offsets[4])  # key 4: the first image of class 1 (a probed one)
    with FaceRecIndex.open(tmp_path) as index:
        assert index.labels.tolist() == [c for c, _ in images] and len(index) == 9
        assert [(k, o) for k, o, _ in index.damaged] == [(4, offsets[4])]
        for i, (label, data) in enumerate(images):
            if i == 3:
                with pytest.raises(CorruptRecordError) as e:
                    index.read_image(i)
                assert (e.value.key, e.value.offset) == (4, offsets[4])
                assert_names(e, tmp_path / "train.rec", "key 4", f"byte offset {offsets[4]}", "bad magic")
                assert isinstance(e.value, RecordIOError)
            else:
                assert index.read_image(i) == (label, data)


def test_damaged_length_and_short_header_are_corrupt_records(tmp_path):
    _small_face_rec(tmp_path)
    offsets = idx_dict(tmp_path / "train.idx")
    # key 5: a record length running past the end of the file (the magic is intact)
    _smash(tmp_path / "train.rec", offsets[5] + 4, struct.pack("<I", (1 << 29) - 1))
    with FaceRecIndex.open(tmp_path) as index:
        with pytest.raises(CorruptRecordError, match="runs past the end"):
            index.read_image(4)
        assert index.read_image(5)[0] == 1


def test_damaged_header_or_identity_record_is_a_plain_error(tmp_path):
    _small_face_rec(tmp_path)
    offsets = idx_dict(tmp_path / "train.idx")
    _smash(tmp_path / "train.rec", offsets[10])  # the first identity record
    with pytest.raises(RecordIOError) as e:
        FaceRecIndex.open(tmp_path)
    assert not isinstance(e.value, CorruptRecordError)
    assert_names(e, "key 10", "identity record is damaged")
    _small_face_rec(tmp_path)
    _smash(tmp_path / "train.rec", 0)  # the header record
    with pytest.raises(RecordIOError, match="header record .key 0. is damaged"):
        FaceRecIndex.open(tmp_path)


def test_rec_without_images_is_refused(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "train.idx").write_text("")
    with pytest.raises(RecordIOError, match="has no images"):
        FaceRecIndex.open(tmp_path)
    # Only a header record pointing at an empty identity list: no images either.
    write_rec(tmp_path, [(0, pack(IRHeader(2, [1.0, 1.0], 0, 0), b""))], "train")
    with pytest.raises(RecordIOError, match="has no images"):
        FaceRecIndex.open(tmp_path)


def test_corrupt_record_error_pickles():
    e = pickle.loads(pickle.dumps(CorruptRecordError("a.rec", 3, 40, "bad magic")))
    assert (e.path, e.key, e.offset, e.reason) == ("a.rec", 3, 40, "bad magic")
    assert str(e) == "a.rec: key 3, byte offset 40: bad magic"


# ----------------------------------------------------------------------------- workers, parser
def _child_reads(reader, blob, keys, conn):
    inherited = [reader.read_idx(k) for k in keys]  # mmap inherited through fork
    unpickled = pickle.loads(blob)                   # re-maps the file lazily in this process
    conn.send((inherited, [unpickled.read_idx(k) for k in keys]))
    conn.close()


def test_reader_pickles_and_reads_in_forked_worker(fixtures_dir, tmp_path):
    d = fixtures_dir / "recordio_multipart"
    with IndexedRecordIO(d / "parts.idx", d / "parts.rec", "r") as reader:
        expected = [reader.read_idx(k) for k in reader.keys]
        clone = pickle.loads(pickle.dumps(reader))
        assert clone._mm is None and [clone.read_idx(k) for k in clone.keys] == expected
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_reads, args=(reader, pickle.dumps(reader), reader.keys, child))
        proc.start()
        got = parent.recv()
        proc.join(30)
        assert proc.exitcode == 0 and got == (expected, expected)
    writer = IndexedRecordIO(tmp_path / "w.idx", tmp_path / "w.rec", "w")
    with pytest.raises(TypeError, match="writer"):
        pickle.dumps(writer)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_parse_idx_fast_and_tolerant_paths_agree():
    rng = np.random.default_rng(0)
    keys = rng.permutation(5000).astype(np.int64) * 7
    offs = np.cumsum(rng.integers(0, 10**6, 5000)).astype(np.int64)
    strict = "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offs.tolist())).encode()
    loose = strict.replace(b"\n", b"\r\n").replace(b"\t", b" \t ") + b"\n\n"
    for text in (strict, strict[:-1], loose):
        k, o = parse_idx(text)
        assert k.dtype == o.dtype == np.int64
        assert np.array_equal(k, keys) and np.array_equal(o, offs)
    k, o = parse_idx(b"-3\t8\n")
    assert k.tolist() == [-3] and o.tolist() == [8]
    assert parse_idx(b"")[0].size == 0
