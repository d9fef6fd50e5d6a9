"""Process-wide settings a training entry point applies before it allocates anything large.

``tune_cpu_allocator``: glibc returns every freed block above the mmap threshold (128 KiB to
32 MiB, adapting) to the kernel, so each training step on the CPU re-faults its activation
buffers page by page (hundreds of MB per step: the time shows up as system time). Keeping up to
1 GiB in the heap instead made a MobileFaceNet step on 2 cores about 40 % faster here. No-op
off glibc; CUDA runs do not need it (the caching allocator already reuses device memory).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_BYTES = 1 << 30


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds to 1 GiB (and pad heap growth); True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES), mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES),
                mallopt(_M_TOP_PAD, 256 << 20)])
