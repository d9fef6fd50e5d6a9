"""Shared helpers for the evaluation tests: a tiny deterministic backbone, a straightforward
embedding routine, and a miniature IJB tree (loose crops with known landmarks, meta files,
1:N csvs) built in tmp_path."""
from __future__ import annotations

import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from unpg.data.align import ARCFACE_TEMPLATE_112

MEAN_STD = {
    "insightface": (np.array([127.5] * 3), np.array([127.5] * 3)),
    "imagenet": (np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255),
}


class TinyNet(nn.Module):
    """Pool to 4x4, then a fixed linear map: fast, deterministic, orientation-sensitive."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(48, dim)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def tiny_model() -> nn.Module:
    return TinyNet()


@pytest.fixture
def embed_manually():
    """Loop-per-image reference: RGB uint8 images → model features with the given flip mode."""

    def run(model: nn.Module, images, flip: str = "sum", normalize: str = "insightface"):
        mean, std = MEAN_STD[normalize]
        out = []
        model.eval()
        with torch.no_grad():
            for img in images:
                x = (img.astype(np.float64) - mean) / std
                t = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))
                f = model(t)[0].numpy().astype(np.float64)
                if flip != "none":
                    g = model(torch.flip(t, dims=[3]))[0].numpy().astype(np.float64)
                    f = f + g if flip == "sum" else np.concatenate([f, g])
                out.append(f)
        return np.array(out)

    return run


def canonical_face(seed: int) -> np.ndarray:
    """A smooth random 112x112 RGB pattern with dark 'eyes' and 'mouth' at the template points."""
    rng = np.random.default_rng(seed)
    low = rng.integers(40, 220, size=(6, 6, 3)).astype(np.uint8)
    img = cv2.resize(low, (112, 112), interpolation=cv2.INTER_CUBIC)
    for x, y in ARCFACE_TEMPLATE_112:
        cv2.circle(img, (int(round(x)), int(round(y))), 4, (10, 10, 10), -1)
    return img


def similarity(scale: float, theta: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture
def ijb_tree(tmp_path):
    """A miniature IJB-C tree: 4 subjects x 3 templates, media with 1-3 frames, all template
    pairs, loose crops warped from per-subject faces with known landmarks, G1/G2/probe csvs."""
    rng = np.random.default_rng(7)
    root = tmp_path / "IJBC"
    (root / "meta").mkdir(parents=True)
    faces = {s: canonical_face(100 + s) for s in range(4)}
    rows, lmk_rows, canon, subject_of_template = [], [], {}, {}
    tid, mid, img_no = 10, 500, 0
    for s in range(4):
        for _ in range(3):
            tid += 3
            subject_of_template[tid] = s
            for n_frames in rng.integers(1, 4, size=rng.integers(1, 3)):
                mid += 1
                for _ in range(n_frames):
                    img_no += 1
                    name = f"{img_no}.png"
                    noisy = np.clip(faces[s].astype(int) + rng.integers(-12, 13, (112, 112, 3)),
                                    0, 255).astype(np.uint8)
                    m = similarity(rng.uniform(0.8, 1.5), rng.uniform(-0.4, 0.4),
                                   rng.uniform(10, 40), rng.uniform(10, 40))
                    loose = cv2.warpAffine(noisy, m, (200, 210), borderValue=(90, 90, 90))
                    _write_rgb(root / "loose_crop" / name, loose)
                    lmk = ARCFACE_TEMPLATE_112 @ m[:, :2].T + m[:, 2]
                    score = rng.uniform(0.3, 1.0)
                    rows.append((name, tid, mid))
                    lmk_rows.append((name, lmk, score))
                    canon[name] = noisy
                    _write_rgb(root / "aligned" / name, noisy)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in rows))
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(
        f"{n} " + " ".join(f"{v:.4f}" for v in lmk.ravel()) + f" {sc:.6f}\n"
        for n, lmk, sc in lmk_rows))
    tids = sorted(subject_of_template)
    pairs = [(a, b, int(subject_of_template[a] == subject_of_template[b]))
             for i, a in enumerate(tids) for b in tids[i + 1:]]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {lab}\n" for a, b, lab in pairs))
    (root / "meta" / "img.list").write_text("".join(f"./data/aligned/{n} 0\n" for n, _, _ in rows))

    # 1:N: the first template of subjects {0, 1} is gallery G1, of {2, 3} gallery G2; every
    # other template is a mixed probe (subjects 2, 3 are non-mated for G1 and vice versa).
    first = {}
    for t in tids:
        first.setdefault(subject_of_template[t], t)

    def write_csv(name, templates):
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
        for n, t, _ in rows:
            if t in templates:
                lines.append(f"{t},{subject_of_template[t] + 1000},img/{n}")
        (root / "meta" / name).write_text("\n".join(lines) + "\n")

    write_csv("ijbc_1N_gallery_G1.csv", {first[0], first[1]})
    write_csv("ijbc_1N_gallery_G2.csv", {first[2], first[3]})
    write_csv("ijbc_1N_probe_mixed.csv", set(tids) - set(first.values()))
    return types.SimpleNamespace(
        root=root, rows=rows, landmarks={n: lmk for n, lmk, _ in lmk_rows},
        det_scores={n: float(f"{sc:.6f}") for n, _, sc in lmk_rows}, canonical=canon,
        pairs=pairs, subject_of_template=subject_of_template, first=first,
        out=tmp_path / "out")
