"""Every tool that writes an output folder (or file) owns it: a non-empty output it did not write
is refused with one ``error:`` line and exit code 2 before any work (``--force`` replaces it), an
unwritable output fails the same way, and re-running a tool on its own output keeps working.
Real subprocesses: the exit code and stderr are what a user sees."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from unpg.fileio import MANIFEST
from unpg.models import build_backbone
from unpg.recordio import FaceRecWriter

pytestmark = pytest.mark.slow  # real CLI subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[2]
TINY_SYNTH = ["--identities", "2", "--images-per-identity", "2", "--val-identities", "2",
              "--val-pairs", "2", "--workers", "1"]


def run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def assert_refused(res, *parts):
    """Exit code 2 and exactly one stderr line, an ``error:`` naming ``parts``."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and "error:" in lines[0], res.stderr[-2000:]
    for p in parts:
        assert str(p) in lines[0], (p, lines[0])


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def mxnet_rec(fixtures_dir, tmp_path):
    """A copy of the MXNet-written rec: the "real dataset" a tool must not overwrite."""
    d = tmp_path / "real"
    shutil.copytree(fixtures_dir / "ms1m_tiny", d)
    return d


def _jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", cv2.GaussianBlur(img, (9, 9), 3))[1].tobytes()


@pytest.fixture()
def small_rec(tmp_path):
    d = tmp_path / "src"
    with FaceRecWriter(d) as w:
        for k in range(6):
            w.add(k // 2, _jpeg(k))
    return d


def test_synthetic_refuses_a_real_dataset_and_force_replaces_it(mxnet_rec, tmp_path):
    before = digest(mxnet_rec)
    res = run("unpg.data.synthetic", "--out", mxnet_rec, *TINY_SYNTH)
    assert_refused(res, mxnet_rec, "--force")
    assert digest(mxnet_rec) == before  # nothing touched
    res = run("unpg.data.synthetic", "--out", mxnet_rec, *TINY_SYNTH, "--force")
    assert res.returncode == 0, res.stderr
    assert json.loads((mxnet_rec / MANIFEST).read_text())["tool"] == "unpg.data.synthetic"
    assert not (mxnet_rec / "manifest.json").exists()  # the old dataset's files are gone
    # Its own output: regenerated (and reused with --reuse) without --force.
    assert run("unpg.data.synthetic", "--out", mxnet_rec, *TINY_SYNTH, "--seed", "3").returncode == 0
    assert json.loads((mxnet_rec / "meta.json").read_text())["seed"] == 3


def test_synthetic_unwritable_output_is_one_error_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = run("unpg.data.synthetic", "--out", blocker / "data", *TINY_SYNTH)
    assert_refused(res, blocker / "data", "not a writable folder")


def test_prepare_dali_refuses_foreign_folder(small_rec, mxnet_rec, tmp_path):
    before = digest(mxnet_rec)
    res = run("unpg.tools.prepare_dali", "--rec", small_rec, "--out", mxnet_rec)
    assert_refused(res, mxnet_rec, "--force")
    assert digest(mxnet_rec) == before
    out = tmp_path / "dali"
    assert run("unpg.tools.prepare_dali", "--rec", small_rec, "--out", out).returncode == 0
    # Re-running on its own output rewrites it, with another seed.
    res = run("unpg.tools.prepare_dali", "--rec", small_rec, "--out", out, "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "dali_manifest.json").read_text())["seed"] == 5
    res = run("unpg.tools.prepare_dali", "--rec", small_rec, "--out", mxnet_rec, "--force")
    assert res.returncode == 0, res.stderr
    assert not (mxnet_rec / "train.rec").exists()


def test_rec2image_and_image2rec_refuse_foreign_and_replace_their_own(small_rec, mxnet_rec, tmp_path):
    before = digest(mxnet_rec)
    assert_refused(run("unpg.tools.rec2image", "--rec", small_rec, "--out", mxnet_rec, "--no-progress"),
                   mxnet_rec, "--force")
    imgs = tmp_path / "imgs"
    assert run("unpg.tools.rec2image", "--rec", small_rec, "--out", imgs, "--no-progress").returncode == 0
    res = run("unpg.tools.rec2image", "--rec", small_rec, "--out", imgs, "--limit", "2", "--no-progress")
    assert res.returncode == 0, res.stderr  # its own output is replaced
    assert len(list(imgs.rglob("*.jpg"))) == 2
    assert_refused(run("unpg.tools.image2rec", "--images", imgs, "--out", mxnet_rec, "--no-progress"),
                   mxnet_rec)
    assert digest(mxnet_rec) == before
    res = run("unpg.tools.image2rec", "--images", imgs, "--out", mxnet_rec, "--no-progress", "--force")
    assert res.returncode == 0, res.stderr
    assert json.loads((mxnet_rec / MANIFEST).read_text())["tool"] == "image2rec"


def test_pack_refuses_a_file_that_is_not_a_pack(small_rec, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("not a pack")
    assert_refused(run("unpg.tools.pack", "--rec", small_rec, "--out", precious), precious, "--force")
    assert precious.read_text() == "not a pack"
    out = tmp_path / "x.unpgpack"
    assert run("unpg.tools.pack", "--rec", small_rec, "--out", out).returncode == 0
    assert run("unpg.tools.pack", "--rec", small_rec, "--out", out).returncode == 0  # its own: replaced
    assert run("unpg.tools.pack", "--rec", small_rec, "--out", precious, "--force").returncode == 0
    assert precious.read_bytes()[:8] == b"UNPGPACK"


def test_align_kface_refuses_foreign_dst_before_loading_the_detector(mxnet_rec, tmp_path):
    src = tmp_path / "kface"
    (src / "1" / "S001" / "L1" / "E01").mkdir(parents=True)
    # The detector weights do not exist: the --dst check must come first.
    res = run("unpg.tools.align_kface", "--src", src, "--dst", mxnet_rec, "--detector-weights",
              tmp_path / "missing.pth")
    assert_refused(res, mxnet_rec, "--force")
    blocker = tmp_path / "f"
    blocker.write_text("x")
    res = run("unpg.tools.align_kface", "--src", src, "--dst", blocker / "out", "--detector-weights",
              tmp_path / "missing.pth")
    assert_refused(res, blocker / "out", "not a writable folder")


def test_weights_import_refuses_existing_output_and_truncated_input(tmp_path):
    sd = build_backbone("mobilefacenet_s", embedding_size=32).state_dict()
    src = tmp_path / "backbone.pth"
    torch.save(sd, src)
    out = tmp_path / "out.pth"
    out.write_bytes(b"someone's file")
    assert_refused(run("unpg.tools.weights", "import", src, "--out", out), out, "--force")
    assert out.read_bytes() == b"someone's file"
    assert run("unpg.tools.weights", "import", src, "--out", out, "--force").returncode == 0
    cut = tmp_path / "cut.pth"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    res = run("unpg.tools.weights", "import", cut, "--out", tmp_path / "new.pth")
    assert_refused(res, cut, "truncated")
    assert not (tmp_path / "new.pth").exists()
