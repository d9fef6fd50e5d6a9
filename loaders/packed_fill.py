"""Batch filling for the packed (``ffcv``) loader: decode one batch of a packed file into
preallocated rows (uint8 planes for a GPU, normalised float32 for a CPU device), mirrored where
the plan says, applying ``loader.on_corrupt``. Runs in a decode worker process or inline.

Legend: b batch, 3 channels (RGB), H height, W width.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .corrupt import CORRUPT, Skipped, decode_or_replace
from .decode import cpu_decoder, cpu_hwc_decoder, decode_raw
from .fused_normalize import fused_normalizer
from .packed_format import FMT_RAW, PackedFile

# Images normalised together by a worker: 8 float32 112x112 images (1.2 MB) stay in a 2 MB L2,
# and numpy's per-call cost is paid once per 8 (measured: 8.6 against 9.8 us/image one by one).
NORM_CHUNK = 8


class PackedBatchFiller:
    """``fill(indices, flips, images_b3HW, labels_b) -> skipped``: decode one batch of a packed
    file into preallocated rows, mirrored where ``flips``, applying ``loader.on_corrupt`` (a
    replacement sample takes the flip of the position it fills). Runs in a worker or inline.

    With ``normalize=(scale_3, shift_3)`` (``base.affine_f32``) the rows are float32, normalised
    right after each decode while the image is still in the core's cache: with numba in one
    compiled pass from the decoder's interleaved pixels (``fused_normalize``, ~7 us/image on the
    2-core box), else with numpy, NORM_CHUNK images at a time (~12 us/image with the split).
    Either is far cheaper for the training process than normalising a 19 MB batch itself (8
    us/image alone, 16 under contention with the workers). ``fused=False`` forces numpy."""

    def __init__(self, file: PackedFile, decoder: str, on_corrupt: str,
                 normalize: Optional[Tuple[np.ndarray, np.ndarray]] = None, fused: bool = True):
        self.file, self.on_corrupt, self.source = file, on_corrupt, str(file.path)
        self.decode_jpeg = cpu_decoder(decoder)
        meta = file.meta
        self.fmt, self.labels, self.keys = meta["fmt"], meta["label"], meta["key"]
        self.shape_hw = file.image_size
        self.scale_3, self.shift_3 = normalize if normalize is not None else (None, None)
        self.fused = None
        if normalize is not None:
            self.scale, self.shift = (v.reshape(3, 1, 1) for v in normalize)
            self.decode_hwc, rgb = cpu_hwc_decoder(decoder)
            if fused and rgb:  # the kernel reads RGB (cv2 before 4.10 gives BGR: numpy path)
                self.fused = fused_normalizer()

    def key_of(self, j: int) -> int:
        return int(self.keys[j])

    def _decode_planes(self, buf: np.ndarray, raw: bool, out_3HW: np.ndarray, flip: bool) -> None:
        """One sample as uint8 planes."""
        (decode_raw if raw else self.decode_jpeg)(buf, out_3HW, flip)

    def _decode_row(self, buf: np.ndarray, raw: bool, row_3HW: np.ndarray, flip: bool) -> None:
        """One sample normalised into a float32 row (the compiled path)."""
        if raw:  # stored pixels (pack --raw): planes already, numpy normalises
            u8 = np.empty(row_3HW.shape, np.uint8)
            decode_raw(buf, u8, flip)
            self._normalize(u8, row_3HW)
        else:
            self.fused(self.decode_hwc(buf, self.shape_hw, flip), row_3HW, self.scale_3,
                       self.shift_3)

    def __call__(self, indices: np.ndarray, flips: np.ndarray, images_b3HW: np.ndarray,
                 labels_b: np.ndarray) -> List[Skipped]:
        skipped: List[Skipped] = []
        n = self.file.num_samples
        # Per-batch vectorised lookups (the per-image numpy scalar reads cost ~2 us/image).
        bufs, raw = self.file.samples(indices), (self.fmt[indices] == FMT_RAW).tolist()
        labels_b[:] = self.labels[indices]
        decode = self._decode_row if self.fused is not None else self._decode_planes
        # numpy normalisation: decode NORM_CHUNK images into a uint8 scratch (one per call:
        # thread-safe), then normalise them together while they are still in L2.
        u8 = (np.empty((NORM_CHUNK,) + images_b3HW.shape[1:], np.uint8)
              if self.scale_3 is not None and self.fused is None else None)
        b = len(indices)
        for k, (i, f) in enumerate(zip(indices.tolist(), flips.tolist())):
            out = images_b3HW[k] if u8 is None else u8[k % NORM_CHUNK]
            try:
                decode(bufs[k], raw[k], out, f)
            except CORRUPT:  # rare path: policy + replacement
                used, sk = decode_or_replace(
                    i, n, lambda j, o=out, f=f: decode(self.file.sample(j), self.fmt[j] == FMT_RAW,
                                                       o, f),
                    self.key_of, self.on_corrupt, self.source)
                labels_b[k] = self.labels[used]
                skipped += sk
            if u8 is not None and (k % NORM_CHUNK == NORM_CHUNK - 1 or k == b - 1):
                lo = k - k % NORM_CHUNK
                self._normalize(u8[:k + 1 - lo], images_b3HW[lo:k + 1])
        return skipped

    def _normalize(self, u8_n3HW: np.ndarray, out_n3HW: np.ndarray) -> None:
        # float32 pixel * scale + shift, the bits of base.to_device_normalized. Cast first, then
        # in place: numpy runs a mixed uint8 * float32 multiply through a casting buffer.
        np.copyto(out_n3HW, u8_n3HW)
        np.multiply(out_n3HW, self.scale, out=out_n3HW)
        np.add(out_n3HW, self.shift, out=out_n3HW)
