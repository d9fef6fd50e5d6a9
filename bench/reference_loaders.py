"""The loaders ``bench/throughput.py`` compares ours against: the official code's per-sample
``DataLoader`` (``seed``) and the packed loader's former design, its batch code on threads of the
training process (``ffcv_threads``)."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from unpg.loaders import epoch_plan, to_device_normalized
from unpg.loaders.packed import PackedBatchFiller
from unpg.loaders.packed_format import PackedFile

from unpg.config import NORMALIZE_MEAN_STD
from unpg.recordio import FaceRecIndex


class SeedDataset(torch.utils.data.Dataset):
    """The official per-sample path: PIL decode, bicubic resize, random flip, ToTensor, Normalize."""

    def __init__(self, rec_dir: str):
        self.index = FaceRecIndex.open(rec_dir)
        mean, std = NORMALIZE_MEAN_STD["imagenet"]
        self.mean = torch.tensor(mean).view(3, 1, 1) / 255
        self.std = torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        label, jpeg = self.index.read_image(i)
        img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((112, 112), Image.BICUBIC)
        if torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, label


class SeedLoader(torch.utils.data.DataLoader):
    """The official code's ``DataLoader`` (shuffle, per-sample) with ``set_epoch``/``close``."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass  # its persistent workers end with the object


class ThreadedPackedLoader:
    """The design the packed loader replaced, for comparison: the same batch code
    (``PackedBatchFiller``) run by threads of the training process instead of processes."""

    def __init__(self, args, paths, workers: int, batch: int):
        self.file = PackedFile(paths["pack"])
        self.fill = PackedBatchFiller(self.file, args.decoder, "skip")
        self.workers, self.batch, self.device, self.epoch = max(1, workers), batch, args.device, 0
        self.pool = ThreadPoolExecutor(self.workers)  # decode chunks
        self.ahead_pool = ThreadPoolExecutor(1)  # whole batches ahead (never waits on itself)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batch(self, indices: np.ndarray, flips: np.ndarray):
        images = np.empty((len(indices), 3, 112, 112), np.uint8)
        labels = np.empty(len(indices), np.int64)
        bounds = np.linspace(0, len(indices), 2 * self.workers + 1).astype(int)
        list(self.pool.map(lambda a, b: self.fill(indices[a:b], flips[a:b], images[a:b],
                                                  labels[a:b]), bounds[:-1], bounds[1:]))
        return torch.from_numpy(images), torch.from_numpy(labels)

    def __iter__(self):
        plan = epoch_plan(len(self.file), 0, self.epoch, 0, 1, self.batch)
        ahead = [self.ahead_pool.submit(self._batch, *plan.batch(s)) for s in range(2)]
        for s in range(plan.steps):
            images, labels = ahead.pop(0).result()
            if s + 2 < plan.steps:
                ahead.append(self.ahead_pool.submit(self._batch, *plan.batch(s + 2)))
            yield to_device_normalized(images, None, *NORMALIZE_MEAN_STD["insightface"],
                                       self.device), labels

    def close(self) -> None:
        self.ahead_pool.shutdown()
        self.pool.shutdown()
