"""Tests for unpg.tools.align_kface on a small synthetic K-FACE-shaped tree of real faces."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from unpg.data.align import align_face
from unpg.data.detect import RetinaFaceDetector
from unpg.tools import align_kface
from unpg.tools.align_kface import align_kface_tree, iter_kface_groups, main

IDS = ("19062421", "19062422")
ACCESSORIES = ("S001", "S002")
LIGHTS = ("L1", "L2")
POSES = ("C1", "C2")
SHIFT_S002 = 14  # px: the S002 photos have the face further right than the anchor


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # These images are small: with several test processes sharing 2 cores, OpenMP barriers
    # of a multi-threaded forward cost up to seconds per call, one thread takes ~40 ms.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CountingDetector:
    """Wraps a detector and records every image it is asked about."""

    def __init__(self, inner):
        self.inner = inner
        self.shapes = []

    def detect(self, image):
        self.shapes.append(image.shape)
        return self.inner.detect(image)


@pytest.fixture(scope="module")
def detector(models_dir):
    return RetinaFaceDetector(models_dir / "retinaface_mobilenet0.25.pth", conf_threshold=0.9)


def _photo(face, pose, accessory, light):
    canvas = np.full((300, 320, 3), 128, np.uint8)
    x0, y0 = (10, 20) if pose == "C1" else (40, 30)
    x0 += SHIFT_S002 if accessory == "S002" else 0
    canvas[y0:y0 + 250, x0:x0 + 250] = face
    if light == "L2":
        canvas = (canvas * 0.6).astype(np.uint8)
    return canvas


def _make_tree(root: Path, faces):
    """2 IDs x 2 accessories x 2 lights x 1 expression x 2 poses; ID 2, pose C2 has no face."""
    for identity, face in zip(IDS, faces):
        for acc in ACCESSORIES:
            for light in LIGHTS:
                folder = root / identity / acc / light / "E01"
                folder.mkdir(parents=True)
                (folder / f"{identity}_{acc}_{light}_E01.txt").write_text("bbox 0 0 1 1\n")
                for pose in POSES:
                    if identity == IDS[1] and pose == "C2":
                        image = np.full((300, 320, 3), 90, np.uint8)  # nothing to detect
                    else:
                        image = _photo(face, pose, acc, light)
                    assert cv2.imwrite(str(folder / f"{pose}.jpg"), image)


@pytest.fixture
def kface_tree(tmp_path, fixtures_dir):
    faces = [cv2.imread(str(fixtures_dir / "real_faces" / n)) for n in ("Rob_Lowe_0001.jpg",
                                                                        "Nathalie_Baye_0002.jpg")]
    src = tmp_path / "kface"
    _make_tree(src, faces)
    return src


def _rel(identity, acc, light, pose):
    return f"{identity}/{acc}/{light}/E01/{pose}.jpg"


def test_iter_kface_groups_walks_natural_order(tmp_path):
    for rel in ["7/S001/L1/E01/C1.jpg", "7/S001/L10/E01/C1.jpg", "7/S001/L2/E01/C10.jpg",
                "7/S002/L1/E03/C2.jpg", "7/S001/L1/E01/C2.jpg", "7/S001/L1/E01/info.txt",
                "7/S001/L1/E01/.C1.jpg.x1.tmp", "7/notes/L1/E01/C1.jpg", "12/S001/L1/E01/C1.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    groups = iter_kface_groups(tmp_path)
    assert [(g.identity, g.pose, g.members) for g in groups] == [
        ("7", "C1", ["7/S001/L1/E01/C1.jpg", "7/S001/L10/E01/C1.jpg"]),
        ("7", "C2", ["7/S001/L1/E01/C2.jpg", "7/S002/L1/E03/C2.jpg"]),
        ("7", "C10", ["7/S001/L2/E01/C10.jpg"]),
        ("12", "C1", ["12/S001/L1/E01/C1.jpg"]),
    ]
    assert groups[0].anchor == "7/S001/L1/E01/C1.jpg"
    assert groups[2].anchor == "7/S001/L1/E01/C10.jpg"  # absent: this group will fail
    with pytest.raises(ValueError, match="not a directory"):
        iter_kface_groups(tmp_path / "missing")


def test_align_tree_detects_once_per_group_and_resumes(kface_tree, tmp_path, detector):
    dst = tmp_path / "aligned"
    counting = CountingDetector(detector)
    summary = align_kface_tree(kface_tree, dst, counting, progress=False, workers=2)

    # One detection per (ID, pose), on the anchor image; 3 groups x 4 images aligned.
    assert len(counting.shapes) == 4 and summary.detections == 4
    good = [_rel(i, a, light, p) for i in IDS for a in ACCESSORIES for light in LIGHTS
            for p in POSES if not (i == IDS[1] and p == "C2")]
    assert summary.aligned == len(good) == 12 and summary.skipped_existing == 0
    assert summary.no_face_groups == 1 and len(summary.failed) == 1
    for rel in good:
        out = cv2.imread(str(dst / rel))
        assert out is not None and out.shape == (112, 112, 3), rel
    failed_anchor = _rel(IDS[1], "S001", "L1", "C2")
    assert not any((dst / IDS[1]).glob("*/*/E01/C2.jpg"))
    lines = (dst / "failed.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(failed_anchor + "\t") and "no face" in lines[0]
    assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]

    # Every member used the anchor's landmarks: S002 (face shifted) is warped with them,
    # not with landmarks of its own.
    anchor = cv2.imread(str(kface_tree / _rel(IDS[0], "S001", "L1", "C1")))
    member = cv2.imread(str(kface_tree / _rel(IDS[0], "S002", "L1", "C1")))
    lmk_anchor = detector.detect(anchor)[1][0]
    lmk_own = detector.detect(member)[1][0]
    np.testing.assert_allclose(lmk_own[:, 0] - lmk_anchor[:, 0], SHIFT_S002, atol=2)
    written = cv2.imread(str(dst / _rel(IDS[0], "S002", "L1", "C1"))).astype(float)
    with_anchor = align_face(member, lmk_anchor, template="seed").astype(float)
    with_own = align_face(member, lmk_own, template="seed").astype(float)
    assert np.abs(written - with_anchor).mean() < 3  # JPEG round trip only
    assert np.abs(written - with_own).mean() > 3 * np.abs(written - with_anchor).mean()
    # Each member's own pixels are warped: the dim light stays dim.
    dim = cv2.imread(str(dst / _rel(IDS[0], "S001", "L2", "C1"))).astype(float)
    bright = cv2.imread(str(dst / _rel(IDS[0], "S001", "L1", "C1"))).astype(float)
    assert abs(dim.mean() / bright.mean() - 0.6) < 0.05

    # A rerun skips finished groups entirely and retries only the failed one.
    mtimes = {rel: (dst / rel).stat().st_mtime_ns for rel in good}
    again = CountingDetector(detector)
    summary2 = align_kface_tree(kface_tree, dst, again, progress=False)
    assert summary2.aligned == 0 and summary2.skipped_existing == 12
    assert len(again.shapes) == 1 and len(summary2.failed) == 1
    assert {rel: (dst / rel).stat().st_mtime_ns for rel in good} == mtimes

    # A missing output is redone, with one detection for its group.
    (dst / good[5]).unlink()
    third = CountingDetector(detector)
    summary3 = align_kface_tree(kface_tree, dst, third, progress=False)
    assert summary3.aligned == 1 and summary3.skipped_existing == 11 and len(third.shapes) == 2
    assert cv2.imread(str(dst / good[5])).shape == (112, 112, 3)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(align_kface.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        align_kface._atomic_write_bytes(tmp_path / "C1.jpg", b"jpeg bytes")
    assert list(tmp_path.iterdir()) == []


def test_cli(kface_tree, tmp_path, models_dir, capsys):
    dst = tmp_path / "cli_out"
    rc = main(["--src", str(kface_tree), "--dst", str(dst), "--template", "arcface",
               "--detector-weights", str(models_dir / "retinaface_mobilenet0.25.pth"),
               "--workers", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "aligned 12 images" in out and "no face found in 1 (ID, pose) groups" in out
    assert "failed.txt" in out
    assert cv2.imread(str(dst / _rel(IDS[0], "S002", "L2", "C2"))).shape == (112, 112, 3)

    rc = main(["--src", str(kface_tree), "--dst", str(dst),
               "--detector-weights", str(tmp_path / "missing.pth")])
    assert rc == 2 and "--detector-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(ValueError, match="--template"):
        align_kface_tree(kface_tree, dst, None, template="mtcnn")
    with pytest.raises(ValueError, match="no K-FACE images"):
        (tmp_path / "empty").mkdir()
        align_kface_tree(tmp_path / "empty", dst, None)
