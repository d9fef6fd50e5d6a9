"""unpg.tools.pack and the packed format: round trips, page layout, header errors, atomic writes."""
import hashlib
import json

import cv2
import numpy as np
import pytest
from unpg.loaders.packed_format import (
    FMT_JPEG,
    FMT_RAW,
    HEADER_DTYPE,
    PackedFile,
    PackedFormatError,
    PackedWriter,
)

from unpg.recordio import FaceRecIndex
from unpg.tools import pack as pack_tool
from unpg.tools.pack import pack_images, pack_rec, parse_size


@pytest.fixture(scope="module")
def tiny_pack(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "tiny.unpgpack"
    pack_rec(fixtures_dir / "ms1m_tiny", out, progress=False)
    return out


def test_rec_round_trip_keeps_every_jpeg_and_label(tiny_pack, fixtures_dir):
    manifest = json.loads((fixtures_dir / "ms1m_tiny" / "manifest.json").read_text())
    with PackedFile(tiny_pack) as f:
        assert (len(f), f.num_classes, f.image_size) == (96, 12, (112, 112))
        assert f.page_size == 1 << 20 and f.data_offset % f.page_size == 0
        for i, rec in enumerate(manifest["records"]):  # in rec order, bytes as MXNet stored them
            data = f.sample(i).tobytes()
            assert hashlib.md5(data).hexdigest() == rec["jpeg_md5"]
            assert len(data) == rec["jpeg_bytes"]
            row = f.meta[i]
            assert (int(row["label"]), int(row["key"])) == (rec["label"], rec["idx"])
            assert (int(row["height"]), int(row["width"]), int(row["fmt"])) == (112, 112, FMT_JPEG)


def test_samples_never_span_a_page(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [700, 3000, 2500, 9000, 100, 4096, 1, 5000, 4000]  # page 4096: two are larger
    with PackedWriter(tmp_path / "p.unpgpack", len(sizes), (112, 112), page_size=4096) as w:
        blobs = [rng.integers(0, 256, s, dtype=np.uint8).tobytes() for s in sizes]
        for i, b in enumerate(blobs):
            w.add(b, i % 3, key=i)
        w.close(num_classes=3)
    with PackedFile(tmp_path / "p.unpgpack") as f:
        rel = f.meta["data_ptr"].astype(np.int64) - f.data_offset
        size = f.meta["size"].astype(np.int64)
        for i, b in enumerate(blobs):
            assert f.sample(i).tobytes() == b and int(f.labels[i]) == i % 3
            first, last = rel[i] // 4096, (rel[i] + size[i] - 1) // 4096
            if size[i] <= 4096:
                assert first == last  # inside one page
            else:
                assert rel[i] % 4096 == 0  # its own run of pages...
                if i + 1 < len(blobs):
                    assert rel[i + 1] % 4096 == 0 and rel[i + 1] // 4096 > last  # ...not shared
        assert np.array_equal(f.page_of, rel // 4096)
        # packing is dense where it can be: 700 + 3000 share page 0, 2500 starts page 1
        assert list(rel[:3]) == [0, 700, 4096]


def test_raw_mode_stores_decoded_pixels(fixtures_dir, tmp_path):
    out = tmp_path / "raw.unpgpack"
    pack_rec(fixtures_dir / "ms1m_tiny", out, raw=True, progress=False)
    with PackedFile(out) as f, FaceRecIndex.open(fixtures_dir / "ms1m_tiny") as index:
        for i in (0, 47, 95):
            _, jpeg = index.read_image(i)
            want = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            assert int(f.meta["fmt"][i]) == FMT_RAW
            assert np.array_equal(f.sample(i).reshape(3, 112, 112).transpose(1, 2, 0), want)


def test_image_folder_mode(tmp_path):
    root = tmp_path / "faces"
    rng = np.random.default_rng(1)
    files = {}
    for person in ("bob", "alice"):
        (root / person).mkdir(parents=True)
        for k, ext in enumerate((".jpg", ".png")):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            ok, enc = cv2.imencode(ext, img)
            path = root / person / f"{k}{ext}"
            path.write_bytes(enc.tobytes())
            files[(person, ext)] = (enc.tobytes(), img)
    (root / "alice" / "notes.txt").write_text("ignored")
    summary = pack_images(root, tmp_path / "f.unpgpack", progress=False)
    assert summary["classes"] == ["alice", "bob"] and summary["samples"] == 4
    with PackedFile(tmp_path / "f.unpgpack") as f:
        order = [("alice", ".jpg"), ("alice", ".png"), ("bob", ".jpg"), ("bob", ".png")]
        for i, (person, ext) in enumerate(order):
            data, bgr = files[(person, ext)]
            assert int(f.labels[i]) == (0 if person == "alice" else 1)
            if ext == ".jpg":  # JPEG bytes kept as they are
                assert int(f.meta["fmt"][i]) == FMT_JPEG and f.sample(i).tobytes() == data
            else:  # lossless source: raw RGB pixels
                assert int(f.meta["fmt"][i]) == FMT_RAW
                rgb = f.sample(i).reshape(3, 112, 112).transpose(1, 2, 0)  # stored planar
                assert np.array_equal(rgb, bgr[..., ::-1])
    # a crop of the wrong size is an error naming the file; nothing is left behind
    ok, enc = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))
    (root / "bob" / "small.png").write_bytes(enc.tobytes())
    with pytest.raises(ValueError, match=r"small\.png: 64x64 image"):
        pack_images(root, tmp_path / "g.unpgpack", progress=False)
    assert not list(tmp_path.glob("g.unpgpack*"))
    skipped = pack_images(root, tmp_path / "h.unpgpack", on_corrupt="skip", progress=False)
    assert skipped["samples"] == 4 and skipped["dropped"] == [str(root / "bob" / "small.png")]


def _rewrite_header(src, dst, **fields):
    data = bytearray(src.read_bytes())
    header = np.frombuffer(bytes(data[:HEADER_DTYPE.itemsize]), HEADER_DTYPE).copy()
    for k, v in fields.items():
        header[k] = v
    data[:HEADER_DTYPE.itemsize] = header.tobytes()
    dst.write_bytes(bytes(data))
    return dst


def test_header_errors_name_the_file(tiny_pack, tmp_path):
    bad = _rewrite_header(tiny_pack, tmp_path / "magic.unpgpack", magic=b"FFCVFILE")
    with pytest.raises(PackedFormatError, match=f"{bad}: not a UNPG packed file"):
        PackedFile(bad)
    bad = _rewrite_header(tiny_pack, tmp_path / "version.unpgpack", version=9)
    with pytest.raises(PackedFormatError, match=f"{bad}: packed format version 9"):
        PackedFile(bad)
    data = tiny_pack.read_bytes()
    cut = tmp_path / "cut.unpgpack"
    cut.write_bytes(data[:-1000])
    with pytest.raises(PackedFormatError, match=f"{cut}: truncated"):
        PackedFile(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(PackedFormatError, match=f"{cut}: truncated: 100 bytes"):
        PackedFile(cut)
    meta = bytearray(data)
    meta[512 + 9] ^= 0xFF  # a byte of the first metadata row
    (tmp_path / "meta.unpgpack").write_bytes(bytes(meta))
    with pytest.raises(PackedFormatError, match="checksum"):
        PackedFile(tmp_path / "meta.unpgpack")


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "x.unpgpack"
    with pytest.raises(RuntimeError):
        with PackedWriter(out, 2, (112, 112)) as w:
            w.add(b"abc", 0)
            raise RuntimeError("interrupted")
    assert not list(tmp_path.iterdir())
    w = PackedWriter(out, 2, (112, 112))
    w.add(b"abc", 3)
    with pytest.raises(ValueError, match="outside"):
        w.close(num_classes=2)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="power of two"):
        PackedWriter(out, 2, (112, 112), page_size=5000)


def test_cli(fixtures_dir, tmp_path, capsys):
    assert parse_size("1M") == 1 << 20 and parse_size("8MiB") == 8 << 20
    assert parse_size("65536") == 65536
    out = tmp_path / "cli.unpgpack"
    summary = pack_tool.main(["--rec", str(fixtures_dir / "ms1m_tiny"), "--out", str(out),
                              "--page-size", "8M"])
    assert summary["samples"] == 96 and PackedFile(out).page_size == 8 << 20
    with pytest.raises(SystemExit) as e:
        pack_tool.main(["--help"])
    assert e.value.code == 0 and "--images" in capsys.readouterr().out
