"""Training data loaders: one contract, three backends (``loader.name``: torch | ffcv | dali).

``build_loader(cfg, rank, world_size, device, train=True)`` returns an iterable with ``len()``
and ``set_epoch(epoch)`` yielding ``(images, labels)`` on ``device``: images float32
``[b, 3, H, W]`` normalised per ``data.normalize`` (randomly mirrored when ``train``), labels
int64 ``[b]``, ``b = train.batch_size // world_size``. The shared sample-order contract is in
``unpg.loaders.base``; DALI's deviations from it are documented in ``unpg.loaders.dali``.

==========  =========================================  ======================================
backend     reads                                      prepare with
==========  =========================================  ======================================
torch       ``data.rec`` (insightface rec as is)       nothing
ffcv        ``data.ffcv_file`` (packed, page-aligned)  ``python -m unpg.tools.pack``
                                                           (``packed.py``: FFCV-style, no FFCV)
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
from .dali import DaliLoader
from .packed import PackedLoader
from .sources import check_source
from .torch_loader import TorchLoader

__all__ = ["build_loader", "check_source", "BaseLoader", "EpochPlan", "epoch_plan",
           "epoch_permutation", "quasi_random_permutation", "per_rank_batch",
           "to_device_normalized", "CorruptSampleError"]

_BACKENDS = {"torch": TorchLoader, "ffcv": PackedLoader, "dali": DaliLoader}


def build_loader(cfg, rank: int, world_size: int, device, *, train: bool = True) -> BaseLoader:
    """The loader ``cfg.loader.name`` selects, for ``rank`` of ``world_size`` on ``device``.

    Only the chosen backend's data key is read and checked (``check_source``); each backend gets
    the ``data`` and ``loader`` sections plus the global batch and seed of ``train``."""
    name = cfg.loader.name
    check_source(cfg.data, name)
    return _BACKENDS[name](cfg.data, cfg.loader, global_batch=cfg.train.batch_size,
                          seed=cfg.train.seed, rank=rank, world_size=world_size, device=device,
                          train=train)
