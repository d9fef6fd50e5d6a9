"""FFCV-style loader (``loader.name: ffcv``) over a packed file (``unpg.loaders.packed_format``,
made by ``python -m unpg.tools.pack``). It follows FFCV's design without using FFCV.

The file is memory-mapped read-only, so every rank and every worker on a host shares one copy in
the page cache. Each rank follows the shared order contract (``base.epoch_plan``; ``random`` or
``quasi_random`` over the file's pages).

Decoding (``loader.workers`` > 0): worker *processes* (``unpg.loaders.workers``) each decode whole
batches straight into slots of a shared-memory ring of ``[b, 3, H, W]`` batches allocated once.
No per-image Python runs in the training process, so the decode neither competes for the
training loop's GIL nor is bound by it; it scales with cores. The measurements behind that
choice (threads vs processes, 2 and 16 cores) are in ``unpg.loaders.workers`` and
``bench/RESULTS.md``. ``workers: 0`` decodes in the calling thread.

For a GPU the ring is uint8 and page-locked: each finished slot is copied to the GPU on a side
stream (``non_blocking``), the slot is handed to a worker again only after that copy's event
completed, and the device normalises (``base.to_device_normalized``) in the training stream.
On a CPU device the workers normalise too, into a float32 ring, and the batch handed out *is*
the slot (a lease: the slot returns once the consumer drops the batch; one that keeps more than
``LEASES`` gets copies). Normalising a 19 MB float batch in the training process cost 8-16
us/image on the 2-core box, which is what kept 2 workers at 1.5x one worker there; in the
workers it costs the training process nothing, and the image is still in cache: ~7 us/image
compiled with numba, ~12 with numpy (``packed_fill``). The decoder mirrors a sample while
copying it out (~2 us, in the worker).

Overlap: ``workers + batches_ahead`` batches are in flight: every worker has a batch to decode
while ``batches_ahead`` finished ones wait.

``loader.decoder: nvjpeg`` (CUDA + torchvision): the training process gathers zero-copy views
of the batch's JPEG bytes and nvJPEG decodes the whole batch in one call, on the side stream.
"""
from __future__ import annotations

import collections
from typing import Deque, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .base import (
    BaseLoader,
    affine_f32,
    check_num_classes,
    epoch_plan,
    quasi_window_pages,
    to_device_normalized,
)
from .corrupt import CorruptLog, Skipped, decode_or_replace
from .decode import decode_raw, nvjpeg_decode_batch, nvjpeg_decode_one, require_nvjpeg
from .packed_fill import NORM_CHUNK, PackedBatchFiller
from .packed_format import FMT_RAW, PackedFile
from .workers import SharedRing, WorkerPool

__all__ = ["LEASES", "NORM_CHUNK", "PackedBatchFiller", "PackedLoader"]

# Batches a consumer may hold as zero-copy views of the ring on a CPU device: ``for x, y in
# loader`` still holds batch s while it asks for s + 1, and one more is slack for a stray
# reference (a loop variable left from an earlier epoch: with 2, every other batch was copied).
# A consumer keeping more (a list of batches) gets copies from then on, so the ring never runs
# out of slots.
LEASES = 3


class PackedLoader(BaseLoader):
    """``(images float32 [b, 3, H, W], labels int64 [b])`` on ``device`` from a packed file."""

    def __init__(self, data, opts, **common):
        super().__init__(data, opts, **common)
        self.file = PackedFile(data.ffcv_file)
        self.source = str(self.file.path)
        s = self.image_size
        if self.file.image_size != (s, s):
            raise ValueError(f"{self.source} holds {self.file.image_size[0]}x"
                             f"{self.file.image_size[1]} images but data.image_size={s}")
        check_num_classes(data.num_classes, self.file.num_classes, self.source)
        self.num_samples, self.num_classes = self.file.num_samples, self.file.num_classes
        self._check_enough(self.source)
        self.decoder = opts.decoder
        self._nvjpeg = self.decoder == "nvjpeg"
        cuda = self.device.type == "cuda"
        if self._nvjpeg:
            if not cuda:
                raise ValueError(f"loader.decoder=nvjpeg needs a CUDA device, got {self.device}; "
                                 f"use loader.decoder=simplejpeg or cv2")
            require_nvjpeg()  # fail now, with the install hint, not mid-epoch
            self.fill = None
        # On a CPU device the decode workers normalise (float32 ring, zero-copy batches handed
        # out by lease); for a GPU the ring stays uint8 (4x fewer bytes to copy) and the device
        # normalises.
        self._host_float = not self._nvjpeg and self.device.type == "cpu"
        if not self._nvjpeg:
            normalize = affine_f32(self.mean, self.std) if self._host_float else None
            self.fill = PackedBatchFiller(self.file, self.decoder, self.on_corrupt, normalize)
        self.workers = 0 if self._nvjpeg else opts.workers
        self.in_flight = self.workers + opts.batches_ahead if self.workers else 1
        # Slots: in flight, plus one so that a new batch goes into the slot of batch s - 1,
        # whose device copy was queued a whole training step ago; on the CPU instead plus the
        # LEASES batches a training loop still holds when it asks for the next one.
        slots = self.in_flight + (LEASES if self._host_float else 1)
        self._ring = None if self._nvjpeg else SharedRing(
            slots, self.batch_size, (s, s), np.float32 if self._host_float else np.uint8)
        self._pin = cuda and opts.pin_memory
        self._events: List[Optional[torch.cuda.Event]] = [None] * slots
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._pool: Optional[WorkerPool] = None  # forked at the first iteration, then reused
        self.corrupt = CorruptLog(self.source)
        self._labels, self._fmt, self._keys = (self.file.meta[k] for k in ("label", "fmt", "key"))
        per_page = self.num_samples / max(1, int(self.file.header["num_pages"]))
        self.window_pages = quasi_window_pages(per_page, self.batch_size * self.world_size)

    def plan(self):
        """This rank's ``EpochPlan`` for the current epoch."""
        quasi = self.opts.order == "quasi_random"
        return epoch_plan(self.num_samples, self.seed, self.epoch, self.rank, self.world_size,
                          self.batch_size, order=self.opts.order,
                          page_of=self.file.page_of if quasi else None,
                          window_pages=self.window_pages, train=self.train)

    # ------------------------------------------------------------------ host side
    def _acquire(self) -> Optional[int]:
        """A free ring slot (None: every slot is in flight or held by the consumer)."""
        slot = self._ring.acquire()
        if slot is not None and self._events[slot] is not None:
            # Host sync on the side stream only: the free list is FIFO, so this slot's copy to
            # the device was queued at least one training step ago and is almost always done.
            self._events[slot].synchronize()
        return slot

    def _decode_inline(self, plan, step: int) -> int:
        slot = self._acquire()  # never None: at most LEASES are held, the rest are free
        try:
            self.corrupt.record(self.fill(*plan.batch(step), self._ring.np_images[slot],
                                          self._ring.np_labels[slot]))
        except BaseException:  # a corrupt sample under on_corrupt=error: the slot stays usable
            self._ring.release(slot)
            raise
        return slot

    # ------------------------------------------------------------------ device side
    def _to_device(self, slot: int):
        """The slot's batch (already mirrored by the decoder) normalised on the device; the slot
        goes back to the free list (on the CPU: once the consumer drops the batch)."""
        images, labels = self._ring.images[slot], self._ring.labels[slot]
        if self._host_float:  # normalised by the decoder: hand the slot itself out
            lab = labels.clone()
            if self._ring.leased < LEASES:
                return self._ring.lease(slot), lab
            out = images.clone()  # the consumer keeps earlier batches: copy, keep the ring moving
            self._ring.release(slot)
            return out, lab
        if self._copy_stream is None:  # another device without a copy stream
            out = (to_device_normalized(images, None, self.mean, self.std, self.device),
                   labels.to(self.device))
            self._ring.release(slot)
            return out
        with torch.cuda.stream(self._copy_stream):
            u8 = images.to(self.device, non_blocking=True)
            lab = labels.to(self.device, non_blocking=True)
            ev = self._events[slot] = self._events[slot] or torch.cuda.Event()
            ev.record(self._copy_stream)
        self._ring.release(slot)  # reused only after ev (see _acquire)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._copy_stream)  # device-side wait: no host sync
        for t in (u8, lab):
            t.record_stream(current)  # allocated on the side stream, used on the current one
        return to_device_normalized(u8, None, self.mean, self.std, self.device), lab

    def _nvjpeg_batch(self, indices: np.ndarray, flips_b: Optional[np.ndarray]):
        s = self.image_size
        jpeg_rows = [k for k, i in enumerate(indices.tolist()) if self._fmt[i] != FMT_RAW]
        bufs = [self.file.sample(int(indices[k])) for k in jpeg_rows]
        labels = torch.from_numpy(self._labels[indices].astype(np.int64))
        with torch.cuda.stream(self._copy_stream):  # decode off the training stream
            batch, failed = nvjpeg_decode_batch(bufs, (s, s), self.device)
            out = torch.empty((len(indices), 3, s, s), dtype=torch.uint8, device=self.device)
            out[jpeg_rows] = batch
            redo = [jpeg_rows[i] for i, _ in failed]
            redo += sorted(set(range(len(indices))) - set(jpeg_rows))
            skipped: List[Skipped] = []
            for k in redo:
                holder = {}

                def decode_at(j, holder=holder):
                    buf = self.file.sample(j)
                    if self._fmt[j] == FMT_RAW:
                        raw = np.empty((3, s, s), np.uint8)
                        decode_raw(buf, raw)
                        holder["img"] = torch.from_numpy(raw).to(self.device)
                    else:
                        holder["img"] = nvjpeg_decode_one(buf, (s, s), self.device)

                used, sk = decode_or_replace(int(indices[k]), self.num_samples, decode_at,
                                             lambda j: int(self._keys[j]), self.on_corrupt,
                                             self.source)
                out[k] = holder["img"]
                labels[k] = int(self._labels[used])
                skipped += sk
            lab = labels.to(self.device)
            f = torch.from_numpy(flips_b).to(self.device) if flips_b is not None else None
        self.corrupt.record(skipped)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._copy_stream)
        for t in (out, lab) + ((f,) if f is not None else ()):
            t.record_stream(current)
        return to_device_normalized(out, f, self.mean, self.std, self.device), lab

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        plan = self.rest_of_epoch(self.plan())  # from start_step on (a resumed epoch)
        steps = plan.steps
        if self._nvjpeg:
            for s in range(steps):
                indices, flips = plan.batch(s)
                yield self._nvjpeg_batch(indices, flips if self.train else None)
            return
        if not self.workers:
            if self._pin:
                self._ring.pin()
            for s in range(steps):
                yield self._to_device(self._decode_inline(plan, s))
            return
        if self._pool is not None and self._pool.broken:
            self._pool.close()
            self._pool = None
        if self._pool is None:
            for ev in self._events:  # no copy may still read the ring when it is unlocked
                if ev is not None:
                    ev.synchronize()
            self._ring.unpin()  # a page-locked ring would not be mapped in the new workers
            self._pool = WorkerPool(self.workers, self.fill, self._ring, "unpg-packed")
        if self._pin:
            self._ring.pin()
        pending: Deque[int] = collections.deque()  # slots of the submitted batches, in order
        submitted = 0

        def top_up() -> int:
            # Keep in_flight batches with the workers as far as free slots allow (the consumer
            # holds at most LEASES, so at least in_flight are free when nothing is pending).
            n = submitted
            while n < steps and len(pending) < self.in_flight:
                slot = self._acquire()
                if slot is None:
                    break
                self._pool.submit(n, slot, *plan.batch(n))
                pending.append(slot)
                n += 1
            return n

        try:
            for s in range(steps):
                submitted = top_up()
                # Re-raises a worker's exception (CorruptSampleError names file and key) here.
                self.corrupt.record(self._pool.result(s))
                out = self._to_device(pending.popleft())
                submitted = top_up()  # before yielding: the workers decode during the step
                yield out
        finally:
            # Stopped early or failed: wait for in-flight batches so their slots are free again.
            self._pool.drain()
            while pending:
                self._ring.release(pending.popleft())

    @property
    def worker_pids(self) -> List[int]:
        """Process ids of the decode workers (empty before the first iteration and with
        ``workers: 0``)."""
        return [p.pid for p in self._pool.procs] if self._pool is not None else []

    def close(self) -> None:
        """Stop the worker processes and release the ring and the file (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._ring is not None:
            self._ring.close()
        self.file.close()
