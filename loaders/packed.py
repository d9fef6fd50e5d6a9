"""FFCV-style loader over a packed file (``unpg.loaders.packed_format``, made by ``unpg.tools.pack``).

The file is memory-mapped read-only, so every rank on a host shares one copy in the page cache.
Each rank follows the shared order contract (``base.epoch_plan``; ``random`` or ``quasi_random``
over the file's pages). A thread pool of ``loader.workers`` threads decodes (GIL-releasing
``cv2``/``simplejpeg``) straight into a ring of ``batches_ahead + 1`` uint8 ``[B, 3, H, W]``
buffers allocated once (pinned when the device is CUDA), keeping ``batches_ahead`` batches in
flight. On CUDA each finished buffer is copied to the GPU on a side stream and its slot is reused
only after that copy's event completes; on the CPU the same code runs without the stream. Flip
and normalisation happen on the device (``base.to_device_normalized``).

``loader.decoder: nvjpeg`` (CUDA + torchvision): the threads only gather the JPEG bytes and the
whole batch is decoded by nvJPEG on the GPU in one call.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Tuple

import numpy as np
import torch

from .base import (
    BaseLoader,
    check_num_classes,
    epoch_plan,
    quasi_window_pages,
    to_device_normalized,
)
from .corrupt import CorruptLog, Skipped, decode_or_replace
from .decode import (
    DecodeError,
    cpu_decoder,
    decode_raw,
    nvjpeg_decode_batch,
    nvjpeg_decode_one,
    require_nvjpeg,
)
from .packed_format import FMT_RAW, PackedFile


class _Slot:
    """One ring buffer: the uint8 batch, its labels and flips, and the event of its last copy."""

    def __init__(self, batch: int, hw: Tuple[int, int], pin: bool, with_images: bool):
        shape = (batch, 3, hw[0], hw[1]) if with_images else (0,)
        self.images = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        self.labels = torch.empty(batch, dtype=torch.int64, pin_memory=pin)
        self.flips = torch.empty(batch, dtype=torch.bool, pin_memory=pin)
        self.np_images, self.np_labels = self.images.numpy(), self.labels.numpy()
        self.np_flips = self.flips.numpy()
        self.event = None  # torch.cuda.Event of the last device copy out of this slot
        self.jpegs: List[np.ndarray] = []  # nvjpeg mode: the batch's encoded bytes


class FFCVLoader(BaseLoader):
    """``(images float32 [B, 3, H, W], labels int64 [B])`` on ``device`` from a packed file."""

    def __init__(self, cfg, rank: int, world_size: int, device, train: bool = True):
        super().__init__(cfg, rank, world_size, device, train)
        path = cfg.data.ffcv_file
        if not path:
            raise ValueError("loader.name=ffcv needs data.ffcv_file; create it with "
                             "python -m unpg.tools.pack --rec DATA_DIR --out FILE")
        self.file = PackedFile(path)
        self.source = str(self.file.path)
        s = self.image_size
        if self.file.image_size != (s, s):
            raise ValueError(f"{self.source} holds {self.file.image_size[0]}x"
                             f"{self.file.image_size[1]} images but data.image_size={s}")
        check_num_classes(cfg.data.num_classes, self.file.num_classes, self.source)
        self.num_samples, self.num_classes = self.file.num_samples, self.file.num_classes
        self._check_enough(self.source)
        self.decoder = cfg.loader.decoder
        self._nvjpeg = self.decoder == "nvjpeg"
        if self._nvjpeg:
            if self.device.type != "cuda":
                raise ValueError(f"loader.decoder=nvjpeg needs a CUDA device, got {self.device}; "
                                 f"use loader.decoder=cv2")
            require_nvjpeg()  # fail now, with the install hint, not mid-epoch
        else:
            self._decode_jpeg = cpu_decoder(self.decoder)
        self.workers, self.ahead = cfg.loader.workers, cfg.loader.batches_ahead
        cuda = self.device.type == "cuda"
        pin = cuda and cfg.loader.pin_memory
        self._ring = [_Slot(self.batch_size, (s, s), pin, not self._nvjpeg)
                      for _ in range(self.ahead + 1)]
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="unpg-ffcv") \
            if self.workers > 0 else None
        self.corrupt = CorruptLog(self.source)
        # Field views of the mapped metadata (zero-copy, shared through the page cache).
        meta = self.file.meta
        self._fmt, self._labels, self._keys = meta["fmt"], meta["label"], meta["key"]
        per_page = self.num_samples / max(1, int(self.file.header["num_pages"]))
        self.window_pages = quasi_window_pages(per_page, self.batch_size * self.world_size)

    # ------------------------------------------------------------------ plan and decoding
    def plan(self):
        """This rank's ``EpochPlan`` for the current epoch."""
        quasi = self.cfg.loader.order == "quasi_random"
        return epoch_plan(self.num_samples, self.seed, self.epoch, self.rank, self.world_size,
                          self.batch_size, order=self.cfg.loader.order,
                          page_of=self.file.page_of if quasi else None,
                          window_pages=self.window_pages, train=self.train)

    def _key_of(self, j: int) -> int:
        return int(self._keys[j])

    def _decode_cpu(self, j: int, out: np.ndarray) -> None:
        buf = self.file.sample(j)
        if self._fmt[j] == FMT_RAW:
            decode_raw(buf, out)
        else:
            self._decode_jpeg(buf, out)

    def _fill(self, slot: _Slot, indices: np.ndarray, flips: np.ndarray, lo: int) -> List[Skipped]:
        """Decode ``indices`` into rows ``lo...`` of ``slot`` (runs in a pool thread)."""
        if slot.event is not None:
            slot.event.synchronize()  # the previous device copy out of this slot must be done
        slot.np_flips[lo:lo + len(flips)] = flips
        skipped: List[Skipped] = []
        for k, i in enumerate(indices.tolist()):
            out = slot.np_images[lo + k]
            try:
                self._decode_cpu(i, out)
                used = i
            except DecodeError:  # rare path: policy + replacement
                used, sk = decode_or_replace(i, self.num_samples,
                                             lambda j, out=out: self._decode_cpu(j, out),
                                             self._key_of, self.on_corrupt, self.source)
                skipped += sk
            slot.np_labels[lo + k] = self._labels[used]
        return skipped

    def _gather(self, slot: _Slot, indices: np.ndarray, flips: np.ndarray, lo: int) -> List[Skipped]:
        """nvjpeg mode: collect zero-copy views of the encoded samples (and labels, flips). The
        previous copies out of this slot were blocking, so no event to wait for."""
        slot.np_flips[lo:lo + len(flips)] = flips
        for k, i in enumerate(indices.tolist()):
            slot.jpegs[lo + k] = self.file.sample(i)
            slot.np_labels[lo + k] = self._labels[i]
        return []

    def _submit(self, plan, step: int):
        slot = self._ring[step % len(self._ring)]
        indices, flips = plan.batch(step)
        if self._nvjpeg:
            slot.jpegs = [None] * len(indices)
        work = self._gather if self._nvjpeg else self._fill
        if self._pool is None:
            return [work(slot, indices, flips, 0)]
        # Chunks of a batch across the threads; a few per thread evens out slow samples.
        n_chunks = min(len(indices), 2 * self.workers)
        bounds = np.linspace(0, len(indices), n_chunks + 1).astype(int)
        return [self._pool.submit(work, slot, indices[a:b], flips[a:b], int(a))
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    # ------------------------------------------------------------------ device side
    def _decode_one_gpu(self, j: int) -> torch.Tensor:
        buf = self.file.sample(j)
        s = self.image_size
        if self._fmt[j] == FMT_RAW:
            out = np.empty((3, s, s), np.uint8)
            decode_raw(buf, out)
            return torch.from_numpy(out).to(self.device)
        return nvjpeg_decode_one(buf, (s, s), self.device)

    def _nvjpeg_batch(self, slot: _Slot, plan_indices: np.ndarray) -> torch.Tensor:
        s = self.image_size
        jpeg_rows = [k for k in range(len(slot.jpegs)) if self._fmt[plan_indices[k]] != FMT_RAW]
        batch, failed = nvjpeg_decode_batch([slot.jpegs[k] for k in jpeg_rows], (s, s), self.device)
        out = torch.empty((len(slot.jpegs), 3, s, s), dtype=torch.uint8, device=self.device)
        out[jpeg_rows] = batch
        is_jpeg = set(jpeg_rows)
        redo = [(jpeg_rows[i], reason) for i, reason in failed]
        redo += [(k, None) for k in range(len(slot.jpegs)) if k not in is_jpeg]
        skipped: List[Skipped] = []
        for k, _ in redo:
            holder = {}
            i = int(plan_indices[k])

            def decode_at(j, holder=holder):
                holder["img"] = self._decode_one_gpu(j)

            used, sk = decode_or_replace(i, self.num_samples, decode_at, self._key_of,
                                         self.on_corrupt, self.source)
            out[k] = holder["img"]
            slot.labels[k] = int(self._labels[used])
            skipped += sk
        self.corrupt.record(skipped)
        return out

    def _to_device(self, slot: _Slot, plan_indices: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        flips = slot.flips if self.train else None
        if self._nvjpeg:
            batch = self._nvjpeg_batch(slot, plan_indices)
            # Blocking copies: the gather threads refill this slot's labels and flips next.
            labels = slot.labels.to(self.device)
            flips = flips.to(self.device) if flips is not None else None
            images = to_device_normalized(batch, flips, self.mean, self.std, self.device,
                                          layout="NCHW")
            return images, labels
        if self._copy_stream is None:
            images = to_device_normalized(slot.images, flips, self.mean, self.std, self.device,
                                          layout="NCHW")
            return images, slot.labels.clone()
        # Side-stream copy from pinned memory; the slot is reusable once `event` completes.
        with torch.cuda.stream(self._copy_stream):
            u8 = slot.images.to(self.device, non_blocking=True)
            labels = slot.labels.to(self.device, non_blocking=True)
            f = slot.flips.to(self.device, non_blocking=True) if self.train else None
            if slot.event is None:
                slot.event = torch.cuda.Event()
            slot.event.record(self._copy_stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._copy_stream)
        for t in (u8, labels) + ((f,) if f is not None else ()):
            t.record_stream(current)  # allocated on the side stream, used on the current one
        return to_device_normalized(u8, f, self.mean, self.std, self.device, layout="NCHW"), labels

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan()
        steps, ahead = plan.steps, self.ahead
        inflight = {}
        try:
            for s in range(min(ahead, steps)):
                inflight[s] = self._submit(plan, s)
            for s in range(steps):
                if s + ahead < steps:
                    # Goes into the slot of batch s-1, which the consumer has finished with.
                    inflight[s + ahead] = self._submit(plan, s + ahead)
                for job in inflight[s]:  # re-raises a worker's exception here, in the training loop
                    self.corrupt.record(job.result() if self._pool is not None else job)
                del inflight[s]  # only now: on an error, `finally` still waits for its other chunks
                slot = self._ring[s % len(self._ring)]
                yield self._to_device(slot, plan.batch(s)[0])
        finally:
            # Stopped early or failed: let in-flight work finish before the ring is reused.
            for jobs in inflight.values():
                for job in jobs:
                    if self._pool is not None and not job.cancel():
                        try:
                            job.result()
                        except Exception:  # abandoned work; the first error is raised already
                            pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.file.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
