"""Shared helpers for the loader tests: configs, small recs with known content, prepared data."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from unpg.config import Config
from unpg.recordio import FaceRecWriter
from unpg.tools.pack import pack_rec
from unpg.tools.prepare_dali import prepare_dali


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny batches: OpenMP workers only add barrier waits on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(name: str, *, rec: str = "", ffcv: str = "", dali: str = "", batch: int = 16,
             workers: int = 0, seed: int = 7, **loader) -> Config:
    cfg = Config()
    cfg.data.rec, cfg.data.ffcv_file, cfg.data.dali_dir = str(rec), str(ffcv), str(dali)
    cfg.loader.name, cfg.loader.workers = name, workers
    for k, v in loader.items():
        setattr(cfg.loader, k, v)
    cfg.train.batch_size, cfg.train.seed = batch, seed
    return cfg.validate()


def jpeg_of(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return enc.tobytes()


def write_rec(directory: Path, classes: int, per_class: int, corrupt=None, seed: int = 0):
    """An insightface rec of random-blob 112x112 faces; ``corrupt`` maps (class, k) to a function
    turning the good JPEG bytes into bad ones. Returns the list of (label, jpeg bytes) written."""
    rng = np.random.default_rng(seed)
    written = []
    with FaceRecWriter(directory) as w:
        for c in range(classes):
            for k in range(per_class):
                small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
                img = cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)
                data = jpeg_of(img)
                if corrupt and (c, k) in corrupt:
                    data = corrupt[(c, k)](data)
                w.add(c, data)
                written.append((c, data))
    return written


@pytest.fixture(scope="session")
def cfg_factory():
    """``make_cfg`` (test modules cannot import conftest under --import-mode=importlib)."""
    return make_cfg


@pytest.fixture(scope="session")
def rec_factory():
    """``write_rec(directory, classes, per_class, corrupt=None, seed=0)``."""
    return write_rec


@pytest.fixture(scope="session")
def tiny_rec(fixtures_dir) -> Path:
    return fixtures_dir / "ms1m_tiny"


@pytest.fixture(scope="session")
def prepared(tiny_rec, tmp_path_factory):
    """The MXNet-written fixture packed (ffcv) and prepared for DALI (2 shards)."""
    out = tmp_path_factory.mktemp("prepared")
    pack_rec(tiny_rec, out / "tiny.unpgpack", progress=False)
    prepare_dali(tiny_rec, out / "dali", shards=2, seed=3, progress=False)
    return {"rec": tiny_rec, "ffcv": out / "tiny.unpgpack", "dali": out / "dali"}
