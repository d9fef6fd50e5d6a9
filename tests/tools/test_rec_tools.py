"""rec2image / image2rec / inspect against the MXNet-written fixture and hand-made folders."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from unpg.recordio import FaceRecIndex, FaceRecWriter
from unpg.tools import image2rec as i2r
from unpg.tools import inspect as insp
from unpg.tools import rec2image as r2i

REPO = Path(__file__).resolve().parents[2]


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _manifest(fixtures_dir):
    return json.loads((fixtures_dir / "ms1m_tiny" / "manifest.json").read_text())


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _face(seed: int, h: int = 112, w: int = 112) -> np.ndarray:
    # Smooth content (a gradient plus a blob) so JPEG/resizing errors stay small and comparable.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    img = base + 0.4 * xx[..., None] - 0.3 * yy[..., None]
    img += 50 * np.exp(-(((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.1 * h * w)))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(out.name + ".tmp-*"))


# ---------------------------------------------------------------------------------------------
# rec2image


def test_rec2image_writes_stored_bytes(fixtures_dir, tmp_path):
    man = _manifest(fixtures_dir)
    out = tmp_path / "imgs"
    assert r2i.main(["--rec", str(fixtures_dir / "ms1m_tiny"), "--out", str(out), "--no-progress"]) == 0
    by_key = {r["idx"]: r for r in man["records"]}
    lines = (out / "train.lst").read_text().splitlines()
    assert len(lines) == man["num_images"] == 96
    for line in lines:
        key, label, rel = line.split("\t")
        rec = by_key[int(key)]
        data = (out / rel).read_bytes()
        assert _md5(data) == rec["jpeg_md5"] and len(data) == rec["jpeg_bytes"]
        assert int(label) == rec["label"] and rel.split("/")[0] == f"{rec['label']:02d}"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"{c:02d}" for c in range(12)]
    assert sorted(p.name for p in (out / "03").iterdir()) == [f"{n}.jpg" for n in range(8)]


def test_rec2image_limit_and_insightface_naming(fixtures_dir, tmp_path):
    man = _manifest(fixtures_dir)
    out = tmp_path / "seed_names"
    s = r2i.rec_to_images(fixtures_dir / "ms1m_tiny", out, limit=20, naming="insightface", progress=False)
    assert (s.images, s.classes) == (20, 3)
    first_identity_key = man["num_images"] + 1  # identity records follow the 96 images
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        f"0_{first_identity_key + c}" for c in range(3)]
    assert sorted(p.name for p in (out / f"0_{first_identity_key + 2}").iterdir()) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    # The 20th image (key 20, class 2, its 4th image) is written as stored.
    assert _md5((out / f"0_{first_identity_key + 2}" / "3.jpg").read_bytes()) == man["records"][19]["jpeg_md5"]


def test_rec2image_error_midway_leaves_nothing(fixtures_dir, tmp_path, monkeypatch):
    real = FaceRecIndex.read_image

    def flaky(self, i):
        if i == 40:
            raise OSError("disk went away")
        return real(self, i)

    monkeypatch.setattr(FaceRecIndex, "read_image", flaky)
    out = tmp_path / "imgs"
    with pytest.raises(OSError, match="disk went away"):
        r2i.rec_to_images(fixtures_dir / "ms1m_tiny", out, progress=False)
    assert _no_leftovers(out)
    # An existing non-empty output is refused and left alone.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=str(out)):
        r2i.rec_to_images(fixtures_dir / "ms1m_tiny", out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------------------------
# image2rec


@pytest.fixture()
def face_folder(tmp_path):
    """Identity folders with same-size JPEGs, other sizes, PNG, grey JPEG, junk; returns
    (root, {relative path: original image or bytes})."""
    root = tmp_path / "faces"
    made = {}

    def put(rel, data):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        made[rel] = data

    put("bob/a.jpg", _jpeg(_face(1)))
    put("bob/b.jpg", _jpeg(_face(2), quality=70))
    put("bob/big.jpg", _jpeg(_face(3, 150, 130)))       # re-encoded (shrunk)
    put("alice/1.png", cv2.imencode(".png", _face(4))[1].tobytes())  # re-encoded (PNG)
    put("alice/2.jpg", _jpeg(cv2.cvtColor(_face(5), cv2.COLOR_BGR2GRAY)))  # 1-component: copied
    put("alice/small.jpg", _jpeg(_face(6, 80, 90)))      # re-encoded (enlarged)
    put("alice/sub/x.jpg", _jpeg(_face(7)))              # nested: still alice
    put("alice/notes.txt", b"not an image")              # ignored (not an image extension)
    put("carol/broken.jpg", b"\xff\xd8\xff\xe0garbage")  # unreadable -> skipped; carol dropped
    put("dave/z.jpg", _jpeg(_face(8)))
    put("README.jpg", _jpeg(_face(9)))                   # top-level file: not a class
    return root, made


def test_image2rec_from_folder(face_folder, tmp_path):
    root, made = face_folder
    out = tmp_path / "rec"
    s = i2r.images_to_rec(*i2r.collect_folder(root), out, size=112, quality=95, progress=False)
    assert (s.images, s.classes, s.copied, s.reencoded) == (8, 3, 5, 3)
    assert [Path(p).name for p, _ in s.skipped] == ["broken.jpg"] and s.empty_classes == ["carol"]
    assert (out / "classes.txt").read_text() == "0\talice\n1\tbob\n2\tdave\n"
    # Sorted folder names -> labels; sorted relative paths within a class.
    expect = ["alice/1.png", "alice/2.jpg", "alice/small.jpg", "alice/sub/x.jpg",
              "bob/a.jpg", "bob/b.jpg", "bob/big.jpg", "dave/z.jpg"]
    with FaceRecIndex.open(out) as index:
        assert (len(index), index.num_classes, index.image_size) == (8, 3, (112, 112))
        assert index.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
        for i, rel in enumerate(expect):
            _, data = index.read_image(i)
            src = made[rel]
            info = i2r.jpeg_info(src)
            if info is not None and info[:2] == (112, 112):
                assert data == src, rel  # copied byte for byte
                continue
            assert i2r.jpeg_info(data) == (112, 112, 3), rel
            got = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            orig = cv2.imdecode(np.frombuffer(src, np.uint8), cv2.IMREAD_COLOR)
            interp = cv2.INTER_AREA if min(orig.shape[:2]) >= 112 else cv2.INTER_CUBIC
            ref = cv2.resize(orig, (112, 112), interpolation=interp)
            assert np.abs(got.astype(int) - ref.astype(int)).mean() < 2.0, rel  # quality-95 JPEG of it


def test_image2rec_strict_fails_and_leaves_nothing(face_folder, tmp_path):
    root, _ = face_folder
    out = tmp_path / "rec"
    rc = i2r.main(["--images", str(root), "--out", str(out), "--strict", "--no-progress"])
    assert rc == 2 and _no_leftovers(out)
    with pytest.raises(ValueError, match="broken.jpg"):
        i2r.images_to_rec(*i2r.collect_folder(root), out, strict=True, progress=False)
    assert _no_leftovers(out)


@pytest.mark.parametrize("style", ["path_label", "lst"])
def test_image2rec_from_list(tmp_path, style):
    imgs = {name: _jpeg(_face(k)) for k, name in enumerate(["p q.jpg", "r.jpg", "s.jpg", "t.jpg"])}
    (tmp_path / "src").mkdir()
    for name, data in imgs.items():
        (tmp_path / "src" / name).write_bytes(data)
    rows = [("p q.jpg", 10), ("r.jpg", 3), ("s.jpg", 10), ("t.jpg", 3)]
    if style == "lst":
        text = "".join(f"{i}\t{lab:.6f}\tsrc/{n}\n" for i, (n, lab) in enumerate(rows))
    else:
        text = "".join(f"src/{n} {lab}\n" for n, lab in rows)
    (tmp_path / "train.lst").write_text(text)
    out = tmp_path / "rec"
    assert i2r.main(["--list", str(tmp_path / "train.lst"), "--out", str(out), "--no-progress"]) == 0
    assert (out / "classes.txt").read_text() == "0\t3\n1\t10\n"
    with FaceRecIndex.open(out) as index:
        assert index.labels.tolist() == [0, 0, 1, 1]
        got = [index.read_image(i)[1] for i in range(4)]
    assert got == [imgs["r.jpg"], imgs["t.jpg"], imgs["p q.jpg"], imgs["s.jpg"]]  # list order per label


def test_image2rec_bad_list_names_line(tmp_path):
    (tmp_path / "l.txt").write_text("a.jpg 0\nb.jpg one\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: label 'one'"):
        i2r.read_list(tmp_path / "l.txt")


def test_round_trip_reproduces_the_mxnet_rec(fixtures_dir, tmp_path):
    src = fixtures_dir / "ms1m_tiny"
    r2i.rec_to_images(src, tmp_path / "imgs", progress=False)
    s = i2r.images_to_rec(*i2r.collect_folder(tmp_path / "imgs"), tmp_path / "rec", progress=False)
    assert (s.copied, s.reencoded) == (96, 0)
    # Same bytes as MXNet wrote: payloads, header and identity records, offsets.
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "rec" / name).read_bytes() == (src / name).read_bytes(), name


def test_jpeg_info_reads_headers():
    gray = _jpeg(np.zeros((30, 50), np.uint8))
    assert i2r.jpeg_info(gray) == (30, 50, 1)
    ok, prog = cv2.imencode(".jpg", _face(0, 64, 48), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert i2r.jpeg_info(prog.tobytes()) == (64, 48, 3)
    assert i2r.jpeg_info(gray[:20]) is None and i2r.jpeg_info(b"\x89PNG\r\n\x1a\n") is None


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_fixture(fixtures_dir, tmp_path):
    js = tmp_path / "r.json"
    assert insp.main(["--rec", str(fixtures_dir / "ms1m_tiny"), "--verify", "--json", str(js),
                      "--no-progress"]) == 0
    r = json.loads(js.read_text())
    assert (r["images"], r["classes"], r["layout"]) == (96, 12, "header + identity records")
    cs = r["class_sizes"]
    assert (cs["min"], cs["median"], cs["max"]) == (8, 8.0, 8) and cs["buckets"]["5-9"] == 12
    assert sum(cs["buckets"].values()) == 12
    assert r["image_sizes"]["sizes"] == {"112x112": 96} and r["image_sizes"]["all"]
    assert r["image_sizes"]["differing_from_property"] == 0
    assert r["corrupt"]["count"] == 0
    sampled = insp.inspect_rec(fixtures_dir / "ms1m_tiny", sample=10, progress=False)
    assert sampled["image_sizes"]["checked"] == 10 and not sampled["image_sizes"]["all"]


def test_inspect_verify_lists_corrupt_keys(tmp_path, capsys):
    good = [_jpeg(_face(k)) for k in range(6)]
    truncated = good[0][: len(good[0]) // 2]
    bad_body = good[1][:200] + bytes(range(256)) * 4 + b"\xff\xd9"  # header fine, scan garbage
    out = tmp_path / "rec"
    payloads = [(0, good[0]), (0, good[1]), (0, truncated), (1, good[2]), (1, b"hello world"),
                (1, good[3]), (2, bad_body), (2, good[4]), (2, _jpeg(_face(9, 100, 100)))]
    with FaceRecWriter(out, (112, 112)) as w:
        for label, data in payloads:
            w.add(label, data)
    r = insp.inspect_rec(out, verify=True, progress=False)
    # Keys are 1-based image positions; truncated = key 3, non-image = key 5, garbage scan = key 7.
    assert r["corrupt"]["keys"] == [3, 5, 7], r["corrupt"]
    assert "truncated" in r["corrupt"]["errors"]["3"] and "not a JPEG" in r["corrupt"]["errors"]["5"]
    assert r["image_sizes"]["sizes"] == {"112x112": 7, "100x100": 1}
    assert r["image_sizes"]["differing_from_property"] == 1
    assert insp.main(["--rec", str(out), "--verify", "--no-progress"]) == 1
    table = capsys.readouterr().out
    assert "key 3" in table and "key 5" in table and "key 7" in table
    # Headers only: the non-image is caught, the truncated and garbage-scan JPEGs are not.
    assert insp.inspect_rec(out, progress=False)["corrupt"]["keys"] == [5]


# ---------------------------------------------------------------------------------------------
# CLIs


@pytest.mark.slow
def test_clis_help():
    code = ("import runpy, sys\n"
            "for m in ['rec2image', 'image2rec', 'inspect', 'weights']:\n"
            "    sys.argv = [m, '--help']\n"
            "    try:\n"
            "        runpy.run_module('unpg.tools.' + m, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, (m, e.code)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for prog in ("unpg.tools.rec2image", "unpg.tools.image2rec", "unpg.tools.inspect",
                 "unpg.tools.weights"):
        assert f"usage: python -m {prog}" in res.stdout
    # The real `-m` entry point, once (the module named inspect must not shadow the stdlib's).
    res = subprocess.run([sys.executable, "-m", "unpg.tools.inspect", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0 and "--verify" in res.stdout, res.stderr
