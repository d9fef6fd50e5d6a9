"""NVIDIA DALI loader over a prepared rec folder (``python -m unpg.tools.prepare_dali``).

Pipeline: ``fn.readers.mxnet`` (sharded by ``shard_id/num_shards``) -> ``fn.decoders.image``
(``device='mixed'`` on CUDA: nvJPEG, using the hardware JPEG decoder where the GPU has one;
``'cpu'``: libjpeg-turbo) -> ``fn.crop_mirror_normalize`` (mean/std of ``data.normalize``, mirror
from ``fn.random.coin_flip`` when training) -> ``DALIGenericIterator``. ``loader.decoder`` is not
used: DALI brings its own decoders. ``loader.workers`` is DALI's ``num_threads`` and
``loader.batches_ahead`` its ``prefetch_queue_depth``.

Sample order — what DALI gives, honestly. DALI's reader cannot follow ``base.epoch_plan``: it
reads its shard of the records in file order and shuffles only inside a buffer of ``initial_fill``
records. So, for epoch ``e`` and rank ``r``:

* the records are prepare_dali's global shuffle (fixed for the prepared folder, by ``--seed``);
* rank ``r`` reads DALI shard ``(r + e) % world`` (a contiguous ``1/world`` of the records, so the
  shares rotate between epochs), shuffled inside a buffer of ``min(INITIAL_FILL, shard size)``
  records by a reader seed derived from ``(train.seed, e, r)``; flips come from a coin-flip seed
  derived the same way, so an epoch is reproducible from ``(seed, epoch)``;
* each rank yields exactly ``len(loader) = n // (world * B)`` batches (extra batches of a larger
  shard are not read).

What holds, as for the other backends: the ranks' shares of an epoch are disjoint and of equal
size, their union is ``world * len * B`` distinct samples (all of them when ``n`` divides), and
the order is reproducible. What differs: the order is not ``epoch_plan``'s permutation, and a
rank's share is a rotated contiguous block of the prepared order rather than a fresh random
subset each epoch. The pipeline is rebuilt at each epoch (so ``set_epoch`` can jump to any epoch);
that costs one pipeline build and buffer fill per epoch.

Bad data: DALI cannot skip an undecodable image; prepare_dali's verification drops corrupt records
beforehand (listed in the manifest). A decode error at run time stops with ``CorruptSampleError``
naming the file and key: DALI's message does not name the sample, so the loader then decodes the
rank's shard on the CPU to find it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Tuple

import numpy as np
import torch

from unpg.recordio import IndexedRecordIO, unpack

from .base import BaseLoader, check_num_classes, derived_seed, log
from .corrupt import CorruptSampleError
from .dali_layout import read_prepared
from .decode import DecodeError, strict_cpu_decoder
from .sources import check_source

INITIAL_FILL = 8192  # records in the reader's shuffle buffer (encoded JPEGs: ~60 MB at 7 KB each)
_STREAM_READER, _STREAM_FLIP = 31, 32


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ImportError("loader.name=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                          "(or nvidia-dali-cuda110 for CUDA 11); or use loader.name=ffcv/torch") from e
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


class DaliLoader(BaseLoader):
    """``(images float32 [B, 3, H, W], labels int64 [B])`` on ``device`` from DALI."""

    def __init__(self, data, opts, **common):
        super().__init__(data, opts, **common)
        if opts.order != "random":
            raise ValueError(f"loader.order={opts.order} is not available with loader.name="
                             f"dali: DALI reads its pre-shuffled shards with a shuffle buffer (see "
                             f"unpg.loaders.dali); use loader.order=random")
        directory = check_source(data, "dali")
        self.manifest = read_prepared(directory)
        self.source = self.manifest["directory"]
        _import_dali()  # fail here, with the install hint
        s = self.image_size
        if tuple(self.manifest["image_size"]) != (s, s):
            raise ValueError(f"{self.source}: prepared images are {self.manifest['image_size']}, "
                             f"data.image_size={s}")
        check_num_classes(data.num_classes, self.manifest["num_classes"], self.source)
        self.num_samples = int(self.manifest["num_images"])
        self.num_classes = int(self.manifest["num_classes"])
        self._check_enough(self.source)
        if not self.manifest["verified"] and self.on_corrupt == "skip":
            log.warning("%s was prepared with --no-verify: DALI cannot skip a corrupt JPEG at run "
                        "time, one would stop training with an error", self.source)

    def shard_of(self, epoch: int) -> int:
        """The DALI shard this rank reads in ``epoch``."""
        return (self.rank + epoch) % self.world_size

    def _pipeline(self, epoch: int):
        fn, pipeline_def, types, _, _ = _import_dali()
        cuda = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if cuda else None
        shard_size = self.num_samples // self.world_size
        reader_seed = derived_seed(self.seed, epoch, self.rank, _STREAM_READER)
        flip_seed = derived_seed(self.seed, epoch, self.rank, _STREAM_FLIP)

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.opts.workers),
                      device_id=device_id, prefetch_queue_depth=self.opts.batches_ahead,
                      seed=derived_seed(self.seed, epoch, self.rank))
        def pipe():
            jpegs, labels = fn.readers.mxnet(
                path=self.manifest["rec_paths"], index_path=[self.manifest["index_path"]],
                shard_id=self.shard_of(epoch), num_shards=self.world_size, stick_to_shard=True,
                random_shuffle=True, initial_fill=max(1, min(INITIAL_FILL, shard_size)),
                pad_last_batch=False, seed=reader_seed, name="Reader")
            images = fn.decoders.image(jpegs, device="mixed" if cuda else "cpu",
                                       output_type=types.RGB)
            mirror = fn.random.coin_flip(probability=0.5, seed=flip_seed) if self.train else 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=list(self.mean), std=list(self.std),
                                              mirror=mirror)
            return images, labels.gpu() if cuda else labels

        p = pipe()
        p.build()
        return p

    def _shard_records(self, shard: int) -> List[Tuple[str, int]]:
        """``(rec path, key)`` of the records DALI shard ``shard`` holds, in DALI's order (offset
        order over the concatenated files; shard bounds as DALI computes them)."""
        records = []
        for path in self.manifest["rec_paths"]:
            with IndexedRecordIO(path[:-4] + ".idx", path, "r") as rec:
                order = np.argsort(rec.offsets, kind="stable")
                records += [(path, int(k)) for k in rec.key_array[order].tolist()]
        n = len(records)
        return records[n * shard // self.world_size: n * (shard + 1) // self.world_size]

    def _find_corrupt(self, shard: int) -> List[Tuple[str, int, str]]:
        """DALI's decode errors do not name the sample: decode the shard on the CPU to find it."""
        decode = strict_cpu_decoder()
        shape = (3, self.image_size, self.image_size)
        readers = {p: IndexedRecordIO(p[:-4] + ".idx", p, "r") for p in self.manifest["rec_paths"]}

        def check(item):
            path, key = item
            _, jpeg = unpack(readers[path].read_idx(key))
            try:
                decode(np.frombuffer(jpeg, np.uint8), np.empty(shape, np.uint8))
            except DecodeError as e:
                return path, key, str(e)
            return None

        records = self._shard_records(shard)
        try:
            with ThreadPoolExecutor(max(1, self.opts.workers)) as pool:
                for lo in range(0, len(records), 4096):  # stop at the first chunk with a hit
                    bad = [r for r in pool.map(check, records[lo:lo + 4096]) if r is not None]
                    if bad:
                        return bad
        finally:
            for r in readers.values():
                r.close()
        return []

    def _explain(self, err: Exception) -> RuntimeError:
        """DALI's error, with the file and record key of the bad sample when one is found."""
        first = str(err).strip().splitlines()
        said = " ".join(line.strip() for line in first if "nvImageCodec" in line or "rror" in line)
        bad = self._find_corrupt(self.shard_of(self.epoch)) if "decoders.image" in str(err) else []
        if bad:
            path, key, reason = bad[0]
            return CorruptSampleError(
                f"{path}: record key {key} is corrupt ({reason}); DALI cannot skip it. Drop corrupt "
                f"records with prepare_dali's verification (re-run it without --no-verify). "
                f"DALI said: {said or first[:1]}")
        return RuntimeError(f"{self.source}: DALI pipeline failed: {said or err}")

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        _, _, _, DALIGenericIterator, LastBatchPolicy = _import_dali()
        try:
            pipe = self._pipeline(self.epoch)
            it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                                     last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        except RuntimeError as e:
            raise self._explain(e) from e
        # DALI's reader cannot seek: a resumed epoch reads and drops its first start_step batches
        # (the trainer only counts what it is given).
        skip = self.take_start_step()
        try:
            for step in range(len(self)):
                try:
                    out = next(it)[0]
                except StopIteration:
                    raise RuntimeError(f"{self.source}: DALI shard {self.shard_of(self.epoch)} "
                                       f"ended before {len(self)} batches") from None
                except RuntimeError as e:
                    raise self._explain(e) from e
                if step < skip:
                    continue
                # The iterator refills the same output tensors at the next step: hand out copies.
                images = out["images"].to(self.device, copy=True)
                labels = out["labels"].view(-1).to(self.device, torch.int64, copy=True)
                yield images, labels
        finally:
            del it, pipe  # release the pipeline's threads and buffers now
