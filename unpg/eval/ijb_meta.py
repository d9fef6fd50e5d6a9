"""IJB-B / IJB-C meta files (insightface's ``IJB_release`` layout) parsed into arrays.

    <root>/meta/<ijbb|ijbc>_face_tid_mid.txt        "img tid mid"        (one line per image)
    <root>/meta/<ijbb|ijbc>_name_5pts_score.txt     "img x1 y1 .. x5 y5 score" (same order)
    <root>/meta/<ijbb|ijbc>_template_pair_label.txt "t1 t2 label"        (one line per pair)
    <root>/meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ijbc_1N_probe_mixed.csv  (IJB-B: S1, S2)

Every reader names the file and line of a malformed entry.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "IJBMeta",
    "ONE_N_FILES",
    "need_file",
    "read_face_tid_mid",
    "read_ijb_meta",
    "read_name_5pts_score",
    "read_template_pairs",
    "read_template_subjects",
]

ONE_N_FILES = {
    "ijbb": (("S1", "ijbb_1N_gallery_S1.csv"), ("S2", "ijbb_1N_gallery_S2.csv"),
             "ijbb_1N_probe_mixed.csv"),
    "ijbc": (("G1", "ijbc_1N_gallery_G1.csv"), ("G2", "ijbc_1N_gallery_G2.csv"),
             "ijbc_1N_probe_mixed.csv"),
}


def need_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a FileNotFoundError naming it and what belongs there."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB file not found: {path} (expected {what}; the IJB_release "
                                f"layout is <root>/meta/*.txt and <root>/loose_crop/)")
    return path


def _split_lines(path: Path, n_fields: int, what: str) -> List[List[str]]:
    rows = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != n_fields:
                raise ValueError(f"{path}:{lineno}: expected {n_fields} fields ({what}), got "
                                 f"{len(parts)}: {line.strip()[:120]!r}")
            rows.append(parts)
    if not rows:
        raise ValueError(f"{path}: empty file (expected lines of {what})")
    return rows


def read_face_tid_mid(path: Union[str, Path]) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``img tid mid`` lines → (image names, template ids int64 [N], media ids int64 [N])."""
    path = need_file(Path(path), "lines 'img template_id media_id'")
    rows = _split_lines(path, 3, "img template_id media_id")
    try:
        tid_mid = np.array([(int(r[1]), int(r[2])) for r in rows], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"{path}: template and media ids must be integers ({exc})") from exc
    return [r[0] for r in rows], tid_mid[:, 0], tid_mid[:, 1]


def read_name_5pts_score(path: Union[str, Path]) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``img x1 y1 .. x5 y5 score`` → (names, landmarks float32 [N, 5, 2], scores float32 [N])."""
    path = need_file(Path(path), "lines 'img x1 y1 ... x5 y5 detector_score'")
    rows = _split_lines(path, 12, "img x1 y1 ... x5 y5 detector_score")
    try:
        vals = np.array([r[1:] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"{path}: landmarks and scores must be numbers ({exc})") from exc
    return [r[0] for r in rows], vals[:, :10].reshape(-1, 5, 2), vals[:, 10]


def read_template_pairs(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``t1 t2 label`` → (t1 int64 [P], t2 int64 [P], label bool [P])."""
    path = need_file(Path(path), "lines 't1 t2 label'")
    try:
        arr = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: expected integer lines 't1 t2 label' ({exc})") from exc
    if arr.shape[1] != 3 or len(arr) == 0:
        raise ValueError(f"{path}: expected lines 't1 t2 label', got {arr.shape[1]} columns")
    if not np.isin(arr[:, 2], (0, 1)).all():
        raise ValueError(f"{path}: labels (third column) must be 0 or 1")
    return arr[:, 0], arr[:, 1], arr[:, 2].astype(bool)


def read_template_subjects(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray]:
    """A 1:N csv (``TEMPLATE_ID,SUBJECT_ID,FILENAME,...``, one row per image) → unique
    (template ids, subject ids), sorted by template id."""
    path = need_file(Path(path), "a 1:N csv with columns TEMPLATE_ID,SUBJECT_ID,...")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise ValueError(f"{path}: empty 1:N csv")
    header = [c.strip().upper() for c in rows[0]]
    if "TEMPLATE_ID" in header and "SUBJECT_ID" in header:
        ti, si = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        rows = rows[1:]
    else:
        ti, si = 0, 1
    try:
        pairs = np.array([(int(r[ti]), int(r[si])) for r in rows], dtype=np.int64)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: TEMPLATE_ID and SUBJECT_ID must be integers ({exc})") from exc
    uniq = np.unique(pairs, axis=0)
    tids, first, counts = np.unique(uniq[:, 0], return_index=True, return_counts=True)
    if (counts > 1).any():
        t = int(tids[counts > 1][0])
        raise ValueError(f"{path}: template {t} belongs to several subjects "
                         f"{uniq[uniq[:, 0] == t, 1].tolist()}")
    return tids, uniq[first, 1]


@dataclass
class IJBMeta:
    """The parsed meta files of one IJB set (images in face_tid_mid order)."""

    root: Path
    benchmark: str
    image_names: List[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: Optional[np.ndarray]
    det_scores: Optional[np.ndarray]
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray


def read_ijb_meta(root: Union[str, Path], benchmark: str, with_landmarks: bool = True) -> IJBMeta:
    """Read face_tid_mid, template pairs and (``with_landmarks``) the 5-point file."""
    if benchmark not in ONE_N_FILES:
        raise ValueError(f"benchmark must be 'ijbb' or 'ijbc', got {benchmark!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"IJB root folder not found: {root} (expected insightface's "
                                f"IJB_release/{benchmark.upper()} with meta/ and loose_crop/)")
    meta = root / "meta"
    names, tids, mids = read_face_tid_mid(meta / f"{benchmark}_face_tid_mid.txt")
    lmk = scores = None
    if with_landmarks:
        lnames, lmk, scores = read_name_5pts_score(meta / f"{benchmark}_name_5pts_score.txt")
        if lnames != names:
            bad = next(i for i, (a, b) in enumerate(zip(lnames, names)) if a != b) \
                if len(lnames) == len(names) else min(len(lnames), len(names))
            raise ValueError(
                f"{meta}: {benchmark}_name_5pts_score.txt ({len(lnames)} lines) and "
                f"{benchmark}_face_tid_mid.txt ({len(names)} lines) must list the same images in "
                f"the same order; first difference at line {bad + 1}")
    t1, t2, labels = read_template_pairs(meta / f"{benchmark}_template_pair_label.txt")
    return IJBMeta(root, benchmark, names, tids, mids, lmk, scores, t1, t2, labels)
