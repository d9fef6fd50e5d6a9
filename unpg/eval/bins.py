"""insightface verification ``.bin`` files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, ...).

A ``.bin`` is a pickle of ``(list of 2N JPEG/PNG bytes, list of N bools)``; pair i is images
2i and 2i+1. Most were written by Python 2 (bytes pickled as ``str``), so they are read with
``encoding='bytes'``. They come from the internet, so they are unpickled with
``SafeBinUnpickler``: every global lookup is refused (plain lists, tuples, bytes, str, bools,
ints never need one), which rules out code execution by ``__reduce__`` tricks. The single
exception is Python 3's protocol-2 spelling of bytes, ``_codecs.encode(str, 'latin1')``, which
maps to a stand-in that only performs that conversion.

Decoded images are kept in a process-wide cache (keyed by path, size, mtime and image size) so
periodic evaluation during training decodes each file once. Memory: N images x 37.6 KB at
112x112 (LFW: 12,000 images, 0.45 GB).
"""
from __future__ import annotations

import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch import nn

from .features import FLIP_MODES, extract_features
from .metrics import DEFAULT_FARS, kfold_accuracy, verification_summary

__all__ = [
    "SafeBinUnpickler",
    "UnsafePickleError",
    "VerificationSet",
    "clear_bin_cache",
    "decode_image",
    "evaluate_bins",
    "load_bin",
    "read_bin_pickle",
]


class UnsafePickleError(ValueError):
    """A pickle asked for a global (a class or function): refused, the file may be malicious."""


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """The one callable a bytes-only pickle may need: Python 3 writes ``bytes`` at protocol
    <= 2 as ``_codecs.encode(str, 'latin1')``. Anything but that exact call is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): "
                                f"only str → latin1 bytes is allowed")
    return text.encode("latin1")


class SafeBinUnpickler(pickle.Unpickler):
    """Unpickler for builtin containers and scalars: every global is refused, except that
    ``_codecs.encode`` resolves to a str → latin1-bytes-only stand-in (Python 3's way of
    pickling bytes at protocol 2)."""

    def __init__(self, file, path: str = "<bytes>", **kwargs):
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise UnsafePickleError(
            f"{self._path}: refusing to load global '{module}.{name}' from this pickle. A "
            f"verification .bin holds only lists of image bytes and bools and never needs a "
            f"global, so this file is not a plain .bin and may be malicious (unpickling it "
            f"could run code). Re-create it from trusted images."
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._path}: refusing persistent id {pid!r}; the file may be "
                                f"malicious")


def read_bin_pickle(path: Union[str, Path]) -> Tuple[list, np.ndarray]:
    """Safely unpickle a ``.bin`` → (list of 2N image byte strings, bool array of N flags)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification file not found: {path} (expected an insightface "
                                f".bin: a pickle of (image bytes list, issame list))")
    with open(path, "rb") as fh:
        try:
            obj = SafeBinUnpickler(fh, str(path), encoding="bytes").load()
        except UnsafePickleError as exc:
            if str(path) in str(exc):
                raise
            raise UnsafePickleError(f"{path}: {exc}; the file may be malicious") from exc
        except Exception as exc:  # truncated or not a pickle at all
            raise ValueError(f"{path}: not a readable verification .bin pickle "
                             f"({type(exc).__name__}: {exc})") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled pair (images, issame), got "
                         f"{type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray))
                                                       for b in images):
        raise ValueError(f"{path}: the first element must be a list of encoded image bytes")
    if not isinstance(issame, (list, tuple)) or not all(
            isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)) for v in issame):
        raise ValueError(f"{path}: the second element must be a list of bools (one per pair)")
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs; expected exactly "
                         f"2 images per pair")
    return [bytes(b) for b in images], np.asarray(issame, dtype=bool)


def decode_image(data: bytes, image_size: int, where: str = "") -> np.ndarray:
    """Encoded bytes → RGB uint8 [image_size, image_size, 3] (resized when the size differs)."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{where}: could not decode the image bytes (not a JPEG/PNG?)")
    if img.shape[:2] != (image_size, image_size):
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class VerificationSet:
    """A decoded ``.bin``: ``images`` uint8 [2N, S, S, 3] RGB, ``issame`` bool [N]."""

    name: str
    path: str
    images: np.ndarray
    issame: np.ndarray


_CACHE: Dict[tuple, VerificationSet] = {}
_CACHE_LOCK = threading.Lock()


def clear_bin_cache() -> None:
    """Drop every decoded ``.bin`` held by ``load_bin``."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_bin(path: Union[str, Path], image_size: int = 112, workers: Optional[int] = None,
             use_cache: bool = True) -> VerificationSet:
    """Read and decode a ``.bin`` (images decoded in a thread pool), cached per file version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification file not found: {path} (expected an insightface "
                                f".bin: a pickle of (image bytes list, issame list))")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, int(image_size))
    if use_cache:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            return hit
    blobs, issame = read_bin_pickle(path)
    out = np.empty((len(blobs), image_size, image_size, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        out[i] = decode_image(blobs[i], image_size, f"{path} image {i}")

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(blobs))))
    vs = VerificationSet(name=path.stem, path=str(path), images=out, issame=issame)
    if use_cache:
        with _CACHE_LOCK:
            _CACHE[key] = vs
    return vs


def evaluate_verification_set(model: nn.Module, vs: VerificationSet, *, batch_size: int,
                              flip: str, normalize: str, device: Union[str, torch.device],
                              n_folds: int = 10, fars: Sequence[float] = DEFAULT_FARS,
                              progress: bool = False
                              ) -> Tuple[Dict[str, object], Tuple[np.ndarray, np.ndarray]]:
    """Every verification number for one decoded set, and its ROC (fpr, tpr)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    images = vs.images
    emb_ND = extract_features(model, len(images), lambda i: images[i], batch_size=batch_size,
                              flip=flip, normalize=normalize, device=device, workers=1,
                              desc=vs.name, progress=progress)
    emb1, emb2 = emb_ND[0::2], emb_ND[1::2]
    acc, std = kfold_accuracy(emb1, emb2, vs.issame, n_folds=n_folds)
    e1 = emb1 / np.maximum(np.linalg.norm(emb1, axis=1, keepdims=True), 1e-12)
    e2 = emb2 / np.maximum(np.linalg.norm(emb2, axis=1, keepdims=True), 1e-12)
    cos_N = np.sum(e1.astype(np.float64) * e2, axis=1)
    summary, roc = verification_summary(cos_N, vs.issame, fars)
    norms = np.linalg.norm(emb_ND, axis=1)
    result = {"accuracy": acc, "accuracy_std": std, **summary,
              "n_folds": n_folds, "mean_feature_norm": float(norms.mean())}
    return result, roc


def evaluate_bins(model: nn.Module, bin_paths: Sequence[Union[str, Path]], *, batch_size: int,
                  flip: str, normalize: str, device: Union[str, torch.device],
                  n_folds: int = 10, fars: Sequence[float] = DEFAULT_FARS,
                  image_size: int = 112, progress: bool = False) -> Dict[str, Dict[str, object]]:
    """Evaluate ``model`` on each ``.bin`` → ``{stem: {accuracy, accuracy_std, tar_at_far, ...}}``.

    The call training makes periodically: decoded files are cached across calls; ``model``
    must already be on ``device``; its train/eval mode is restored afterwards.
    """
    results: Dict[str, Dict[str, object]] = {}
    for p in bin_paths:
        vs = load_bin(p, image_size=image_size)
        name = vs.name if vs.name not in results else vs.path
        results[name], _ = evaluate_verification_set(
            model, vs, batch_size=batch_size, flip=flip, normalize=normalize, device=device,
            n_folds=n_folds, fars=fars, progress=progress)
    return results
