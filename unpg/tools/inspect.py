"""Summarise (and optionally verify) an insightface face rec: counts, class sizes, image sizes.

    python -m unpg.tools.inspect --rec faces_emore [--verify] [--sample 1000] [--json FILE]

Prints a table of:
  - layout (header + identity records, or image-only), images, classes, the property file;
  - class sizes: min / median / mean / max and a histogram over buckets (0, 1, 2-4, 5-9, ...);
  - image sizes read from the JPEG frame headers (no decoding) of an evenly spaced sample of
    ``--sample`` images, or of every image with ``--verify``; count of sizes differing from
    the property file's;
  - with ``--verify``: every image is decoded (cv2) and its record structure read; a record is
    corrupt if it cannot be read, its label disagrees with the identity records, it is not
    JPEG/PNG, a JPEG lacks its end-of-image marker (truncated: libjpeg would pad it with grey and
    only warn), or it does not decode to the size its header promises. Corrupt keys are listed.

``--json FILE`` writes the same report as JSON (atomically). Exit status: 0, or 1 when
``--verify`` found corrupt records (2 for usage errors or an unreadable rec).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from unpg.fileio import atomic_write_json
from unpg.recordio import FaceRecIndex, RecordIOError
from unpg.tools.image2rec import jpeg_info
from unpg.tools.rec2image import image_extension

__all__ = ["BUCKETS", "format_report", "inspect_rec", "main"]

# Class-size histogram buckets [lo, hi) (hi None = unbounded).
BUCKETS: Tuple[Tuple[int, Optional[int]], ...] = (
    (0, 1), (1, 2), (2, 5), (5, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 500),
    (500, None))
_MAX_LISTED = 1000  # corrupt keys listed in the report (the count is always exact)


def _bucket_name(lo: int, hi: Optional[int]) -> str:
    if hi is None:
        return f"{lo}+"
    return str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"


def _class_sizes(counts: np.ndarray) -> Dict[str, Any]:
    if counts.size == 0:
        return {"min": 0, "median": 0.0, "mean": 0.0, "max": 0, "buckets": {}}
    buckets = {}
    for lo, hi in BUCKETS:
        sel = (counts >= lo) if hi is None else ((counts >= lo) & (counts < hi))
        buckets[_bucket_name(lo, hi)] = int(sel.sum())
    return {"min": int(counts.min()), "median": float(np.median(counts)),
            "mean": round(float(counts.mean()), 3), "max": int(counts.max()), "buckets": buckets}


def _has_eoi(data: bytes) -> bool:
    # Some encoders pad after the end-of-image marker; MXNet's records end exactly at FFD9.
    return data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _check(index: FaceRecIndex, i: int, verify: bool) -> Tuple[Optional[Tuple[int, int]], str, Optional[str]]:
    """(header (h, w) or None, kind 'jpeg'/'png'/'other', error or None) of image i."""
    try:
        _, data = index.read_image(i)
    except (RecordIOError, ValueError) as e:
        return None, "unreadable", str(e)
    ext = image_extension(data)
    if ext == ".jpg":
        info = jpeg_info(data)
        size, kind = (info[:2] if info else None), "jpeg"
        if info is None:
            return None, kind, "JPEG frame header is malformed or missing"
    elif ext == ".png":
        size, kind = None, "png"
        if len(data) >= 24:  # IHDR: width, height are the big-endian words at bytes 16 and 20
            size = (int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"))
    else:
        return None, "other", f"payload of {len(data)} bytes is not a JPEG or PNG"
    if not verify:
        return size, kind, None
    if kind == "jpeg" and not _has_eoi(data):
        return size, kind, "JPEG has no end-of-image marker (truncated)"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return size, kind, "does not decode"
    if size is not None and tuple(img.shape[:2]) != tuple(size):
        return size, kind, f"decodes to {img.shape[1]}x{img.shape[0]}, header says {size[1]}x{size[0]}"
    return size, kind, None


def inspect_rec(rec_dir: os.PathLike | str, *, verify: bool = False, sample: int = 1000,
                workers: int = 4, progress: bool = True) -> Dict[str, Any]:
    """The report dict for the face rec in ``rec_dir`` (see the module docstring)."""
    if sample < 0:
        raise ValueError(f"--sample must be >= 0, got {sample}")
    with FaceRecIndex.open(rec_dir) as index:
        n = len(index)
        counts = np.bincount(index.labels, minlength=index.num_classes)
        if verify or sample >= n:
            picks = np.arange(n)
        else:
            picks = np.unique(np.linspace(0, n - 1, sample).round().astype(np.int64)) if sample else \
                np.zeros(0, np.int64)
        sizes: Counter = Counter()
        kinds: Counter = Counter()
        corrupt: List[Tuple[int, str]] = []
        with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2.imdecode releases the GIL
            results = pool.map(lambda i: _check(index, int(i), verify), picks, chunksize=64)
            for i, (size, kind, err) in zip(picks, tqdm(results, total=len(picks), unit="img",
                                                         desc="inspect", disable=not progress)):
                kinds[kind] += 1
                if size is not None:
                    sizes[f"{size[1]}x{size[0]}"] += 1  # width x height, as image sizes are written
                if err is not None:
                    corrupt.append((int(index.image_keys[i]), err))
        prop = index.image_size
        expected = None if prop is None else f"{prop[1]}x{prop[0]}"
        report: Dict[str, Any] = {
            "rec": str(Path(rec_dir)),
            "layout": "header + identity records" if index.identity_ranges is not None else "image-only",
            "images": int(n),
            "classes": int(index.num_classes),
            "property_size": None if prop is None else [int(prop[0]), int(prop[1])],
            "class_sizes": _class_sizes(counts),
            "image_sizes": {
                "checked": int(len(picks)), "all": bool(len(picks) == n),
                "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
                "formats": dict(kinds),
                "differing_from_property": None if expected is None else
                int(sum(v for k, v in sizes.items() if k != expected)),
            },
            "verified": bool(verify),
            "corrupt": {"count": len(corrupt), "keys": [k for k, _ in corrupt[:_MAX_LISTED]],
                        "errors": {str(k): e for k, e in corrupt[:_MAX_LISTED]}},
        }
    return report


def format_report(r: Dict[str, Any]) -> str:
    """The report as an aligned plain-text table."""
    rows: List[Tuple[str, str]] = [
        ("rec", r["rec"]), ("layout", r["layout"]), ("images", f"{r['images']:,}"),
        ("classes", f"{r['classes']:,}"),
        ("property size (h, w)", "none" if r["property_size"] is None else str(tuple(r["property_size"]))),
    ]
    cs = r["class_sizes"]
    rows += [("class size min / median / mean / max",
              f"{cs['min']} / {cs['median']:g} / {cs['mean']:g} / {cs['max']}")]
    rows += [(f"  classes of size {k}", f"{v:,}") for k, v in cs["buckets"].items()]
    im = r["image_sizes"]
    rows += [(f"image sizes (w x h), {'all' if im['all'] else 'sample of'} {im['checked']:,}",
              ", ".join(f"{k}: {v:,}" for k, v in im["sizes"].items()) or "-")]
    rows += [("  formats", ", ".join(f"{k}: {v:,}" for k, v in im["formats"].items()) or "-")]
    if im["differing_from_property"] is not None:
        rows += [("  sizes differing from property", f"{im['differing_from_property']:,}")]
    c = r["corrupt"]
    if r["verified"]:
        rows += [("corrupt records (decoded all)", f"{c['count']:,}")]
    else:
        rows += [("corrupt records", f"{c['count']:,} in the sample (headers only; --verify decodes all)")]
    rows += [(f"  key {k}", e) for k, e in c["errors"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unpg.tools.inspect",
        description="Counts, class-size histogram, image sizes and (with --verify) corrupt records "
                    "of an insightface face rec.")
    p.add_argument("--rec", required=True, help="folder holding train.rec and train.idx (and property)")
    p.add_argument("--verify", action="store_true",
                   help="decode every image and list corrupt records (exit status 1 if any)")
    p.add_argument("--sample", type=int, default=1000,
                   help="without --verify, read the JPEG headers of this many evenly spaced images")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = inspect_rec(args.rec, verify=args.verify, sample=args.sample, workers=args.workers,
                             progress=not args.no_progress)
        if args.json:
            atomic_write_json(args.json, report, indent=1)
    except (OSError, ValueError) as e:
        print(f"inspect: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 1 if report["corrupt"]["count"] and args.verify else 0


if __name__ == "__main__":
    sys.exit(main())
