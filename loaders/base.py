"""The one sample-order contract every loader backend follows, and the on-device flip + normalise.

Order contract (``epoch_plan``): epoch ``e`` draws one permutation of the ``n`` samples from
``(seed, e)`` (``random``: uniform; ``quasi_random``: pages shuffled, then samples shuffled inside a
window of pages — still a permutation). Rank ``r`` of ``world`` takes ``perm[r::world]`` truncated
to ``steps * B`` samples, ``steps = n // (world * B)`` (drop_last), so every rank gets a disjoint,
equal-size share and the same number of steps. The horizontal-flip decision of a sample is drawn
per *position* of the epoch permutation from ``(seed, e)`` as well, so flips are reproducible and
identical for every backend that follows the plan (torch, ffcv). DALI cannot follow it exactly;
``unpg.loaders.dali`` documents what it gives instead.

Legend: N batch (here: the per-rank batch ``b``), H height, W width; 3 RGB channels.
"""
from __future__ import annotations

import functools
import logging
import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from unpg.config import NORMALIZE_MEAN_STD

log = logging.getLogger("unpg.loaders")

ORDERS = ("random", "quasi_random")
# Stream tags keep the order, flip and DALI seed streams independent for one (seed, epoch).
_STREAM_ORDER, _STREAM_FLIP, _STREAM_QUASI = 11, 12, 13
DeviceLike = Union[str, torch.device]


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """``train.batch_size`` is the global batch; each rank loads ``global_batch // world_size``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(f"train.batch_size={global_batch} (the global batch) must be a positive "
                         f"multiple of world_size={world_size}; set train.batch_size to a multiple "
                         f"of the number of processes")
    return global_batch // world_size


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Batches each rank yields per epoch (drop_last over the global batch)."""
    return n // (world_size * batch_size)


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([operator.index(seed), operator.index(epoch), stream])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """int64 [n]: the uniform permutation of epoch ``epoch`` (same on every rank)."""
    return _rng(seed, epoch, _STREAM_ORDER).permutation(n).astype(np.int64)


def quasi_random_permutation(page_of: np.ndarray, seed: int, epoch: int,
                             window_pages: int) -> np.ndarray:
    """int64 [n]: shuffle the pages, then the samples inside each window of ``window_pages``
    consecutive (shuffled) pages. A reader then touches only ``window_pages`` pages at a time.

    ``page_of[i]`` is the page of sample ``i`` (any integers; samples sharing one are a page).
    """
    page_of = np.asarray(page_of, np.int64)
    if window_pages < 1:
        raise ValueError(f"window_pages must be >= 1, got {window_pages}")
    rng = _rng(seed, epoch, _STREAM_QUASI)
    pages, page_idx = np.unique(page_of, return_inverse=True)
    page_rank = np.empty(pages.size, np.int64)
    page_rank[rng.permutation(pages.size)] = np.arange(pages.size)
    window = page_rank[page_idx] // window_pages
    # lexsort: primary key the window, secondary a random key -> random order inside a window.
    return np.lexsort((rng.random(page_of.size), window)).astype(np.int64)


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch: ``indices`` and ``flips`` of length ``steps * batch_size``
    in reading order; batch ``s`` is the slice ``[s * B, (s + 1) * B)``."""

    indices: np.ndarray  # int64 sample indices
    flips: np.ndarray  # bool, all False when not training
    steps: int
    batch_size: int

    def batch(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return self.indices[sl], self.flips[sl]

    def from_step(self, start: int) -> "EpochPlan":
        """The rest of the plan after its first ``start`` batches (a mid-epoch resume)."""
        if not 0 <= start <= self.steps:
            raise ValueError(f"start step must be in [0, {self.steps}], got {start}")
        cut = start * self.batch_size
        return EpochPlan(self.indices[cut:], self.flips[cut:], self.steps - start,
                         self.batch_size)


def quasi_window_pages(samples_per_page: float, global_batch: int) -> int:
    """Pages per ``quasi_random`` window: at least 16, and enough for 4 global batches, so a batch
    still mixes samples from many pages (a rec is sorted by identity)."""
    return max(16, math.ceil(4 * global_batch / max(samples_per_page, 1e-9)))


def epoch_plan(n: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, *,
               order: str = "random", page_of: Optional[np.ndarray] = None,
               window_pages: int = 16, train: bool = True) -> EpochPlan:
    """The shared sampler: rank ``rank``'s samples and flips for ``epoch`` (see module doc)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = steps_per_epoch(n, world_size, batch_size)
    if steps == 0:
        raise ValueError(f"the dataset has {n} images, fewer than one global batch of "
                         f"{world_size} x {batch_size}; lower train.batch_size")
    if order == "random":
        perm = epoch_permutation(n, seed, epoch)
    elif order == "quasi_random":
        if page_of is None or len(page_of) != n:
            raise ValueError("order 'quasi_random' needs the page of every sample (page_of)")
        perm = quasi_random_permutation(page_of, seed, epoch, window_pages)
    else:
        raise ValueError(f"loader.order must be one of {ORDERS}, got {order!r}")
    m = steps * batch_size
    if train:
        flips_all = _rng(seed, epoch, _STREAM_FLIP).random(n) < 0.5
        flips = flips_all[rank::world_size][:m]
    else:
        flips = np.zeros(m, bool)
    return EpochPlan(perm[rank::world_size][:m], flips, steps, batch_size)


def derived_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for another library (DALI), derived from ``seed`` and ``parts``."""
    state = np.random.SeedSequence([operator.index(seed), *map(operator.index, parts)])
    return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def mean_std(normalize: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) in 0..255 RGB units for ``data.normalize``."""
    if normalize not in NORMALIZE_MEAN_STD:
        raise ValueError(f"data.normalize must be one of {sorted(NORMALIZE_MEAN_STD)}, "
                         f"got {normalize!r}")
    return NORMALIZE_MEAN_STD[normalize]


def to_device_normalized(batch_u8: torch.Tensor, flips_N: Optional[torch.Tensor],
                         mean: Sequence[float], std: Sequence[float], device: DeviceLike,
                         *, layout: str = "NCHW") -> torch.Tensor:
    """uint8 batch (``NCHW``: the loaders' decoders write planar RGB; ``NHWC`` accepted) -> float32
    ``[N, 3, H, W]`` = ``(pixel - mean) / std``, sample ``i`` mirrored left-right where ``flips_N[i]``.

    One op sequence on the whole batch on ``device``: copy (non-blocking from pinned memory),
    layout change and flip while still uint8 (4x fewer bytes than float), float cast, one
    multiply-add. No host sync (the flip is arithmetic, not boolean indexing).
    """
    device = torch.device(device)
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if batch_u8.dtype != torch.uint8 or batch_u8.dim() != 4:
        raise ValueError(f"expected a uint8 4-d batch, got {batch_u8.dtype} {tuple(batch_u8.shape)}")
    x = batch_u8.to(device, non_blocking=True)
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2).contiguous()  # a new tensor: in-place ops below are safe
    elif flips_N is not None and x.data_ptr() == batch_u8.data_ptr():
        x = x.clone()  # never modify the caller's batch
    if flips_N is not None:
        # x += f * (flip(x) - x) in uint8 (mod 256) is flip(x) where f, else x: no host sync.
        # In place with one temporary: fresh large tensors cost page faults on the CPU
        # (measured: 35 vs 57 us/image for the whole function at 128x112x112x3).
        f = flips_N.to(device, non_blocking=True).view(-1, 1, 1, 1).to(torch.uint8)
        d = x.flip(3)
        x.add_(d.sub_(x).mul_(f))
    scale, shift = _affine(device, tuple(mean), tuple(std))
    y = x.to(torch.float32)
    if device.type != "cpu":
        return y.mul_(scale).add_(shift)
    # CPU: one scalar multiply-add per channel plane. A [1, 3, 1, 1] broadcast runs the CPU's
    # slow broadcast loop, 27 us/image at 128x3x112x112 against 8 us this way (one thread,
    # bench/RESULTS.md); on 2 cores that is the share a decode worker loses to the training
    # process. Same float32 operations, so the same bits as the broadcast.
    for c, (a, b) in enumerate(zip(scale.view(-1).tolist(), shift.view(-1).tolist())):
        y[:, c].mul_(a).add_(b)
    return y


def affine_f32(mean: Sequence[float], std: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """``(1/std, -mean/std)`` rounded once to float32 ``[3]``: ``pixel * scale + shift`` in float32
    is the normalisation every path computes (the same bits on the CPU, in decode workers and on
    the GPU)."""
    scale = np.array([1.0 / s for s in std], np.float64).astype(np.float32)
    shift = np.array([-m / s for m, s in zip(mean, std)], np.float64).astype(np.float32)
    return scale, shift


@functools.lru_cache(maxsize=16)
def _affine(device: torch.device, mean: tuple, std: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """``affine_f32`` as [1, 3, 1, 1] tensors on ``device``, made once (no per-step copy)."""
    return tuple(torch.from_numpy(v).view(1, 3, 1, 1).to(device) for v in affine_f32(mean, std))


def check_num_classes(cfg_num_classes: int, data_num_classes: int, source: str) -> None:
    """``data.num_classes`` 0 means "from the data"; otherwise it must equal the data's."""
    if cfg_num_classes and cfg_num_classes != data_num_classes:
        raise ValueError(f"data.num_classes={cfg_num_classes} but {source} has "
                         f"{data_num_classes} classes; set data.num_classes to "
                         f"{data_num_classes} or 0 (read from the data)")


class BaseLoader:
    """Shared state of every backend: per-rank batch, epoch, normalisation, device.

    Backends take their config sections (``data``: ``DataConfig``, ``opts``: ``LoaderConfig``) and
    explicit arguments, not the whole config. Subclasses implement ``__iter__`` (yielding
    ``(images float32 [b,3,H,W], labels int64 [b])`` on ``device``) and set ``num_samples`` and
    ``num_classes`` before ``len()`` is used.
    """

    num_samples: int = 0
    num_classes: int = 0

    def __init__(self, data, opts, *, global_batch: int, seed: int, rank: int, world_size: int,
                 device: DeviceLike, train: bool):
        self.data, self.opts = data, opts
        self.rank, self.world_size, self.train = int(rank), int(world_size), train
        self.global_batch = global_batch
        self.batch_size = per_rank_batch(global_batch, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        self.device = torch.device(device)
        self.seed = seed
        self.image_size = data.image_size
        self.mean, self.std = mean_std(data.normalize)
        self.epoch = 0
        self.start_step = 0
        self.on_corrupt = opts.on_corrupt

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and flips) the next iteration yields (from its start)."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        """Let the next iteration begin at batch ``step`` of the epoch: a resumed run seeks to
        where it stopped without reading or decoding the batches it already consumed. Applies
        to one iteration; the one after it starts at batch 0 again."""
        step = operator.index(step)
        if not 0 <= step <= len(self):
            raise ValueError(f"start step must be in [0, {len(self)}] (batches per epoch), "
                             f"got {step}")
        self.start_step = step

    def take_start_step(self) -> int:
        """The batch the starting iteration begins at; later iterations start at 0 again."""
        start, self.start_step = self.start_step, 0
        return start

    def rest_of_epoch(self, plan: EpochPlan) -> EpochPlan:
        """``plan`` from ``start_step`` on: what the starting iteration of a backend that follows
        the shared plan reads (the torch and packed loaders)."""
        start = self.take_start_step()
        return plan.from_step(start) if start else plan

    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.world_size, self.batch_size)

    def close(self) -> None:
        """Release workers and files now rather than at garbage collection (idempotent)."""

    def _check_enough(self, source: str) -> None:
        if self.num_samples == 0:
            raise ValueError(f"{source} holds no images (0 image records): it is empty or was "
                             f"written incompletely; point the loader at a dataset with images")
        if len(self) == 0:
            raise ValueError(f"{source} has {self.num_samples} images, fewer than one global batch "
                             f"(train.batch_size={self.global_batch}); lower the batch size")
