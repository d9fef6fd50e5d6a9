"""torch fallback loader: a ``DataLoader`` over the insightface rec itself (no preparation step).

A map-style ``RecDataset`` reads records by key through ``FaceRecIndex``'s memory map (forked or
pickled into workers, it re-maps lazily; the page cache is shared) and decodes with the same
decoder functions as the ffcv loader into one uint8 ``[B, 3, H, W]`` array per batch
(``__getitems__``: the whole batch in one call). ``_PlanSampler`` yields this rank's ``(index, mirror)`` of
the shared ``epoch_plan``; the workers mirror while decoding, the main process normalises on the
device (``base.to_device_normalized``). Worker exceptions (``on_corrupt: error``) propagate
through the ``DataLoader`` to the training loop. A damaged record (``CorruptRecordError``) is a
corrupt sample like an undecodable JPEG. Workers ignore SIGTERM/SIGINT
(``workers.ignore_stop_signals``): a signal to the process group must reach only the trainer.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from unpg.recordio import FaceRecIndex

from .base import (
    BaseLoader,
    check_num_classes,
    epoch_plan,
    quasi_window_pages,
    to_device_normalized,
)
from .corrupt import CORRUPT, CorruptLog, Skipped, decode_or_replace
from .decode import cpu_decoder
from .workers import ignore_stop_signals

REC_PAGE_SIZE = 1 << 20  # quasi_random over a rec: records grouped by 1 MiB of file offset


class RecDataset(Dataset):
    """Sample ``i`` = ``i``-th image of an insightface rec, decoded to uint8 ``[3, H, W]`` RGB."""

    def __init__(self, rec_dir: str, decoder: str, image_size: int, on_corrupt: str):
        self.rec_dir, self.decoder, self.on_corrupt = str(rec_dir), decoder, on_corrupt
        self.shape = (3, image_size, image_size)
        self.index = FaceRecIndex.open(rec_dir)
        self.source = self.index.rec.rec_path
        cpu_decoder(decoder)  # validate the name / optional package now, in the main process
        self._decode = None  # built lazily in each worker (closures do not pickle)

    def __len__(self) -> int:
        return len(self.index)

    def _key_of(self, j: int) -> int:
        return int(self.index.image_keys[j])

    def _decode_into(self, j: int, out: np.ndarray, flip: bool) -> int:
        if self._decode is None:
            self._decode = cpu_decoder(self.decoder)
        # CorruptRecordError (one damaged record) is a corrupt sample; any other RecordIOError
        # (a broken file) always raises.
        label, jpeg = self.index.read_image(j)
        self._decode(np.frombuffer(jpeg, np.uint8), out, flip)
        return label

    def _fill(self, items: Sequence[Tuple[int, bool]], out: np.ndarray,
              labels: np.ndarray) -> List[Skipped]:
        skipped: List[Skipped] = []
        n = len(self)
        for k, (i, flip) in enumerate(items):
            try:
                labels[k] = self._decode_into(i, out[k], flip)
            except CORRUPT:
                got = {}

                def decode_at(j, row=out[k], got=got, flip=flip):
                    got["label"] = self._decode_into(j, row, flip)

                _, sk = decode_or_replace(i, n, decode_at, self._key_of, self.on_corrupt,
                                          self.source)
                labels[k] = got["label"]
                skipped += sk
        return skipped

    def __getitems__(self, items: Sequence) -> Tuple[torch.Tensor, torch.Tensor, list]:
        """A whole batch; ``items`` are indices or ``(index, mirror)`` pairs (the plan sampler's)."""
        items = [(int(x[0]), bool(x[1])) if isinstance(x, tuple) else (int(x), False)
                 for x in items]
        images = torch.empty((len(items),) + self.shape, dtype=torch.uint8)
        labels = torch.empty(len(items), dtype=torch.int64)
        skipped = self._fill(items, images.numpy(), labels.numpy())
        return images, labels, skipped

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int, list]:
        out, labels = np.empty(self.shape, np.uint8)[None], np.empty(1, np.int64)
        skipped = self._fill([(int(i), False)], out, labels)
        return out[0], int(labels[0]), skipped


def _batch_as_is(batch):
    return batch  # __getitems__ already returns the collated (uint8 NCHW, int64, skipped) batch


class _PlanSampler(Sampler):
    """Yields ``(index, mirror)`` of the plan set by the loader before each epoch's iteration:
    the workers mirror while decoding (~2 us/image there, ~20 us in the training process)."""

    def __init__(self, length: int):
        self.length = length
        self.items: List[Tuple[int, bool]] = []

    def __iter__(self) -> Iterator[Tuple[int, bool]]:
        return iter(self.items)

    def __len__(self) -> int:
        return self.length


class TorchLoader(BaseLoader):
    """``(images float32 [b, 3, H, W], labels int64 [b])`` on ``device`` via torch's DataLoader."""

    def __init__(self, data, opts, **common):
        super().__init__(data, opts, **common)
        if opts.decoder == "nvjpeg":
            raise ValueError("loader.decoder=nvjpeg is supported by loader.name=ffcv (batched GPU "
                             "decode); the torch loader decodes in CPU workers: use simplejpeg or "
                             "cv2")
        self.dataset = RecDataset(data.rec, opts.decoder, self.image_size, self.on_corrupt)
        index = self.dataset.index
        self.source = self.dataset.source
        if index.image_size is not None and index.image_size != (self.image_size,) * 2:
            raise ValueError(f"{data.rec}/property says {index.image_size[0]}x"
                             f"{index.image_size[1]} images but data.image_size={self.image_size}")
        check_num_classes(data.num_classes, index.num_classes, self.source)
        self.num_samples, self.num_classes = len(index), index.num_classes
        self._check_enough(self.source)
        self.corrupt = CorruptLog(self.source)
        self._sampler = _PlanSampler(len(self) * self.batch_size)
        workers = opts.workers
        self._dl = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self._sampler, drop_last=True,
            num_workers=workers, collate_fn=_batch_as_is,
            pin_memory=self.device.type == "cuda" and opts.pin_memory,
            persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals if workers else None,
            prefetch_factor=opts.batches_ahead if workers > 0 else None)

    def _page_of(self) -> np.ndarray:
        rec = self.dataset.index.rec
        return rec.offsets[rec.positions(self.dataset.index.image_keys)] // REC_PAGE_SIZE

    def plan(self):
        """This rank's ``EpochPlan`` for the current epoch."""
        quasi = self.opts.order == "quasi_random"
        page_of = self._page_of() if quasi else None
        window = quasi_window_pages(self.num_samples / (np.unique(page_of).size if quasi else 1),
                                    self.batch_size * self.world_size)
        return epoch_plan(self.num_samples, self.seed, self.epoch, self.rank, self.world_size,
                          self.batch_size, order=self.opts.order, page_of=page_of,
                          window_pages=window, train=self.train)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        plan = self.rest_of_epoch(self.plan())  # from start_step on (a resumed epoch)
        # Read when the DataLoader iterator starts; flips are all False when not training.
        self._sampler.items = list(zip(plan.indices.tolist(), plan.flips.tolist()))
        for images, labels, skipped in self._dl:
            self.corrupt.record(skipped)
            yield (to_device_normalized(images, None, self.mean, self.std, self.device,
                                        layout="NCHW"),
                   labels.to(self.device, non_blocking=True))

    def close(self) -> None:
        """Shut the DataLoader's persistent workers down (dropping its iterator does it)."""
        self._dl = None
        self.dataset.index.close()
