"""Decoded image -> normalised batch row in one pass, compiled: interleaved uint8 RGB ``[H, W, 3]``
-> float32 planar ``[3, H, W]`` = ``pixel * scale + shift`` (``base.affine_f32``), the very
float32 operations of ``base.to_device_normalized`` (a multiply, then an add: the same bits).

Why (measured on the 2-core box, per 112x112 image written into the shared ring): the numpy
path — ``cv2.split`` to uint8 planes, a cast, a multiply and an add over float planes — costs
~12 us; this loop, which LLVM vectorises over the interleaved pixels, ~7 us. In a CPU-device
loader that is ~10 % of a worker's time per image (the decode itself is ~57 us). It is FFCV's
approach (numba, ``nogil``), applied to the step after libjpeg-turbo.

numba is optional (``pip install 'unpg[fast]'``): ``fused_normalizer()`` is None without it and
the loader keeps the numpy path. The kernel is compiled once per process (cached on disk where
the package folder is writable); the loader compiles it before forking its workers.

Legend: H height, W width, 3 channels (RGB).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

log = logging.getLogger("unpg.loaders")
_COMPILED: dict = {}


def hwc_to_planar_normalized(src_n, out_n, plane, scale_3, shift_3):
    """``out_n[c * plane + p] = float32(src_n[3 p + c]) * scale_3[c] + shift_3[c]`` for the
    ``plane = H * W`` pixels (flat views). Plain Python: numba compiles it; tests run it as is."""
    s0, s1, s2 = scale_3[0], scale_3[1], scale_3[2]
    h0, h1, h2 = shift_3[0], shift_3[1], shift_3[2]
    for p in range(plane):
        q = 3 * p
        out_n[p] = np.float32(src_n[q]) * s0 + h0
        out_n[plane + p] = np.float32(src_n[q + 1]) * s1 + h1
        out_n[2 * plane + p] = np.float32(src_n[q + 2]) * s2 + h2


def fused_normalizer() -> Optional[Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]]:
    """``normalize(hwc uint8 [H, W, 3], out float32 [3, H, W], scale_3, shift_3)`` compiled with
    numba (``nogil``), or None when numba is not installed or cannot compile it here (logged)."""
    if "kernel" not in _COMPILED:
        _COMPILED["kernel"] = _compile()
    return _COMPILED["kernel"]


def _compile():
    try:
        import numba
    except ImportError:
        return None
    # No fastmath: it would let LLVM fuse the multiply and the add (different rounding).
    try:
        kernel = numba.njit(nogil=True, cache=True, boundscheck=False)(hwc_to_planar_normalized)
    except RuntimeError:  # no writable cache location: compile in memory each run
        kernel = numba.njit(nogil=True, boundscheck=False)(hwc_to_planar_normalized)

    def normalize(hwc: np.ndarray, out: np.ndarray, scale_3: np.ndarray,
                  shift_3: np.ndarray) -> None:
        if not out.flags.c_contiguous:  # reshape would copy: the result would be lost
            raise ValueError(f"the normalised row must be C-contiguous, got strides {out.strides}")
        kernel(hwc.reshape(-1), out.reshape(-1), out.shape[1] * out.shape[2], scale_3, shift_3)

    try:  # compile now, not in the first batch
        normalize(np.zeros((2, 2, 3), np.uint8), np.empty((3, 2, 2), np.float32),
                  np.ones(3, np.float32), np.zeros(3, np.float32))
    except Exception as e:  # a numba/LLVM that cannot build it: the numpy path still works
        log.warning("numba could not compile the loader's normalisation (%s: %s); using numpy",
                    type(e).__name__, e)
        return None
    return normalize
