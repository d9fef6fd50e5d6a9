"""Verification .bin reading (restricted unpickler), decoding, caching and evaluate_bins."""
import os
import pickle

import cv2
import numpy as np
import pytest

import unpg.eval.bins as bins_mod
from unpg.eval.bins import (
    UnsafePickleError,
    clear_bin_cache,
    evaluate_bins,
    load_bin,
    read_bin_pickle,
)
from unpg.eval.features import extract_features
from unpg.eval.metrics import best_threshold_accuracy, kfold_accuracy


@pytest.fixture
def shared_bin(fixtures_dir):
    return fixtures_dir / "verification" / "synth_pairs.bin"


def _encode(rgb):
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def test_shared_fixture_loads(shared_bin):
    blobs, issame = read_bin_pickle(shared_bin)
    assert len(blobs) == 120 and issame.shape == (60,) and issame.dtype == bool
    vs = load_bin(shared_bin, use_cache=False)
    assert vs.images.shape == (120, 112, 112, 3) and vs.images.dtype == np.uint8
    assert vs.name == "synth_pairs"
    np.testing.assert_array_equal(vs.issame, issame)
    # RGB order: the decoded image equals cv2's BGR decode with the channels reversed.
    bgr = cv2.imdecode(np.frombuffer(blobs[7], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(vs.images[7], bgr[:, :, ::-1])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.bin"
    bad.write_bytes(pickle.dumps(([b"x", b"y"], [_Exploit(marker)]), protocol=2))
    with pytest.raises(UnsafePickleError) as err:
        read_bin_pickle(bad)
    msg = str(err.value)
    assert str(bad) in msg and "system" in msg and "malicious" in msg
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        load_bin(bad)
    assert not marker.exists()


def test_python3_protocol2_bytes_are_admitted_but_nothing_else(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    p = tmp_path / "py3.bin"
    p.write_bytes(pickle.dumps(([_encode(img), _encode(img)], [True]), protocol=2))
    assert b"_codecs" in p.read_bytes()  # Python 3 spells bytes as _codecs.encode at protocol 2
    blobs, issame = read_bin_pickle(p)
    assert blobs[0] == _encode(img) and issame.tolist() == [True]
    # The same global with another codec is refused.
    evil = pickle.dumps(([b"a", b"b"], [True]), protocol=2).replace(b"latin1", b"rot_13")
    p.write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="rot_13"):
        read_bin_pickle(p)


def test_numpy_payload_needs_a_global_and_is_refused(tmp_path):
    p = tmp_path / "np.bin"
    p.write_bytes(pickle.dumps(([b"a", b"b"], np.array([True])), protocol=2))
    with pytest.raises(UnsafePickleError, match="numpy"):
        read_bin_pickle(p)


@pytest.mark.parametrize("payload,match", [
    (([b"a", b"b", b"c"], [True]), "2 images per pair"),
    (([b"a", b"b"], [2]), "list of bools"),
    (([1, 2], [True]), "image bytes"),
    ({"a": 1}, "pair"),
])
def test_malformed_bins_are_reported(tmp_path, payload, match):
    p = tmp_path / "bad.bin"
    p.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=match):
        read_bin_pickle(p)


def test_truncated_and_missing_files(tmp_path, shared_bin):
    p = tmp_path / "cut.bin"
    p.write_bytes(shared_bin.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.bin"):
        read_bin_pickle(p)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bin(tmp_path / "nope.bin")


def test_undecodable_image_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)
    p = tmp_path / "sized.bin"
    p.write_bytes(pickle.dumps(([_encode(big), _encode(big)], [True]), protocol=2))
    vs = load_bin(p, use_cache=False)
    np.testing.assert_array_equal(vs.images[0], cv2.resize(big, (112, 112)))
    p.write_bytes(pickle.dumps(([b"not an image", _encode(big)], [True]), protocol=2))
    with pytest.raises(ValueError, match="image 0"):
        load_bin(p, use_cache=False)


@pytest.mark.parametrize("flip", ["sum", "concat", "none"])
def test_feature_flip_modes_match_manual(tiny_model, embed_manually, shared_bin, flip):
    images = load_bin(shared_bin).images[:10]
    got = extract_features(tiny_model, 10, lambda i: images[i], batch_size=4, flip=flip,
                           normalize="imagenet", device="cpu", progress=False)
    want = embed_manually(tiny_model, images, flip=flip, normalize="imagenet")
    assert got.shape == want.shape == (10, 32 if flip == "concat" else 16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_evaluate_bins_matches_manual_and_caches(tiny_model, embed_manually, shared_bin,
                                                 monkeypatch):
    clear_bin_cache()
    tiny_model.train()
    res = evaluate_bins(tiny_model, [shared_bin], batch_size=32, flip="sum",
                        normalize="insightface", device="cpu")["synth_pairs"]
    assert tiny_model.training  # mode restored
    vs = load_bin(shared_bin)
    emb = embed_manually(tiny_model, vs.images, flip="sum")
    acc, std = kfold_accuracy(emb[0::2], emb[1::2], vs.issame)
    assert res["accuracy"] == pytest.approx(acc) and res["accuracy_std"] == pytest.approx(std)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = np.sum(e[0::2] * e[1::2], axis=1)
    best_acc, _ = best_threshold_accuracy(cos, vs.issame)
    assert res["best_threshold_accuracy"] == pytest.approx(best_acc)
    assert set(res["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert res["num_pairs"] == 60

    # A second call reuses the decoded images: decoding now would fail.
    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(bins_mod, "decode_image", no_decode)
    again = evaluate_bins(tiny_model, [shared_bin], batch_size=32, flip="sum",
                          normalize="insightface", device="cpu")["synth_pairs"]
    assert again["accuracy"] == res["accuracy"]
    clear_bin_cache()
