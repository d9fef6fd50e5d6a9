"""Batched embedding extraction for every benchmark: decode in threads, normalise, run, flip.

Images arrive as RGB uint8 [H, W, 3] from a ``load(i)`` callable run in a thread pool (cv2
releases the GIL while decoding and warping), a bounded number of batches ahead of the model.
The model runs under ``torch.inference_mode()`` in eval mode (its training flag is restored
afterwards), with fp16 autocast on CUDA and in float32 on CPU. Flip test: the horizontally
mirrored batch goes through the model too and the two embeddings are summed (insightface),
concatenated (the official code) or the flip is skipped.

Legend: B batch, H/W image size, D embedding dim.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unpg.config import NORMALIZE_MEAN_STD

__all__ = ["FLIP_MODES", "embed_batch", "extract_features", "iter_image_batches", "resolve_device"]

FLIP_MODES = ("sum", "concat", "none")


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``'auto'``/None → CUDA when available else CPU; refuses CUDA on a machine without it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be cpu, cuda[:N] or auto, got {str(device)!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here; "
                         f"use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda[:N] or auto, got {str(device)!r}")
    return dev


def _unwrap(model: nn.Module) -> nn.Module:
    # A DDP wrapper would broadcast buffers on forward (a collective only this rank enters).
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _mean_std(normalize: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if normalize not in NORMALIZE_MEAN_STD:
        raise ValueError(f"normalize must be one of {sorted(NORMALIZE_MEAN_STD)}, got {normalize!r}")
    mean, std = NORMALIZE_MEAN_STD[normalize]
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


def embed_batch(model: nn.Module, images_BHWC: np.ndarray, *, flip: str, normalize: str,
                device: torch.device) -> np.ndarray:
    """Embeddings of one uint8 RGB batch: [B, D] (flip sum/none) or [B, 2D] (concat), float32.

    The caller holds inference mode and eval mode (``extract_features`` does).
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    mean, std = _mean_std(normalize, device)
    x_BCHW = torch.from_numpy(np.ascontiguousarray(images_BHWC)).to(device, non_blocking=True)
    x_BCHW = (x_BCHW.permute(0, 3, 1, 2).float() - mean) / std
    use_amp = device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
        emb_BD = model(x_BCHW).float()
        if flip != "none":
            emb_flip_BD = model(torch.flip(x_BCHW, dims=[3])).float()
            emb_BD = emb_BD + emb_flip_BD if flip == "sum" else torch.cat([emb_BD, emb_flip_BD], 1)
    return emb_BD.cpu().numpy()


def iter_image_batches(n: int, load: Callable[[int], np.ndarray], batch_size: int,
                       workers: Optional[int] = None, prefetch_batches: int = 2
                       ) -> Iterator[np.ndarray]:
    """Yield uint8 [B, H, W, 3] batches of ``load(0..n-1)`` in order, decoded in threads.

    At most ``prefetch_batches + 1`` batches of images are in flight, so memory stays bounded
    whatever ``n`` is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = workers or min(8, os.cpu_count() or 1)
    window = (prefetch_batches + 1) * batch_size
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        submitted = 0
        for start in range(0, n, batch_size):
            while submitted < n and submitted < start + window:
                pending.append(pool.submit(load, submitted))
                submitted += 1
            count = min(batch_size, n - start)
            images = [pending.popleft().result() for _ in range(count)]
            yield np.stack(images)


def extract_features(model: nn.Module, n: int, load: Callable[[int], np.ndarray], *,
                     batch_size: int, flip: str, normalize: str,
                     device: Union[str, torch.device, None] = "auto",
                     workers: Optional[int] = None, desc: str = "features",
                     progress: bool = True) -> np.ndarray:
    """Embed ``n`` images given by ``load(i)`` → float32 [n, D] (or [n, 2D] with concat).

    ``model`` must already be on ``device``; it is put in eval mode for the duration.
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    dev = resolve_device(device)
    _mean_std(normalize, torch.device("cpu"))  # validates the name before any decoding
    net = _unwrap(model)
    out: Optional[np.ndarray] = None
    done = 0
    with _eval_mode(net), torch.inference_mode(), \
            tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images_BHWC in iter_image_batches(n, load, batch_size, workers):
            emb_BD = embed_batch(net, images_BHWC, flip=flip, normalize=normalize, device=dev)
            if out is None:
                out = np.empty((n, emb_BD.shape[1]), dtype=np.float32)
            out[done: done + len(emb_BD)] = emb_BD
            done += len(emb_BD)
            bar.update(len(emb_BD))
    if out is None:
        raise ValueError(f"{desc}: no images to embed")
    return out

