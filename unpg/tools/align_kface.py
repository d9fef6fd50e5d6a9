"""Detect and align K-FACE into 112x112 crops, keeping the dataset's relative paths.

K-FACE is laid out as ID/Sxxx/Ly/Ezz/Cp.jpg (400 IDs, accessories S001-S006, lux L1-L30,
expressions E01-E03, poses C1-C20). As the official code's align_kfaces.py does, landmarks are
detected once per (ID, pose) on S001/L1/E01/Cp.jpg, where the face is plain and well lit,
and the same warp is applied to every accessory, light and expression of that ID and pose
(the official code assumes the head keeps its place across them). The highest-scoring face is used.

    python -m unpg.tools.align_kface --src K-FACE/High --dst kface_112 \
        --detector-weights retinaface_mobilenet0.25.pth [--device cuda] [--template seed]

Resumable: existing outputs are kept, each output is written under a temporary name and
renamed. Groups whose anchor image has no face are listed in DST/failed.txt. DST must be new,
empty, or an earlier align_kface output (its ``unpg_manifest.json`` says so, which is how a run
resumes); ``--force`` clears any other non-empty DST first. DST is checked before any work.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from unpg.data.align import TEMPLATES, align_face
from unpg.data.detect import RetinaFaceDetector
from unpg.fileio import atomic_write_bytes as _atomic_write_bytes  # old name; tests use it
from unpg.fileio import claim_output_dir

__all__ = ["AlignSummary", "KFaceGroup", "align_kface_tree", "iter_kface_groups", "main"]

ANCHOR_PARTS = ("S001", "L1", "E01")  # the plain, well-lit, neutral image of each pose
_ACCESSORY = re.compile(r"^S\d{3}$")
_LUX = re.compile(r"^L\d+$")
_EXPRESSION = re.compile(r"^E\d{2}$")
_POSE_FILE = re.compile(r"^(C\d+)\.jpg$", re.IGNORECASE)


def _natural_key(name: str) -> Tuple:
    # L2 before L10, C3 before C12.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _subdirs(path: Path, pattern: re.Pattern) -> List[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and pattern.match(p.name)),
                  key=lambda p: _natural_key(p.name))


@dataclass
class KFaceGroup:
    """All images of one (ID, pose); `members` are paths relative to the K-FACE root."""

    identity: str
    pose: str
    members: List[str]

    @property
    def anchor(self) -> str:
        return "/".join((self.identity, *ANCHOR_PARTS, f"{self.pose}.jpg"))


def iter_kface_groups(src: os.PathLike) -> List[KFaceGroup]:
    """Enumerate the (ID, pose) groups present under `src`, in natural order.

    Only K-FACE-shaped paths count (Sddd/Ld+/Edd/Cd+.jpg); the annotation .txt files and any
    other entries are ignored. An ID folder is any directory at the top level.
    """
    root = Path(src)
    if not root.is_dir():
        raise ValueError(f"--src {root} is not a directory")
    groups: List[KFaceGroup] = []
    for id_dir in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
        by_pose: dict = {}
        for acc in _subdirs(id_dir, _ACCESSORY):
            for lux in _subdirs(acc, _LUX):
                for expr in _subdirs(lux, _EXPRESSION):
                    for f in expr.iterdir():
                        m = _POSE_FILE.match(f.name)
                        if m and f.is_file():
                            by_pose.setdefault(m.group(1), []).append(f.relative_to(root).as_posix())
        for pose in sorted(by_pose, key=_natural_key):
            groups.append(KFaceGroup(id_dir.name, pose, sorted(by_pose[pose], key=_natural_key)))
    return groups


@dataclass
class AlignSummary:
    aligned: int = 0
    skipped_existing: int = 0
    detections: int = 0
    no_face_groups: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def text(self) -> str:
        return (f"aligned {self.aligned} images, skipped {self.skipped_existing} existing, "
                f"{self.detections} detector runs, no face found in {self.no_face_groups} "
                f"(ID, pose) groups, {len(self.failed)} failures in total")


def _align_one(src_path: Path, dst_path: Path, landmarks_52: np.ndarray, template: str,
               image_size: int, image: Optional[np.ndarray] = None) -> Optional[str]:
    """Align one image and write it; returns an error string instead of raising."""
    if image is None:
        image = cv2.imread(str(src_path), cv2.IMREAD_COLOR)
        if image is None:
            return "unreadable image"
    crop = align_face(image, landmarks_52, template=template, image_size=image_size)
    ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        return "JPEG encoding failed"
    _atomic_write_bytes(dst_path, buf.tobytes())  # creates the folder
    return None


def align_kface_tree(
    src: os.PathLike,
    dst: os.PathLike,
    detector,
    *,
    template: str = "seed",
    image_size: int = 112,
    workers: int = 4,
    progress: bool = True,
    groups: Optional[Sequence[KFaceGroup]] = None,
    force: bool = False,
) -> AlignSummary:
    """Align every K-FACE image under `src` into `dst` (same relative paths).

    `detector` needs `.detect(bgr_uint8_image) -> (boxes [N, 5], landmarks [N, 5, 2])` sorted
    by score, as `RetinaFaceDetector` gives. `failed.txt` in `dst` is rewritten at the end
    with one `path<TAB>reason` line per failure of this run (empty when all succeeded).
    """
    if template not in TEMPLATES:
        raise ValueError(f"--template must be one of {TEMPLATES}, got {template!r}")
    src_root, dst_root = Path(src), Path(dst)
    groups = iter_kface_groups(src_root) if groups is None else list(groups)
    if not groups:
        raise ValueError(f"--src {src_root} holds no K-FACE images (expected ID/S001/L1/E01/C1.jpg)")
    claim_dst(dst_root, force, src_root)
    summary = AlignSummary()
    total = sum(len(g.members) for g in groups)
    bar = tqdm(total=total, unit="img", desc="align K-FACE", disable=not progress)
    # cv2 decode/warp/encode release the GIL, so threads overlap the per-image work.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for group in groups:
            todo = [m for m in group.members if not (dst_root / m).exists()]
            summary.skipped_existing += len(group.members) - len(todo)
            bar.update(len(group.members) - len(todo))
            if not todo:
                continue  # finished earlier: do not run the detector again
            anchor_path = src_root / group.anchor
            if not anchor_path.is_file():
                summary.failed.append((group.anchor, f"anchor image missing for {len(todo)} images"))
                bar.update(len(todo))
                continue
            anchor = cv2.imread(str(anchor_path), cv2.IMREAD_COLOR)
            if anchor is None:
                summary.failed.append((group.anchor, "unreadable anchor image"))
                bar.update(len(todo))
                continue
            _, landmarks_N52 = detector.detect(anchor)
            summary.detections += 1
            if len(landmarks_N52) == 0:
                summary.no_face_groups += 1
                summary.failed.append((group.anchor, f"no face found; {len(todo)} images not aligned"))
                bar.update(len(todo))
                continue
            lmk_52 = np.asarray(landmarks_N52[0], dtype=np.float64)  # highest score, as the official code

            def job(rel: str, lmk_52=lmk_52, anchor=anchor, group=group) -> Tuple[str, Optional[str]]:
                img = anchor if rel == group.anchor else None
                return rel, _align_one(src_root / rel, dst_root / rel, lmk_52, template, image_size, img)

            for rel, err in pool.map(job, todo):
                if err is None:
                    summary.aligned += 1
                else:
                    summary.failed.append((rel, err))
                bar.update(1)
    bar.close()
    report = "".join(f"{path}\t{reason}\n" for path, reason in summary.failed)
    _atomic_write_bytes(dst_root / "failed.txt", report.encode("utf-8"))
    return summary


def claim_dst(dst: os.PathLike, force: bool = False, src: Optional[os.PathLike] = None) -> Path:
    """Make ``dst`` align_kface's output (see the module doc); ``OutputError`` otherwise."""
    # A folder with failed.txt was written by align_kface before folders carried a manifest.
    return claim_output_dir(dst, "align_kface", force=force, option="--dst",
                            ours=lambda p: (p / "failed.txt").is_file(),
                            sources=[src] if src is not None else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unpg.tools.align_kface",
        description="Detect (RetinaFace, once per ID and pose) and align K-FACE to 112x112 crops.",
    )
    p.add_argument("--src", required=True, help="K-FACE root holding ID/S001/L1/E01/C1.jpg ...")
    p.add_argument("--dst", required=True, help="output root; same relative paths, JPEG 112x112 "
                                                "(new, empty, or an earlier align_kface output: resumed)")
    p.add_argument("--force", action="store_true",
                   help="clear a non-empty --dst not written by align_kface")
    p.add_argument("--detector-weights", required=True,
                   help="RetinaFace MobileNet-0.25 state dict (retinaface_mobilenet0.25.pth)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--template", default="seed", choices=TEMPLATES,
                   help="5-point template: the official code's face.evoLVe reference or insightface's "
                        "arcface_dst (identical at 112x112; default: seed)")
    p.add_argument("--image-size", type=int, default=112, help="output side in pixels (default: 112)")
    p.add_argument("--conf-threshold", type=float, default=0.9,
                   help="detector score threshold (default: 0.9, the official code's)")
    p.add_argument("--max-size", type=int, default=None,
                   help="shrink images whose longer side exceeds this before detection (default: off)")
    p.add_argument("--workers", type=int, default=4, help="threads for read/warp/write (default: 4)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image_size <= 0:
        raise SystemExit(f"--image-size must be positive, got {args.image_size}")
    try:
        if not Path(args.src).is_dir():
            raise FileNotFoundError(f"--src {args.src} is not a folder (expected the K-FACE root)")
        claim_dst(args.dst, args.force, args.src)  # before loading the detector: fail fast
        detector = RetinaFaceDetector(args.detector_weights, device=args.device,
                                    conf_threshold=args.conf_threshold, max_size=args.max_size)
        summary = align_kface_tree(args.src, args.dst, detector, template=args.template,
                                   image_size=args.image_size, workers=args.workers,
                                   force=args.force)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.text())
    if summary.failed:
        print(f"failures listed in {Path(args.dst) / 'failed.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
