"""One definition of "corrupt" across the tools, and damaged record headers: ``inspect --verify``
reports (key, offset), ``inspect --repair`` writes a clean copy, ``pack`` and ``prepare_dali`` drop
or stop on exactly the same records. Real subprocesses (exit codes, stderr)."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from unpg.loaders.packed_format import PackedFile

from unpg.recordio import FaceRecIndex, FaceRecWriter, IndexedRecordIO, IRHeader, pack, parse_idx

pytestmark = pytest.mark.slow  # real CLI subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[2]
CLASSES, PER_CLASS = 3, 3
SCAN_KEY, HEADER_KEY = 2, 5  # key 2: damaged entropy data; key 5: damaged record header


def run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), (7, 7), 2)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def damaged_scan(data: bytes) -> bytes:
    """Bytes flipped inside the entropy-coded data: cv2 decodes it (garbage) with only a warning."""
    b = bytearray(data)
    sos = data.find(b"\xff\xda")
    for i in range(sos + 40, len(b) - 40, 7):
        b[i] ^= 0x5A
    return bytes(b)


@pytest.fixture()
def bad_rec(tmp_path):
    d = tmp_path / "rec"
    images = []
    with FaceRecWriter(d) as w:
        for k in range(CLASSES * PER_CLASS):
            data = _jpeg(k)
            if k + 1 == SCAN_KEY:
                data = damaged_scan(data)
            w.add(k // PER_CLASS, data)
            images.append((k // PER_CLASS, data))
    # The damaged JPEG really is the case cv2 misses: it decodes to an image.
    assert cv2.imdecode(np.frombuffer(images[SCAN_KEY - 1][1], np.uint8), cv2.IMREAD_COLOR) is not None
    keys, offsets = parse_idx((d / "train.idx").read_bytes())
    offset = int(offsets[keys.tolist().index(HEADER_KEY)])
    with open(d / "train.rec", "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\x11\x22\x33")  # the record's magic word
    return d, images, offset


def test_inspect_verify_reports_both_with_key_and_offset(bad_rec, tmp_path):
    d, _, offset = bad_rec
    js = tmp_path / "r.json"
    res = run("unpg.tools.inspect", "--rec", d, "--verify", "--no-progress", "--json", js)
    assert res.returncode == 1, res.stderr
    r = json.loads(js.read_text())
    assert r["corrupt"]["keys"] == [SCAN_KEY, HEADER_KEY]
    assert f"byte offset {offset}" in r["corrupt"]["errors"][str(HEADER_KEY)]
    assert "damaged" in r["corrupt"]["errors"][str(SCAN_KEY)]
    assert f"key {HEADER_KEY}" in res.stdout and f"byte offset {offset}" in res.stdout


def test_inspect_repair_writes_a_clean_copy(bad_rec, tmp_path):
    d, images, _ = bad_rec
    out = tmp_path / "clean"
    res = run("unpg.tools.inspect", "--rec", d, "--repair", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    good = [img for k, img in enumerate(images, 1) if k not in (SCAN_KEY, HEADER_KEY)]
    with FaceRecIndex.open(out) as index:
        assert [index.read_image(i) for i in range(len(index))] == good
        assert index.num_classes == CLASSES and index.damaged == []
        assert index.identity_ranges.tolist() == [[1, 3], [3, 5], [5, 8]]
    res = run("unpg.tools.inspect", "--rec", out, "--verify", "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    # The clean copy is its own output: repaired again without --force; a foreign folder is not.
    assert run("unpg.tools.inspect", "--rec", d, "--repair", out, "--no-progress").returncode == 0
    res = run("unpg.tools.inspect", "--rec", out, "--repair", d, "--no-progress")
    assert res.returncode == 2 and "error:" in res.stderr and "--force" in res.stderr


def test_pack_raw_and_prepare_dali_agree_with_inspect(bad_rec, tmp_path):
    d, _, offset = bad_rec
    res = run("unpg.tools.pack", "--rec", d, "--out", tmp_path / "a.unpgpack", "--raw")
    assert res.returncode == 2 and "error:" in res.stderr
    assert f"key {SCAN_KEY}" in res.stderr  # the first corrupt record in rec order stops it
    out = tmp_path / "b.unpgpack"
    res = run("unpg.tools.pack", "--rec", d, "--out", out, "--raw", "--on-corrupt", "skip")
    assert res.returncode == 0, res.stderr
    with PackedFile(out) as f:
        assert len(f) == CLASSES * PER_CLASS - 2
    res = run("unpg.tools.prepare_dali", "--rec", d, "--out", tmp_path / "dali")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "dali" / "dali_manifest.json").read_text())
    assert sorted(s["key"] for s in m["skipped"]) == [SCAN_KEY, HEADER_KEY]
    assert m["num_images"] == CLASSES * PER_CLASS - 2
    res = run("unpg.tools.prepare_dali", "--rec", d, "--out", tmp_path / "dali2", "--on-corrupt", "error")
    assert res.returncode == 2 and "corrupt" in res.stderr


def test_empty_rec_is_an_error_for_inspect(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "train.rec").write_bytes(b"")
    (d / "train.idx").write_text("")
    res = run("unpg.tools.inspect", "--rec", d, "--verify", "--no-progress")
    assert res.returncode == 2 and "has no images" in res.stderr, res.stderr
    assert "batch" not in res.stderr


@pytest.mark.parametrize("damaged_key", [0, CLASSES * PER_CLASS + 2])  # header / an identity record
def test_repair_rebuilds_a_rec_whose_layout_records_are_damaged(tmp_path, damaged_key):
    d = tmp_path / "rec"
    images = [(k // PER_CLASS, _jpeg(k)) for k in range(CLASSES * PER_CLASS)]
    with FaceRecWriter(d) as w:
        for label, data in images:
            w.add(label, data)
    keys, offsets = parse_idx((d / "train.idx").read_bytes())
    with open(d / "train.rec", "r+b") as f:
        f.seek(int(offsets[keys.tolist().index(damaged_key)]))
        f.write(b"\x00\x11\x22\x33")
    res = run("unpg.tools.inspect", "--rec", d, "--verify", "--no-progress")
    assert res.returncode == 2 and "damaged" in res.stderr  # the layout itself is unreadable
    out = tmp_path / "clean"
    res = run("unpg.tools.inspect", "--rec", d, "--repair", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    with FaceRecIndex.open(out) as index:
        assert [index.read_image(i) for i in range(len(index))] == images
        assert index.num_classes == CLASSES


def test_image_only_rec_damaged_record_is_dropped_or_stops_the_tools(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    with IndexedRecordIO(d / "train.idx", d / "train.rec", "w") as w:  # no header records
        for k in range(6):
            w.write_idx(k, pack(IRHeader(0, float(k // 2), k, 0), _jpeg(k)))
    keys, offsets = parse_idx((d / "train.idx").read_bytes())
    offset = int(offsets[3])
    with open(d / "train.rec", "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\x11\x22\x33")
    res = run("unpg.tools.pack", "--rec", d, "--out", tmp_path / "a.unpgpack")
    assert res.returncode == 2 and "key 3" in res.stderr and f"byte offset {offset}" in res.stderr
    res = run("unpg.tools.pack", "--rec", d, "--out", tmp_path / "b.unpgpack", "--on-corrupt", "skip")
    assert res.returncode == 0, res.stderr
    with PackedFile(tmp_path / "b.unpgpack") as f:
        assert len(f) == 5
    assert run("unpg.tools.prepare_dali", "--rec", d, "--out", tmp_path / "dali").returncode == 0
    m = json.loads((tmp_path / "dali" / "dali_manifest.json").read_text())
    assert [s["key"] for s in m["skipped"]] == [3] and m["num_images"] == 5
    res = run("unpg.tools.inspect", "--rec", d, "--verify", "--no-progress")
    assert res.returncode == 1 and "key 3" in res.stdout and f"byte offset {offset}" in res.stdout
