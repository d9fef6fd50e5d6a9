"""Tests for the procedural face dataset (unpg.data.synthetic): determinism, the written rec,
the verification bins, identity/nuisance statistics, reuse, atomicity, CLI and validation."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from unpg.data import synthetic as syn
from unpg.recordio import FaceRecIndex

TINY = dict(identities=4, images_per_identity=3, val_identities=5, val_pairs=10, seed=3,
            quality=90, nuisance=1.0)


def _decode_rgb(jpeg: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "JPEG did not decode"
    return bgr[:, :, ::-1]


def _jpeg_of_rgb(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _files(d) -> dict:
    return {n: (d / n).read_bytes() for n in ("train.rec", "train.idx", "property",
                                                syn.VAL_BIN, syn.HARD_BIN)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    meta = syn.generate(str(out), workers=1, progress=False, **TINY)
    return out, meta


def test_same_seed_identical_bytes_across_workers_and_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    syn.generate(str(tmp_path / "again"), workers=2, progress=False, **TINY)
    assert _files(tmp_path / "again") == _files(out)
    syn.generate(str(tmp_path / "other"), workers=1, progress=False, **dict(TINY, seed=4))
    other = _files(tmp_path / "other")
    for name in ("train.rec", syn.VAL_BIN, syn.HARD_BIN):
        assert other[name] != _files(out)[name], name


def test_rec_counts_labels_and_images(tiny):
    out, meta = tiny
    n_id, k = TINY["identities"], TINY["images_per_identity"]
    with FaceRecIndex.open(out) as idx:
        assert idx.num_classes == n_id == meta["num_classes"]
        assert len(idx) == n_id * k == meta["num_images"]
        np.testing.assert_array_equal(idx.labels, np.repeat(np.arange(n_id), k))
        np.testing.assert_array_equal(np.diff(idx.identity_ranges, axis=1).ravel(), [k] * n_id)
        for i in range(len(idx)):
            label, jpeg = idx.read_image(i)
            img = _decode_rgb(jpeg)
            assert img.shape == (112, 112, 3)
            # The stored JPEG is image i % k of identity `label`, encoded from BGR like any
            # cv2 JPEG (so decoding and flipping channels gives the RGB render back).
            ref = syn.render_image(TINY["seed"], syn.TRAIN_SPLIT, label, i % k, TINY["nuisance"])
            assert jpeg == _jpeg_of_rgb(ref, TINY["quality"]), i
            assert np.abs(img.astype(np.int16) - ref).mean() < 8.0
            assert np.abs(img[:, :, ::-1].astype(np.int16) - ref).mean() > 15.0
    assert (out / "property").read_text().strip() == f"{n_id},112,112"


@pytest.mark.parametrize("name,factor", [(syn.VAL_BIN, 1.0), (syn.HARD_BIN, syn.HARD_FACTOR)])
def test_bins_balanced_match_plan_and_identities_disjoint(tiny, name, factor):
    out, meta = tiny
    with open(out / name, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    n_pairs = TINY["val_pairs"]
    assert len(bins) == 2 * n_pairs and len(issame) == n_pairs
    assert all(isinstance(b, bytes) for b in bins) and all(type(s) is bool for s in issame)
    assert sum(issame) == n_pairs // 2
    assert meta["bins"][name]["nuisance"] == pytest.approx(TINY["nuisance"] * factor)
    plan = meta["pairs"]
    assert [p[4] for p in plan] == issame
    seed, split = TINY["seed"], meta["val_identity_ids"]["split"]
    assert split != meta["train_identities"]["split"]
    for i, (a, ka, b, kb, same) in enumerate(plan):
        assert (a == b and ka != kb) if same else a != b, plan[i]
        for j, (ident, k) in enumerate(((a, ka), (b, kb))):
            ref = syn.render_image(seed, split, ident, k, TINY["nuisance"] * factor)
            assert bins[2 * i + j] == _jpeg_of_rgb(ref, TINY["quality"]), (i, j)
    # Disjoint from training: no held-out identity used by a pair has a training identity's
    # parameters (re-derived from the identity streams the meta names).
    train = {syn.sample_identity(syn.identity_rng(seed, meta["train_identities"]["split"], i))
             for i in range(*meta["train_identities"]["ids"])}
    used = {p[0] for p in plan} | {p[2] for p in plan}
    held = {syn.sample_identity(syn.identity_rng(seed, split, i)) for i in used}
    assert len(held) == len(used) and not held & train


def test_identities_cluster_and_nuisance_varies_images():
    n_id, k = 6, 5
    imgs = np.stack([[syn.render_image(11, syn.TRAIN_SPLIT, i, j).astype(np.float64)
                      for j in range(k)] for i in range(n_id)]).reshape(n_id, k, -1)
    d = np.sqrt(((imgs[:, :, None, None] - imgs[None, None]) ** 2).sum(-1))  # [i, j, i2, j2]
    same_id = np.eye(n_id, dtype=bool)[:, None, :, None] & ~np.eye(k, dtype=bool)[None, :, None]
    other_id = ~np.eye(n_id, dtype=bool)[:, None, :, None] & np.ones((1, k, 1, k), bool)
    within, across = d[same_id].mean(), d[other_id].mean()
    assert within < 0.9 * across, (within, across)
    # Nuisance makes images of one identity differ; without it they are the same face.
    params = syn.sample_identity(syn.identity_rng(11, 0, 0))
    a, b = (syn.render_face(params, syn.image_rng(11, 0, 0, j), 1.0) for j in (0, 1))
    assert a.dtype == np.uint8 and a.shape == (112, 112, 3)
    assert np.abs(a.astype(np.int16) - b).mean() > 5.0
    c0, c1 = (syn.render_face(params, syn.image_rng(11, 0, 0, j), 0.0) for j in (0, 1))
    np.testing.assert_array_equal(c0, c1)
    # Stronger nuisance moves an image further from the clean face.
    dist = [np.abs(syn.render_face(params, syn.image_rng(11, 0, 0, 0), s).astype(np.int16)
                   - c0).mean() for s in (0.5, 1.5)]
    assert dist[0] < dist[1]
    other = syn.sample_identity(syn.identity_rng(11, 0, 1))
    assert dataclasses.astuple(other) != dataclasses.astuple(params)


def test_ensure_dataset_reuses_matching_folder_and_regenerates_otherwise(tmp_path, monkeypatch):
    calls = []
    real = syn.generate
    monkeypatch.setattr(syn, "generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    kw = dict(TINY, identities=2, images_per_identity=2, val_identities=2, val_pairs=2)
    out = tmp_path / "ds"
    first = syn.ensure_dataset(str(out), workers=1, progress=False, **kw)
    assert len(calls) == 1
    assert syn.ensure_dataset(str(out), workers=1, progress=False, **kw) == first
    assert len(calls) == 1
    changed = syn.ensure_dataset(str(out), workers=1, progress=False, **dict(kw, nuisance=0.5))
    assert len(calls) == 2 and changed["nuisance"] == 0.5
    assert json.loads((out / "meta.json").read_text())["nuisance"] == 0.5
    (out / syn.HARD_BIN).unlink()  # a missing output also forces regeneration
    syn.ensure_dataset(str(out), workers=1, progress=False, **dict(kw, nuisance=0.5))
    assert len(calls) == 3 and (out / syn.HARD_BIN).is_file()


def test_failed_generation_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    kw = dict(TINY, identities=2, images_per_identity=2, val_identities=2, val_pairs=2)
    out = tmp_path / "ds"
    syn.generate(str(out), workers=1, progress=False, **kw)
    real = syn.encode_jpeg
    count = []

    def flaky(rgb, quality):
        count.append(1)
        if len(count) > 5:  # fail while writing the verification bins
            raise RuntimeError("disk full")
        return real(rgb, quality)

    monkeypatch.setattr(syn, "encode_jpeg", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        syn.generate(str(out), workers=1, progress=False, **dict(kw, seed=9))
    assert not (out / "meta.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(syn, "encode_jpeg", real)
    meta = syn.ensure_dataset(str(out), workers=1, progress=False, **dict(kw, seed=9))
    assert meta["seed"] == 9 and (out / "meta.json").is_file()


@pytest.mark.parametrize("bad,match", [
    (dict(identities=0), "identities"),
    (dict(identities=True), "identities"),
    (dict(images_per_identity=0), "images_per_identity"),
    (dict(images_per_identity=2.5), "images_per_identity"),
    (dict(val_identities=1), "val_identities"),
    (dict(val_pairs=3), "val_pairs"),
    (dict(seed=-1), "seed"),
    (dict(quality=101), "quality"),
    (dict(nuisance=-0.1), "nuisance"),
    (dict(nuisance=float("nan")), "nuisance"),
    (dict(workers=0), "workers"),
])
def test_argument_validation(tmp_path, bad, match):
    kw = dict(TINY, **bad)
    workers = kw.pop("workers", 1)
    with pytest.raises(ValueError, match=match):
        syn.generate(str(tmp_path / "ds"), workers=workers, progress=False, **kw)
    with pytest.raises(ValueError, match=match):
        syn.ensure_dataset(str(tmp_path / "ds"), workers=workers, progress=False, **kw)
    assert not (tmp_path / "ds").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unpg.data.synthetic", *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_cli_help_and_tiny_run(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "--images-per-identity" in r.stdout and "--nuisance" in r.stdout
    out = tmp_path / "cli"
    r = _cli("--out", str(out), "--identities", "2", "--images-per-identity", "3",
             "--val-identities", "3", "--val-pairs", "4", "--seed", "5", "--quality", "80",
             "--workers", "1")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["identities"], meta["images_per_identity"], meta["val_pairs"], meta["seed"],
            meta["quality"]) == (2, 3, 4, 5, 80)
    with FaceRecIndex.open(out) as idx:
        assert idx.num_classes == 2 and len(idx) == 6
    r = _cli("--out", str(tmp_path / "bad"), "--identities", "2", "--images-per-identity", "1",
             "--val-pairs", "5")
    assert r.returncode == 2 and "val_pairs" in r.stderr
    assert not (tmp_path / "bad").exists()
