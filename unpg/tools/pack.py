"""Pack a face dataset into one FFCV-style file for ``loader.name=ffcv``.

    python -m unpg.tools.pack --rec data/faces_emore --out data/faces_emore.unpgpack
    python -m unpg.tools.pack --images data/kface_aligned --out data/kface.unpgpack [--raw]

``--rec``: an insightface rec (train.rec/.idx/property); every image record's JPEG bytes are
copied as stored (no second lossy encode), in rec order, with their label and record key.
``--images``: a folder of identity subfolders (sorted names -> labels 0, 1, ...); JPEG files are
copied as they are once they pass ``unpg.loaders.decode.verify_jpeg`` (the one strict corrupt
check shared with the loaders, ``inspect`` and ``prepare_dali``), other formats (PNG, BMP...) are
stored as raw planar RGB pixels (lossless).
``--raw``: decode everything once and store raw pixels (bigger file, no decoding when loading).
The format (versioned header, metadata table, pages) is ``unpg.loaders.packed_format``; the file
is written under a temporary name and renamed when complete. An existing ``--out`` is replaced only
when it is a packed file (``--force`` replaces any file); this is checked before any work.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from unpg.fileio import claim_output_file
from unpg.loaders.decode import DecodeError, cpu_decoder, jpeg_header, verify_jpeg
from unpg.loaders.packed_format import (
    DEFAULT_PAGE_SIZE,
    FMT_JPEG,
    FMT_RAW,
    MAGIC,
    PackedWriter,
    check_page_size,
)
from unpg.recordio import CorruptRecordError, FaceRecIndex

log = logging.getLogger("unpg.tools.pack")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def parse_size(text: str) -> int:
    """``'1M'``, ``'8MiB'``, ``'65536'`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError(f"page size {text!r} is not a size like 1M, 8M or 1048576") from None


def _raw(jpeg: bytes, shape: Tuple[int, int, int]) -> np.ndarray:
    """Planar RGB pixels ``[3, H, W]`` (the packed format's raw layout) of a JPEG that passes the
    project's one strict check (libjpeg warnings count as corrupt: no garbage pixels stored)."""
    verify_jpeg(jpeg, shape[1:])
    out = np.empty(shape, np.uint8)
    cpu_decoder("cv2")(np.frombuffer(jpeg, np.uint8), out)
    return out


def _is_pack(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def check_output(out, force: bool = False) -> Path:
    """``out`` may be written: new, a packed file (replaced), or anything with ``force``."""
    return claim_output_file(out, "a packed file", force=force, ours=_is_pack)


def pack_rec(rec_dir, out, *, page_size: int = DEFAULT_PAGE_SIZE, raw: bool = False,
             on_corrupt: str = "error", progress: bool = True, force: bool = False) -> Dict[str, Any]:
    """Pack an insightface rec; returns a summary (counts, unreadable keys)."""
    check_page_size(page_size)
    check_output(out, force)
    with FaceRecIndex.open(rec_dir) as src:
        hw = tuple(src.image_size) if src.image_size else (112, 112)
        shape = (3, hw[0], hw[1])
        unreadable, dropped = [], []
        # Damaged records an image-only rec left out when it was opened (their label is unknown).
        for key, offset, reason in src.damaged:
            if not np.isin(key, src.image_keys):
                if on_corrupt == "error":
                    raise ValueError(f"{src.rec.rec_path}: record key {key} at byte offset {offset} is "
                                     f"damaged: {reason}; use --on-corrupt skip to drop it, or repair "
                                     f"the rec with python -m unpg.tools.inspect --repair")
                log.warning("dropping damaged record key %d (byte offset %d): %s", key, offset, reason)
                dropped.append(int(key))
        with PackedWriter(out, len(src), hw, page_size=page_size) as w:
            for i in tqdm(range(len(src)), desc="pack", unit="img", disable=not progress):
                key = int(src.image_keys[i])
                try:
                    label, jpeg = src.read_image(i)
                except CorruptRecordError as e:  # a damaged record: no bytes to store
                    if on_corrupt == "error":
                        raise ValueError(f"{e}; use --on-corrupt skip to drop it, or repair the rec "
                                         f"with python -m unpg.tools.inspect --repair") from None
                    log.warning("dropping damaged record: %s", e)
                    dropped.append(key)
                    continue
                if raw:
                    try:
                        pixels = _raw(jpeg, shape)
                    except DecodeError as e:
                        if on_corrupt == "error":
                            raise ValueError(f"{src.rec.rec_path}: record key {key} is corrupt: {e}; "
                                             f"use --on-corrupt skip to drop it") from None
                        log.warning("%s: dropping corrupt record key %d: %s", src.rec.rec_path, key, e)
                        dropped.append(key)
                        continue
                    w.add(pixels, label, fmt=FMT_RAW, height=hw[0], width=hw[1], key=key)
                    continue
                hdr = jpeg_header(jpeg)
                if hdr is None:
                    unreadable.append(key)  # stored as is; the loader applies loader.on_corrupt
                w.add(jpeg, label, fmt=FMT_JPEG, height=hdr[0] if hdr else 0,
                      width=hdr[1] if hdr else 0, key=key)
            w.close(src.num_classes)
        if unreadable:
            log.warning("%s: %d records are not readable JPEGs (keys %s...); packed as they are, "
                        "the loader skips or stops on them per loader.on_corrupt", rec_dir,
                        len(unreadable), unreadable[:8])
        return {"samples": w.n, "num_classes": src.num_classes, "unreadable": unreadable,
                "dropped": dropped, "out": str(out)}


def _list_images(root: Path):
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no identity subfolders (expected ROOT/<identity>/<image>)")
    items = []
    for label, d in enumerate(classes):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        items += [(f, label) for f in files]
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its subfolders")
    return classes, items


def pack_images(images_dir, out, *, image_size: int = 112, page_size: int = DEFAULT_PAGE_SIZE,
                raw: bool = False, on_corrupt: str = "error", progress: bool = True,
                force: bool = False) -> Dict[str, Any]:
    """Pack a folder of identity subfolders of aligned ``image_size`` face crops."""
    check_page_size(page_size)
    check_output(out, force)
    root = Path(images_dir)
    classes, items = _list_images(root)
    hw = (image_size, image_size)
    dropped = []
    with PackedWriter(out, len(items), hw, page_size=page_size) as w:
        for number, (path, label) in enumerate(tqdm(items, desc="pack", unit="img",
                                                     disable=not progress)):
            data = path.read_bytes()
            hdr = jpeg_header(data)
            try:
                if hdr is not None and not raw:
                    verify_jpeg(data, hw)  # the strict check: the loaders' definition of corrupt
                    w.add(data, label, fmt=FMT_JPEG, height=hw[0], width=hw[1], key=number)
                    continue
                bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise DecodeError("not a decodable image")
                if bgr.shape[:2] != hw:
                    raise DecodeError(f"{bgr.shape[0]}x{bgr.shape[1]} image")
                w.add(np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1)), label, fmt=FMT_RAW,
                      height=hw[0], width=hw[1], key=number)
            except DecodeError as e:
                msg = (f"{path}: {e}; expected a decodable {hw[0]}x{hw[1]} aligned face crop "
                       f"(align first, e.g. python -m unpg.tools.align_kface)")
                if on_corrupt == "error":
                    raise ValueError(msg + "; or use --on-corrupt skip") from None
                log.warning("dropping %s", msg)
                dropped.append(str(path))
        w.close(len(classes))
    return {"samples": w.n, "num_classes": len(classes), "dropped": dropped, "out": str(out),
            "classes": [c.name for c in classes]}


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m unpg.tools.pack",
                                 description="Pack a rec or an image folder into one page-aligned "
                                             "file for loader.name=ffcv (data.ffcv_file).")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--rec", help="insightface rec folder (train.rec, train.idx, property)")
    src.add_argument("--images", help="folder of identity subfolders of aligned face crops")
    ap.add_argument("--out", required=True, help="output file (an existing packed file is replaced)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out that is not a packed file")
    ap.add_argument("--page-size", default="1M", help="page size, power of two (default 1M; 8M "
                                                      "suits network file systems)")
    ap.add_argument("--raw", action="store_true", help="store decoded RGB pixels instead of JPEG")
    ap.add_argument("--image-size", type=int, default=112, help="--images: crop size (default 112)")
    ap.add_argument("--on-corrupt", choices=("error", "skip"), default="error",
                    help="an image that cannot be decoded where pack decodes (--raw, --images): "
                         "stop (default) or drop it")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        page = parse_size(a.page_size)
        if a.rec:
            summary = pack_rec(a.rec, a.out, page_size=page, raw=a.raw, on_corrupt=a.on_corrupt,
                               force=a.force)
        else:
            summary = pack_images(a.images, a.out, image_size=a.image_size, page_size=page,
                                  raw=a.raw, on_corrupt=a.on_corrupt, force=a.force)
    except (ValueError, OSError, ImportError) as e:  # ImportError: the strict check's simplejpeg
        ap.exit(2, f"pack: error: {e}\n")
    print(f"{a.out}: {summary['samples']} samples of {summary['num_classes']} classes "
          f"({os.path.getsize(a.out) / 2**20:.1f} MiB); use data.ffcv_file={a.out}")
    return summary


if __name__ == "__main__":
    main()
