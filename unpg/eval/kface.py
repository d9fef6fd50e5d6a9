"""K-FACE verification on the official code's test-pair lists (Q1..Q4).

Each pair file has lines ``ID/Sxxx/Lx/Exx/Cx.jpg ID/Sxxx/Lx/Exx/Cx.jpg label`` (label 1 =
same person) over an aligned K-FACE tree (``<root>/<ID>/<Sxxx>/<Lx>/<Exx>/<Cx>.jpg``, 112x112
RetinaFace-aligned crops); pair files are relative to ``root``. Every image referenced by any
pair file is embedded once; pairs score the cosine similarity of their features (flip per the
config); each file reports TAR at the configured FARs as the official code prints them (sklearn ROC,
nearest FPR), plus AUC, EER and the official code's best-threshold accuracy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import cv2
import numpy as np
import torch
from torch import nn

from .features import extract_features
from .metrics import l2_normalize, verification_summary

__all__ = ["evaluate_kface", "parse_pair_file"]


def parse_pair_file(path: Union[str, Path]) -> Tuple[List[str], List[str], np.ndarray]:
    """Read ``left right label`` lines → (left paths, right paths, bool labels [P])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"K-FACE pair file not found: {path} (expected lines "
                                f"'ID/Sxxx/Lx/Exx/Cx.jpg ID/Sxxx/Lx/Exx/Cx.jpg label')")
    left: List[str] = []
    right: List[str] = []
    labels: List[bool] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[2] not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'image1 image2 label' with label 0 "
                                 f"or 1, got {line.strip()[:160]!r}")
            for p in parts[:2]:
                if Path(p).is_absolute() or ".." in Path(p).parts:
                    raise ValueError(f"{path}:{lineno}: image paths must be relative to the "
                                     f"K-FACE root without '..', got {p!r}")
            left.append(parts[0])
            right.append(parts[1])
            labels.append(parts[2] == "1")
    if not labels:
        raise ValueError(f"{path}: no pairs (expected lines 'image1 image2 label')")
    return left, right, np.asarray(labels, dtype=bool)


def _load_rgb(path: Path, image_size: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"K-FACE image missing or unreadable: {path} (expected an "
                                f"aligned {image_size}x{image_size} crop)")
    if img.shape[:2] != (image_size, image_size):
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def evaluate_kface(model: nn.Module, cfg, *, device: Union[str, torch.device],
                   workers: Optional[int] = None, progress: bool = True
                   ) -> Tuple[Dict[str, object], Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Run K-FACE for an ``EvalDataConfig`` → ({pair-file stem: summary}, ROC curves)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"K-FACE root folder not found: {root} (expected the aligned "
                                f"tree <ID>/<Sxxx>/<Lx>/<Exx>/<Cx>.jpg and the pair files)")
    parsed = []
    for name in cfg.pairs:
        pair_path = Path(name) if Path(name).is_absolute() else root / name
        parsed.append((Path(name).stem, *parse_pair_file(pair_path)))
    # One vectorised string unique over every pair side of every file: image list + indices.
    all_paths = np.array([p for _, left, right, _ in parsed for p in left + right])
    uniq, inv = np.unique(all_paths, return_inverse=True)
    images: List[str] = uniq.tolist()
    missing = [p for p in images if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(f"K-FACE: {len(missing)} image(s) named in the pair files are "
                                f"missing under {root}, e.g. {missing[:3]}")
    feats_ND = extract_features(
        model, len(images), lambda i: _load_rgb(root / images[i], cfg.image_size),
        batch_size=cfg.batch_size, flip=cfg.flip, normalize=cfg.normalize, device=device,
        workers=workers, desc="kface features", progress=progress)
    feats_ND = l2_normalize(feats_ND, np.float32)
    results: Dict[str, object] = {}
    curves: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    offset = 0
    for stem, left, _right, labels in parsed:
        n = len(left)
        i1, i2 = inv[offset: offset + n], inv[offset + n: offset + 2 * n]
        offset += 2 * n
        cos_P = np.einsum("ij,ij->i", feats_ND[i1].astype(np.float64), feats_ND[i2])
        results[stem], curves[stem] = verification_summary(cos_P, labels, cfg.fars)
    return {"benchmark": "kface", "flip": cfg.flip, "normalize": cfg.normalize,
            "num_images": len(images), "pair_files": results}, curves
