"""Training data loaders: one contract, three backends (``loader.name``: torch | ffcv | dali).

``build_loader(cfg, rank, world_size, device, train=True)`` returns an iterable with ``len()``
and ``set_epoch(epoch)`` yielding ``(images, labels)`` on ``device``: images float32
``[B, 3, H, W]`` normalised per ``data.normalize`` (randomly mirrored when ``train``), labels
int64 ``[B]``, ``B = train.batch_size // world_size``. The shared sample-order contract is in
``unpg.loaders.base``; DALI's deviations from it are documented in ``unpg.loaders.dali``.

==========  =========================================  ======================================
backend     reads                                      prepare with
==========  =========================================  ======================================
torch       ``data.rec`` (insightface rec as is)       nothing
ffcv        ``data.ffcv_file`` (packed, page-aligned)  ``python -m unpg.tools.pack``
dali        ``data.dali_dir`` (image-only shards)      ``python -m unpg.tools.prepare_dali``
==========  =========================================  ======================================
"""
from __future__ import annotations

from .base import (
    BaseLoader,
    EpochPlan,
    epoch_permutation,
    epoch_plan,
    per_rank_batch,
    quasi_random_permutation,
    to_device_normalized,
)
from .corrupt import CorruptSampleError

__all__ = ["build_loader", "BaseLoader", "EpochPlan", "epoch_plan", "epoch_permutation",
           "quasi_random_permutation", "per_rank_batch", "to_device_normalized",
           "CorruptSampleError"]


def build_loader(cfg, rank: int, world_size: int, device, *, train: bool = True) -> BaseLoader:
    """The loader ``cfg.loader.name`` selects, for ``rank`` of ``world_size`` on ``device``."""
    name = cfg.loader.name
    if name == "torch":
        from .torch_loader import TorchLoader

        return TorchLoader(cfg, rank, world_size, device, train)
    if name == "ffcv":
        from .ffcv import FFCVLoader

        return FFCVLoader(cfg, rank, world_size, device, train)
    if name == "dali":
        from .dali import DaliLoader

        return DaliLoader(cfg, rank, world_size, device, train)
    raise ValueError(f"loader.name must be one of torch, ffcv, dali; got {name!r}")
