"""Bad data policy (``loader.on_corrupt``) shared by the torch and ffcv loaders.

A sample is corrupt when its JPEG fails the decoder's check (``DecodeError``; with the default
``simplejpeg`` decoder that is ``decode.verify_jpeg``'s strictness) or its record is damaged
(``unpg.recordio.CorruptRecordError``). Both are handled alike:

``error``: the first sample that does not decode stops the run with ``CorruptSampleError`` naming
the file, the record key and the reason (raised inside a worker, it propagates to the training
loop; nothing hangs).

``skip``: the sample is replaced by the next decodable sample of the *dataset* (index ``i + 1``,
``i + 2``, ... wrapping), label included, so batch shapes never change and nothing is a zero
image. The replacement rule depends only on the dataset, so every backend replaces alike; the
replacement may also be read elsewhere in the epoch (a duplicate). Decoders run in worker
threads/processes and report what they skipped with the batch; ``CorruptLog`` in the main
process counts every skip and logs each bad key once.
"""
from __future__ import annotations

import logging
from typing import Callable, List, NamedTuple, Tuple

from unpg.recordio import CorruptRecordError

from .decode import DecodeError

log = logging.getLogger("unpg.loaders")
MAX_CONSECUTIVE_CORRUPT = 64  # beyond this the data is broken, not a few bad samples
# A sample is corrupt when its image does not decode strictly or its record is damaged.
CORRUPT = (DecodeError, CorruptRecordError)


class CorruptSampleError(RuntimeError):
    """A sample did not decode and ``loader.on_corrupt`` is ``error``; names file and key."""


class Skipped(NamedTuple):
    index: int  # dataset index of the corrupt sample
    key: int  # its record key in the source file
    reason: str
    replaced_by: int  # dataset index used in its place


def decode_or_replace(i: int, n: int, decode_at: Callable[[int], None], key_of: Callable[[int], int],
                      on_corrupt: str, source: str) -> Tuple[int, List[Skipped]]:
    """Decode sample ``i`` with ``decode_at`` (which raises one of ``CORRUPT``); under ``skip``, try
    ``i + 1, i + 2, ...`` until one decodes. Returns ``(index used, skipped samples)``."""
    bad: List[Tuple[int, str]] = []
    for step in range(min(n, MAX_CONSECUTIVE_CORRUPT + 1)):
        j = (i + step) % n
        try:
            decode_at(j)
        except CORRUPT as e:
            if on_corrupt != "skip":
                raise CorruptSampleError(
                    f"{source}: record key {key_of(j)} (sample {j}) is corrupt: {_reason(e)}. Fix or drop "
                    f"the record, or set loader.on_corrupt=skip to replace corrupt samples") from None
            bad.append((j, _reason(e)))
            continue
        return j, [Skipped(k, key_of(k), reason, j) for k, reason in bad]
    keys = ", ".join(str(key_of(k)) for k, _ in bad[:8])
    raise CorruptSampleError(f"{source}: {len(bad)} consecutive samples starting at record key "
                             f"{key_of(i)} do not decode (keys {keys}...); the file looks broken: "
                             f"first error: {bad[0][1]}")


def _reason(e: Exception) -> str:
    if isinstance(e, CorruptRecordError):  # its message repeats the file and key
        return f"damaged record at byte offset {e.offset}: {e.reason}"
    return str(e)


class CorruptLog:
    """Main-process record of skipped samples: ``count`` skips in total, ``keys`` the distinct
    bad keys; each key is logged (warning) the first time it is seen."""

    def __init__(self, source: str):
        self.source, self.count, self.keys = source, 0, set()

    def record(self, skipped) -> None:
        for s in skipped:
            self.count += 1
            if s.key not in self.keys:
                self.keys.add(s.key)
                log.warning("%s: skipping corrupt record key %d (sample %d): %s; replaced by "
                            "sample %d (logged once per key)", self.source, s.key, s.index,
                            s.reason, s.replaced_by)
