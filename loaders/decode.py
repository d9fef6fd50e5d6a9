"""Image decoding into preallocated uint8 ``[3, H, W]`` (planar RGB) buffers, shared by every loader,
and the project's one definition of a corrupt JPEG (``verify_jpeg``).

Corrupt means: the structural check (``check_jpeg``: header segments up to the scan, an
end-of-image marker at the end) fails, or a full decode fails, *including* libjpeg's warnings.
libjpeg reports damage inside the entropy-coded data ("Corrupt JPEG data: N extraneous bytes
before marker", "Premature end of data segment", bad Huffman codes) only as warnings and returns
an image with garbage blocks; it "recovers" from truncation the same way. OpenCV cannot report
those warnings at all and PIL ignores them, so the strict check decodes with ``simplejpeg``
(libjpeg-turbo with ``strict=True``: warnings become errors; it releases the GIL and is faster
than ``cv2.imdecode`` at 112x112: ~78 vs ~98 us, bit-identical pixels). It is a core dependency.

Loader decoders (``loader.decoder``):

* ``simplejpeg`` (default): strict, the same check as ``verify_jpeg`` while decoding, so
  ``loader.on_corrupt`` applies to entropy damage too.
* ``cv2``: lenient: entropy damage decodes with artefacts (as in MXNet and insightface's
  arcface_torch); structural damage and truncation are still caught by ``check_jpeg``.
* ``nvjpeg``: whole batches on the GPU via ``torchvision.io.decode_jpeg(device='cuda')``
  (imported only when chosen).

A sample that cannot be decoded raises ``DecodeError`` with the reason; the loaders turn it into
a skip or an error naming file and key (``unpg.loaders.corrupt``).

Legend: 3 channels (RGB, planar ``[3, H, W]`` written ``_3HW``), H height, W width.
"""
from __future__ import annotations

import struct
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

DECODERS = ("cv2", "simplejpeg", "nvjpeg")
Decoder = Callable[..., None]  # decode(buf, out_3HW, flip=False): flip mirrors left-right
HwcDecoder = Callable[..., np.ndarray]  # decode_hwc(buf, (H, W), flip=False) -> uint8 [H, W, 3]
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_EOI_TAIL = 64  # EOI must lie this close to the end (some writers pad a few bytes after it)


class DecodeError(ValueError):
    """One sample could not be decoded into the expected image; the message says why."""


def _walk_header(buf) -> Tuple[int, int, int]:
    """(height, width, components) after checking the marker segments from SOI to the first SOS:
    each segment must start with 0xFF, stay inside the data, and a frame header (SOF) must come
    before the scan. Raises ``DecodeError`` saying what is wrong."""
    b = memoryview(buf).cast("B")
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        raise DecodeError(f"not a JPEG (starts with {bytes(b[:4]).hex()!r}, expected ffd8)")
    pos, frame = 2, None
    while True:
        if pos + 4 > n:
            raise DecodeError(f"header segments run past the end ({n} bytes) before the scan")
        if b[pos] != 0xFF:
            raise DecodeError(f"corrupt header: byte 0x{b[pos]:02x} at offset {pos} where a "
                              f"marker should start")
        marker = b[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0x00):
            raise DecodeError(f"corrupt header: marker 0xff{marker:02x} at offset {pos} before the scan")
        (length,) = struct.unpack_from(">H", b, pos + 2)
        if length < 2 or pos + 2 + length > n:
            raise DecodeError(f"corrupt header: segment 0xff{marker:02x} at offset {pos} has "
                              f"length {length} in {n} bytes")
        if marker in _SOF:
            if length < 8:
                raise DecodeError(f"corrupt frame header at offset {pos}")
            h, w = struct.unpack_from(">HH", b, pos + 5)
            frame = (h, w, b[pos + 9])
        if marker == 0xDA:
            if frame is None:
                raise DecodeError("JPEG scan without a frame header (SOF)")
            return frame
        pos += 2 + length


def jpeg_header(buf) -> Optional[Tuple[int, int, int]]:
    """(height, width, components) from a JPEG's frame header, or None when the header segments
    are not a valid JPEG. Reads only the headers (no decoding)."""
    try:
        return _walk_header(buf)
    except DecodeError:
        return None


def check_jpeg(buf) -> None:
    """Structural check before decoding: valid header segments up to the scan, and an EOI marker
    at the end (truncation). Raises ``DecodeError``."""
    _walk_header(buf)
    b = memoryview(buf).cast("B")
    if bytes(b[-_EOI_TAIL:]).rfind(b"\xff\xd9") < 0:
        raise DecodeError(f"truncated JPEG: no end-of-image marker in the last {_EOI_TAIL} "
                          f"bytes of {len(b)}")


def _check_shape(img: Optional[np.ndarray], shape_hw: Sequence[int], what: str) -> np.ndarray:
    if img is None:
        raise DecodeError(f"{what} could not decode it")
    want = (shape_hw[0], shape_hw[1], 3)
    if img.shape != want:
        raise DecodeError(f"decoded to {'x'.join(map(str, img.shape))}, expected "
                          f"{'x'.join(map(str, want))} (images must be aligned crops of "
                          f"data.image_size)")
    return img


def _cv2_hwc_decoder() -> Tuple[HwcDecoder, bool]:
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10
    flag = rgb_flag if rgb_flag is not None else cv2.IMREAD_COLOR

    def decode_hwc(buf: np.ndarray, shape_hw: Tuple[int, int], flip: bool = False) -> np.ndarray:
        check_jpeg(buf)
        img = _check_shape(cv2.imdecode(buf, flag), shape_hw, "cv2.imdecode")
        return cv2.flip(img, 1) if flip else img

    return decode_hwc, rgb_flag is not None


def _require_simplejpeg():
    try:
        import simplejpeg
    except ImportError as e:
        raise ImportError("the strict JPEG decoder (loader.decoder=simplejpeg, the default, and "
                          "every corrupt-data check) needs the simplejpeg package: pip install "
                          "simplejpeg (or use loader.decoder=cv2, which cannot detect damaged "
                          "entropy data)") from e
    return simplejpeg


_VERIFY_SCRATCH = threading.local()


def verify_jpeg(buf, expect_hw: Optional[Tuple[int, int]] = None) -> None:
    """The one strict corrupt check: ``DecodeError(reason)`` unless ``buf`` is a JPEG whose
    headers are valid, that ends with an end-of-image marker and that decodes fully without a
    single libjpeg warning (damaged entropy data counts as corrupt). With ``expect_hw``, the
    image must also be ``(height, width)``. Thread-safe; releases the GIL while decoding."""
    simplejpeg = _require_simplejpeg()
    buf = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
    h, w, _ = _walk_header(buf)
    check_jpeg(buf)
    if expect_hw is not None and (h, w) != tuple(expect_hw):
        raise DecodeError(f"JPEG of {h}x{w}, expected {expect_hw[0]}x{expect_hw[1]} (images "
                          f"must be aligned crops of data.image_size)")
    scratch = getattr(_VERIFY_SCRATCH, "hwc", None)
    if scratch is None or scratch.shape != (h, w, 3):
        scratch = _VERIFY_SCRATCH.hwc = np.empty((h, w, 3), np.uint8)
    _strict_decode(simplejpeg, buf, scratch)


def _strict_decode(simplejpeg, buf: np.ndarray, hwc: np.ndarray) -> None:
    try:
        # strict=True turns libjpeg's corrupt-data warnings into errors.
        simplejpeg.decode_jpeg(buf, colorspace="RGB", buffer=hwc, strict=True)
    except ValueError as e:
        raise DecodeError(f"damaged JPEG data (libjpeg-turbo via simplejpeg): {e}") from None


def _simplejpeg_hwc_decoder() -> Tuple[HwcDecoder, bool]:
    simplejpeg = _require_simplejpeg()
    scratch = threading.local()  # interleaved HWC buffers per decoding thread

    def decode_hwc(buf: np.ndarray, shape_hw: Tuple[int, int], flip: bool = False) -> np.ndarray:
        check_jpeg(buf)
        shape = (shape_hw[0], shape_hw[1], 3)
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(buf)
            if (h, w, 3) != shape:
                _check_shape(np.empty((h, w, 3), np.uint8), shape_hw, "simplejpeg")
            hwc = getattr(scratch, "hwc", None)
            if hwc is None or hwc.shape != shape:
                hwc = scratch.hwc = np.empty(shape, np.uint8)
            _strict_decode(simplejpeg, buf, hwc)
        except ValueError as e:
            if isinstance(e, DecodeError):
                raise
            raise DecodeError(f"simplejpeg: {e}") from None
        if flip:  # mirrored while still interleaved: one cheap pass
            mirrored = getattr(scratch, "mirrored", None)
            if mirrored is None or mirrored.shape != shape:
                mirrored = scratch.mirrored = np.empty(shape, np.uint8)
            hwc = cv2.flip(hwc, 1, dst=mirrored)
        return hwc

    return decode_hwc, True


def cpu_hwc_decoder(name: str) -> Tuple[HwcDecoder, bool]:
    """``(decode_hwc, rgb)``: ``decode_hwc(buf, (H, W), flip=False)`` returns the interleaved
    uint8 ``[H, W, 3]`` image (mirrored left-right where ``flip``), RGB when ``rgb`` else BGR (cv2
    before OpenCV 4.10). The array may be a per-thread scratch buffer, valid until the thread's
    next call. Same checks and errors as ``cpu_decoder``."""
    _check_cpu_decoder_name(name)
    return _cv2_hwc_decoder() if name == "cv2" else _simplejpeg_hwc_decoder()


def _check_cpu_decoder_name(name: str) -> None:
    if name == "nvjpeg":
        raise ValueError("loader.decoder=nvjpeg decodes whole batches on the GPU; it is not a "
                         "per-sample CPU decoder (use cv2 or simplejpeg here)")
    if name not in ("cv2", "simplejpeg"):
        raise ValueError(f"loader.decoder must be one of {DECODERS}, got {name!r}")


def cpu_decoder(name: str) -> Decoder:
    """``decode(buf uint8 [n], out uint8 [3, H, W], flip=False)`` for ``loader.decoder``
    ``cv2|simplejpeg``; ``flip`` mirrors the image left-right (during the copy out, ~2 us).

    Output is planar RGB (CHW): the decoders' own output copy does the HWC -> CHW transpose
    (``cv2.split``, ~3 us/image) so the device step needs no layout change (a torch permute of a
    uint8 batch costs ~10 us/image on the CPU)."""
    decode_hwc, rgb = cpu_hwc_decoder(name)

    def decode(buf: np.ndarray, out_3HW: np.ndarray, flip: bool = False) -> None:
        img = decode_hwc(buf, out_3HW.shape[1:], flip)
        # BGR: the split reverses the channels for free
        cv2.split(img, [out_3HW[0], out_3HW[1], out_3HW[2]] if rgb else
                  [out_3HW[2], out_3HW[1], out_3HW[0]])

    return decode


def strict_cpu_decoder() -> Decoder:
    """``decode(buf, out_3HW)`` applying ``verify_jpeg``'s strictness (the ``simplejpeg`` decoder)."""
    return cpu_decoder("simplejpeg")


def decode_raw(buf: np.ndarray, out_3HW: np.ndarray, flip: bool = False) -> None:
    """Raw planar RGB pixels stored by ``pack --raw`` (``[3, H, W]``): a copy after a size check."""
    if buf.size != out_3HW.size:
        raise DecodeError(f"raw sample of {buf.size} bytes, expected {out_3HW.size} "
                          f"({'x'.join(map(str, out_3HW.shape))})")
    src = buf.reshape(out_3HW.shape)
    np.copyto(out_3HW, src[:, :, ::-1] if flip else src)


def require_nvjpeg():
    """``(torchvision.io.decode_jpeg, ImageReadMode.RGB)``; ImportError saying what to install."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:
        raise ImportError("loader.decoder=nvjpeg needs torchvision with GPU JPEG decoding "
                          "(torchvision.io.decode_jpeg(device='cuda')); install torchvision "
                          "matching your torch, or use loader.decoder=cv2") from e
    return decode_jpeg, ImageReadMode.RGB


def _check_for_nvjpeg(buf: np.ndarray, shape_hw: Tuple[int, int]) -> None:
    check_jpeg(buf)
    hdr = jpeg_header(buf)
    if hdr[:2] != tuple(shape_hw):
        raise DecodeError(f"JPEG of {hdr[0]}x{hdr[1]}, expected {shape_hw[0]}x{shape_hw[1]} "
                          f"(images must be aligned crops of data.image_size)")


def nvjpeg_decode_one(buf: np.ndarray, shape_hw: Tuple[int, int], device):
    """uint8 ``[3, H, W]`` on ``device`` for one JPEG; ``DecodeError`` when it does not decode."""
    decode_jpeg, rgb = require_nvjpeg()
    _check_for_nvjpeg(buf, shape_hw)
    try:
        return decode_jpeg(torch.from_numpy(np.asarray(buf)), mode=rgb, device=torch.device(device))
    except RuntimeError as e:
        raise DecodeError(f"nvjpeg: {e}") from None


def nvjpeg_decode_batch(bufs: Sequence[np.ndarray], shape_hw: Tuple[int, int], device):
    """``(batch uint8 [N, 3, H, W] on device, failed)``: one batched nvJPEG call.

    ``failed`` lists ``(i, reason)`` of samples that did not decode; their rows are left zero and
    the caller replaces them or raises (never uses them).
    """
    decode_jpeg, rgb = require_nvjpeg()
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"loader.decoder=nvjpeg decodes on a CUDA device, got device {dev}; "
                         f"use loader.decoder=cv2 on the CPU")
    h, w = shape_hw
    out = torch.zeros((len(bufs), 3, h, w), dtype=torch.uint8, device=dev)
    failed: List[Tuple[int, str]] = []
    good = []
    for i, b in enumerate(bufs):
        try:
            _check_for_nvjpeg(b, shape_hw)
            good.append(i)
        except DecodeError as e:
            failed.append((i, str(e)))
    tensors = [torch.from_numpy(np.asarray(bufs[i])) for i in good]
    try:
        images = decode_jpeg(tensors, mode=rgb, device=dev) if tensors else []
        for i, img in zip(good, images):
            out[i] = img
    except RuntimeError:
        # One bad sample fails the whole batched call: find it by decoding one at a time.
        for i in good:
            try:
                out[i] = nvjpeg_decode_one(bufs[i], shape_hw, dev)
            except DecodeError as e:
                failed.append((i, str(e)))
    return out, failed
