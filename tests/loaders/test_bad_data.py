"""Corrupt JPEGs inside records: skip (counted, logged once, batch filled) or stop naming file and key."""
import importlib.util
import json
import logging

import cv2
import numpy as np
import pytest
import torch
from unpg.loaders import CorruptSampleError, build_loader
from unpg.loaders.base import affine_f32, to_device_normalized
from unpg.loaders.packed import PackedBatchFiller
from unpg.loaders.packed_format import PackedFile

from unpg.config import NORMALIZE_MEAN_STD
from unpg.recordio import parse_idx
from unpg.tools.pack import pack_rec
from unpg.tools.prepare_dali import prepare_dali


def _have_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:
        return False


# DALI is a dependency on Linux x86-64, but GPU hosts without network may run these tests without it.
needs_dali = pytest.mark.skipif(not _have_dali(), reason="needs nvidia-dali-cuda120")


CLASSES, PER_CLASS = 4, 4  # 16 images, keys 1..16; (class c, image k) has index c * 4 + k
BAD = (1, 3)  # the last image of class 1: its replacement (next sample) is of class 2
BAD_INDEX = BAD[0] * PER_CLASS + BAD[1]
BAD_KEY = BAD_INDEX + 1


def truncate(data):
    return data[: len(data) // 2]


def garbage(data):
    return b"this is not an image at all" * 20


def broken_header(data):
    at = data.find(b"\xff\xc4")  # the first Huffman-table marker
    return data[:at] + b"\0\0" + data[at + 2:]


def wrong_size(data):
    ok, enc = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))
    return enc.tobytes()


def damaged_scan(data):
    # bytes inside the entropy-coded data: libjpeg only warns (cv2 returns garbage pixels);
    # the strict default decoder (simplejpeg) reports it
    b = bytearray(data)
    sos = data.find(b"\xff\xda")
    for i in range(sos + 40, len(b) - 40, 7):
        b[i] ^= 0x5A
    return bytes(b)


CASES = {"truncated": truncate, "garbage": garbage, "broken_header": broken_header,
         "wrong_size": wrong_size, "damaged_scan": damaged_scan}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, rec_factory):
    """One rec (+ packed file) per kind of damage, each with sample BAD corrupt."""
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for name, fn in CASES.items():
        rec = root / name
        written = rec_factory(rec, CLASSES, PER_CLASS, corrupt={BAD: fn})
        pack_rec(rec, root / f"{name}.unpgpack", progress=False)
        out[name] = {"rec": rec, "ffcv": root / f"{name}.unpgpack", "written": written}
    return out


def loader_for(name, data, cfg_factory, **kw):
    cfg = cfg_factory(name, rec=data["rec"], ffcv=data["ffcv"], batch=16, **kw)
    return build_loader(cfg, 0, 1, "cpu", train=False)


def decoded(jpeg):
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(np.float64)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["torch", "ffcv"])
def test_skip_replaces_counts_and_logs_once(name, case, bad_data, cfg_factory, caplog):
    data = bad_data[case]
    loader = loader_for(name, data, cfg_factory, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="unpg.loaders"):
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            (images, labels), = list(loader)
            assert images.shape == (16, 3, 112, 112)
            pos = int(np.flatnonzero(loader.plan().indices == BAD_INDEX)[0])
            # replaced by the next sample of the dataset, its label and its pixels: never zeros
            label, jpeg = data["written"][BAD_INDEX + 1]
            assert int(labels[pos]) == label == BAD[0] + 1
            pixels = images[pos].permute(1, 2, 0).double().numpy() * 127.5 + 127.5
            assert np.abs(pixels - decoded(jpeg)).max() < 1e-3
            assert loader.corrupt.count == epoch + 1
    assert loader.corrupt.keys == {BAD_KEY}
    warnings = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1  # logged once, with the file and the key
    assert f"key {BAD_KEY}" in warnings[0].getMessage()
    assert str(loader.source) in warnings[0].getMessage()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", ["torch", "ffcv"])
def test_error_names_file_and_key(name, workers, bad_data, cfg_factory):
    data = bad_data["truncated"]
    loader = loader_for(name, data, cfg_factory, on_corrupt="error", workers=workers)
    with pytest.raises(CorruptSampleError) as err:
        list(loader)  # with workers: raised in a worker process/thread, propagated here
    msg = str(err.value)
    assert f"record key {BAD_KEY}" in msg and "truncated" in msg
    assert (str(data["rec"] / "train.rec") if name == "torch" else str(data["ffcv"])) in msg


@pytest.mark.parametrize("fused", [False, True])
def test_normalising_fillers_replace_corrupt_samples_like_the_uint8_one(fused, bad_data):
    """The CPU device's float fillers (numpy, compiled) replace the corrupt sample exactly as the
    uint8 filler does, and normalise it to the same bits."""
    file = PackedFile(bad_data["truncated"]["ffcv"])
    try:
        idx, flips = np.arange(16), np.arange(16) % 2 == 1
        u8, f32 = np.empty((16, 3, 112, 112), np.uint8), np.empty((16, 3, 112, 112), np.float32)
        lab_u8, lab_f32 = np.empty(16, np.int64), np.empty(16, np.int64)
        want_skips = PackedBatchFiller(file, "simplejpeg", "skip")(idx, flips, u8, lab_u8)
        mean, std = NORMALIZE_MEAN_STD["insightface"]
        got_skips = PackedBatchFiller(file, "simplejpeg", "skip", affine_f32(mean, std),
                                      fused=fused)(idx, flips, f32, lab_f32)
    finally:
        file.close()
    assert [s.key for s in got_skips] == [s.key for s in want_skips] == [BAD_KEY]
    assert np.array_equal(lab_f32, lab_u8) and lab_f32[BAD_INDEX] == BAD[0] + 1
    want = to_device_normalized(torch.from_numpy(u8), None, mean, std, "cpu")
    assert torch.equal(torch.from_numpy(f32), want)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_packed_loader_keeps_working_after_corrupt_errors(workers, bad_data, cfg_factory):
    """A caller that catches the error and iterates again, more often than the ring has slots,
    gets the same error each time: no ring slot is lost to a failed batch."""
    data = bad_data["truncated"]
    loader = loader_for("ffcv", data, cfg_factory, on_corrupt="error", workers=workers)
    slots = loader._ring.shape[0]
    for _ in range(slots + 2):
        with pytest.raises(CorruptSampleError, match=f"record key {BAD_KEY}"):
            list(loader)
        assert loader._ring.free == slots
    loader.close()


@pytest.mark.parametrize("name", ["torch", "ffcv"])
def test_scan_damage_counts_as_corrupt_with_the_default_decoder(name, bad_data, cfg_factory):
    jpeg = bad_data["damaged_scan"]["written"][BAD_INDEX][1]
    # the case OpenCV misses: it decodes the damaged JPEG to an image without an error
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)
    loader = loader_for(name, bad_data["damaged_scan"], cfg_factory, on_corrupt="error")
    assert loader.opts.decoder == "simplejpeg"  # the default
    with pytest.raises(CorruptSampleError, match=f"record key {BAD_KEY}.*damaged JPEG data"):
        list(loader)


def test_cv2_decoder_is_lenient_on_scan_damage(bad_data, cfg_factory):
    """Documented: loader.decoder=cv2 cannot see libjpeg's warnings and uses the garbage pixels."""
    loader = loader_for("ffcv", bad_data["damaged_scan"], cfg_factory, decoder="cv2",
                        on_corrupt="error")
    (images, labels), = list(loader)
    assert loader.corrupt.count == 0 and labels.numel() == 16


def _damage_record_magic(rec_dir, key):
    keys, offsets = parse_idx((rec_dir / "train.idx").read_bytes())
    offset = int(offsets[keys.tolist().index(key)])
    with open(rec_dir / "train.rec", "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\x11\x22\x33")  # the record's magic word
    return offset


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_record_is_a_corrupt_sample(workers, tmp_path, rec_factory, cfg_factory):
    written = rec_factory(tmp_path / "rec", CLASSES, PER_CLASS)
    offset = _damage_record_magic(tmp_path / "rec", BAD_KEY)
    cfg = cfg_factory("torch", rec=tmp_path / "rec", batch=16, workers=workers, on_corrupt="skip")
    loader = build_loader(cfg, 0, 1, "cpu", train=False)
    (images, labels), = list(loader)
    pos = int(np.flatnonzero(loader.plan().indices == BAD_INDEX)[0])
    label, jpeg = written[BAD_INDEX + 1]  # replaced by the next sample, as for a bad JPEG
    assert int(labels[pos]) == label
    pixels = images[pos].permute(1, 2, 0).double().numpy() * 127.5 + 127.5
    assert np.abs(pixels - decoded(jpeg)).max() < 1e-3
    assert loader.corrupt.keys == {BAD_KEY}
    cfg.loader.on_corrupt = "error"
    with pytest.raises(CorruptSampleError, match=f"record key {BAD_KEY}.*byte offset {offset}"):
        list(build_loader(cfg, 0, 1, "cpu", train=False))


def test_too_many_consecutive_corrupt_samples_stop(tmp_path, rec_factory, cfg_factory):
    corrupt = {(c, k): garbage for c in range(2) for k in range(4)}  # all 8 images broken
    rec_factory(tmp_path / "rec", 2, 4, corrupt=corrupt)
    cfg = cfg_factory("torch", rec=tmp_path / "rec", batch=8, on_corrupt="skip")
    with pytest.raises(CorruptSampleError, match="consecutive samples"):
        list(build_loader(cfg, 0, 1, "cpu"))


@needs_dali
def test_prepare_dali_drops_corrupt_records(bad_data, tmp_path, cfg_factory, caplog):
    data = bad_data["broken_header"]
    with caplog.at_level(logging.WARNING, logger="unpg.tools.prepare_dali"):
        m = prepare_dali(data["rec"], tmp_path / "ok", progress=False)
    assert m["num_images"] == CLASSES * PER_CLASS - 1
    assert [s["key"] for s in m["skipped"]] == [BAD_KEY]
    assert any(f"key {BAD_KEY}" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=f"record key {BAD_KEY} is corrupt"):
        prepare_dali(data["rec"], tmp_path / "strict", on_corrupt="error", progress=False)
    assert not (tmp_path / "strict" / "dali_manifest.json").exists()
    cfg = cfg_factory("dali", dali=tmp_path / "ok", batch=5)
    loader = build_loader(cfg, 0, 1, "cpu")
    labels = torch.cat([y for _, y in loader])
    assert labels.numel() == 15 and len(loader) == 3


@needs_dali
def test_dali_run_time_error_names_file_and_key(bad_data, tmp_path, cfg_factory):
    data = bad_data["broken_header"]
    m = prepare_dali(data["rec"], tmp_path / "unverified", verify=False, progress=False)
    assert not m["verified"]
    cfg = cfg_factory("dali", dali=tmp_path / "unverified", batch=4, on_corrupt="error")
    with pytest.raises(CorruptSampleError) as err:
        list(build_loader(cfg, 0, 1, "cpu"))
    shard = json.loads((tmp_path / "unverified" / "dali_manifest.json").read_text())["shards"][0]
    assert f"record key {BAD_KEY}" in str(err.value)
    assert str(tmp_path / "unverified" / shard["rec"]) in str(err.value)
