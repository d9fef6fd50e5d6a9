"""Summarise, verify and repair an insightface face rec: counts, class sizes, image sizes.

    python -m unpg.tools.inspect --rec faces_emore [--verify] [--sample 1000] [--json FILE]
    python -m unpg.tools.inspect --rec faces_emore --repair faces_emore_clean [--force]

Prints a table of:
  - layout (header + identity records, or image-only), images, classes, the property file;
  - class sizes: min / median / mean / max and a histogram over buckets (0, 1, 2-4, 5-9, ...);
  - image sizes read from the JPEG frame headers (no decoding) of an evenly spaced sample of
    ``--sample`` images, or of every image with ``--verify``; count of sizes differing from
    the property file's;
  - with ``--verify``: every record is read and every image decoded. A record is corrupt if its
    record header is damaged (listed with its byte offset), its label disagrees with the identity
    records, it is not JPEG/PNG, or its image fails the project's one strict check
    (``unpg.loaders.decode.verify_jpeg``: valid headers, an end-of-image marker, a full decode
    without a single libjpeg warning -- the same check the loaders, ``pack`` and
    ``prepare_dali`` apply); a PNG must decode to the size its header promises.

``--repair OUT`` verifies everything and writes a clean copy into OUT: the good records (their
bytes unchanged) with consistent header and identity records, ``.idx`` and ``property``; a class
left without images is dropped and the labels renumbered (listed in the report). OUT must be new,
empty or an earlier ``--repair`` output; ``--force`` replaces any other folder.

``--json FILE`` writes the same report as JSON (atomically). Exit status: 0, or 1 when
``--verify`` found corrupt records (2 for usage errors, an unreadable rec or a rec without
images).
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

from unpg.fileio import atomic_write_json, staged_output_dir
from unpg.loaders.decode import DecodeError, verify_jpeg
from unpg.recordio import CorruptRecordError, FaceRecIndex, FaceRecWriter, RecordIOError
from unpg.tools.image2rec import jpeg_info
from unpg.tools.rec2image import image_extension

__all__ = ["BUCKETS", "format_report", "inspect_rec", "main", "repair_rec"]

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


def _check(index: FaceRecIndex, i: int, verify: bool) -> Tuple[Optional[Tuple[int, int]], str, Optional[str]]:
    """(header (h, w) or None, kind 'jpeg'/'png'/'other', error or None) of image i."""
    try:
        _, data = index.read_image(i)
    except CorruptRecordError as e:
        return None, "damaged record", f"damaged record at byte offset {e.offset}: {e.reason}"
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
    if kind == "jpeg":
        try:
            verify_jpeg(data)
        except DecodeError as e:
            return size, kind, str(e)
        return size, kind, None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return size, kind, "does not decode"
    if size is not None and tuple(img.shape[:2]) != tuple(size):
        return size, kind, f"decodes to {img.shape[1]}x{img.shape[0]}, header says {size[1]}x{size[0]}"
    return size, kind, None


def _scan(index: FaceRecIndex, picks: np.ndarray, verify: bool, workers: int, progress: bool):
    """(sizes, kinds, corrupt [(key, error)], bad positions) over the images at ``picks``."""
    sizes: Counter = Counter()
    kinds: Counter = Counter()
    corrupt: List[Tuple[int, str]] = []
    bad: List[int] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # the decoders release the GIL
        results = pool.map(lambda i: _check(index, int(i), verify), picks, chunksize=64)
        for i, (size, kind, err) in zip(picks, tqdm(results, total=len(picks), unit="img",
                                                     desc="inspect", disable=not progress)):
            kinds[kind] += 1
            if size is not None:
                sizes[f"{size[1]}x{size[0]}"] += 1  # width x height, as image sizes are written
            if err is not None:
                corrupt.append((int(index.image_keys[i]), err))
                bad.append(int(i))
    # An image-only rec leaves damaged records out of its images (their label is unknown).
    for key, offset, reason in index.damaged:
        if not np.isin(key, index.image_keys):
            corrupt.append((key, f"damaged record at byte offset {offset}: {reason}"))
    return sizes, kinds, sorted(corrupt), bad


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
        sizes, kinds, corrupt, _ = _scan(index, picks, verify, workers, progress)
        return _report(rec_dir, index, counts, picks, sizes, kinds, corrupt, verify)


def _report(rec_dir, index: FaceRecIndex, counts, picks, sizes, kinds, corrupt, verify) -> Dict[str, Any]:
    n, prop = len(index), index.image_size
    expected = None if prop is None else f"{prop[1]}x{prop[0]}"
    return {
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


def repair_rec(rec_dir: os.PathLike | str, out: os.PathLike | str, *, workers: int = 4,
               progress: bool = True, force: bool = False) -> Dict[str, Any]:
    """Verify every image of ``rec_dir`` and write the good ones as a clean rec in ``out`` (see
    the module docstring); returns the verification report plus a ``repair`` summary."""
    if Path(rec_dir).resolve() == Path(out).resolve():
        raise ValueError(f"--repair {out} is the source folder; write the clean copy elsewhere")
    try:
        index = FaceRecIndex.open(rec_dir)
    except RecordIOError as e:  # e.g. a damaged header or identity record: rebuild from images
        print(f"inspect: {e}; rebuilding the layout from the image records' own labels",
              file=sys.stderr)
        index = FaceRecIndex.scan(rec_dir)
    with index:
        n = len(index)
        counts = np.bincount(index.labels, minlength=index.num_classes)
        picks = np.arange(n)
        with staged_output_dir(out, "inspect --repair", force=force, option="--repair",
                               sources=[rec_dir]) as tmp:
            sizes, kinds, corrupt, bad = _scan(index, picks, True, workers, progress)
            keep = np.ones(n, bool)
            keep[bad] = False
            kept_labels = index.labels[keep]
            if kept_labels.size == 0:
                raise ValueError(f"{rec_dir}: no readable image left; nothing to repair")
            old_classes = np.unique(kept_labels)  # sorted: a class without images is dropped
            new_label = np.full(max(index.num_classes, 1), -1, np.int64)
            new_label[old_classes] = np.arange(old_classes.size)
            with FaceRecWriter(tmp, index.image_size or (112, 112)) as w:
                for i in np.flatnonzero(keep).tolist():
                    label, data = index.read_image(i)  # read before: it read cleanly
                    w.add(int(new_label[label]), data)
        report = _report(rec_dir, index, counts, picks, sizes, kinds, corrupt, True)
        dropped_classes = sorted(set(range(index.num_classes)) - set(old_classes.tolist()))
        report["repair"] = {"out": str(Path(out)), "images": int(kept_labels.size),
                            "dropped_records": len(corrupt), "classes": int(old_classes.size),
                            "dropped_classes": dropped_classes[:_MAX_LISTED]}
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
    if "repair" in r:
        rp = r["repair"]
        rows += [("repaired copy", f"{rp['out']}: {rp['images']:,} images of {rp['classes']:,} classes "
                                   f"({rp['dropped_records']:,} records dropped"
                                   + (f", classes left without images dropped and labels renumbered: "
                                      f"{rp['dropped_classes']}" if rp["dropped_classes"] else "") + ")")]
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
    p.add_argument("--repair", metavar="OUT",
                   help="verify everything and write a clean copy (good records only) into folder OUT")
    p.add_argument("--force", action="store_true", help="--repair: replace a non-empty OUT not written by it")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.repair:
            report = repair_rec(args.rec, args.repair, workers=args.workers,
                                progress=not args.no_progress, force=args.force)
        else:
            report = inspect_rec(args.rec, verify=args.verify, sample=args.sample,
                                 workers=args.workers, progress=not args.no_progress)
        if args.json:
            atomic_write_json(args.json, report, indent=1)
    except (OSError, ValueError, ImportError) as e:  # ImportError: the strict check's simplejpeg
        print(f"inspect: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 1 if report["corrupt"]["count"] and args.verify else 0


if __name__ == "__main__":
    sys.exit(main())
