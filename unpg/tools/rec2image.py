"""Unpack an insightface face rec (train.rec/train.idx[/property]) into a folder of JPEG files.

    python -m unpg.tools.rec2image --rec faces_emore --out ms1mv2_images [--limit N]
        [--naming padded|insightface]

Each record's image bytes are written exactly as stored: no decode/re-encode (the official code's
``detection/rec2image.py`` decodes with MXNet and re-encodes with ``cv2.imwrite``, which loses
quality and changes every byte), and no MXNet.

Naming (``--naming``):
  padded (default)   ``OUT/<label>/<n>.jpg``; the class label and the image's index within its
                     class are zero-padded to a common width (``00042/007.jpg``), so a plain
                     ``sorted()`` of the names -- what the official code's loader, torchvision's
                     ImageFolder and ``unpg.tools.image2rec`` do -- gives back labels 0..N-1 and
                     the rec's image order. ``image2rec --images OUT`` rebuilds the same rec.
  insightface        ``OUT/0_<identity key>/<n>.jpg``, unpadded, as insightface's and the official code's
                     rec2image.py name them (``<identity key>`` is the key of the class's identity
                     record; for a rec without identity records, the label).

``OUT/train.lst`` lists every image as ``key<TAB>label<TAB>relative path`` (MXNet ``.lst``
style, key = the image's record key), so a key reported by ``unpg.tools.inspect`` can be found,
and ``image2rec --list OUT/train.lst`` reproduces the labels. Top-level files are not classes.

The output appears only when complete: everything is written into a sibling folder
``OUT.tmp-<random>`` that is renamed to OUT at the end (and removed on any error). OUT must not
exist yet, be an empty folder, or be an earlier rec2image output (its ``unpg_manifest.json``
says so), which is replaced; ``--force`` replaces any other folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from unpg.fileio import staged_output_dir  # re-exported: image2rec and older callers use it here
from unpg.recordio import FaceRecIndex, RecordIOError

__all__ = ["NAMINGS", "Rec2ImageSummary", "image_extension", "main", "rec_to_images",
           "staged_output_dir"]

NAMINGS = ("padded", "insightface")


def image_extension(data: bytes) -> Optional[str]:
    """File extension for an encoded image by its magic bytes (``.jpg``/``.png``), else None."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return None


@dataclass
class Rec2ImageSummary:
    images: int
    classes: int
    out: Path


def _names(index: FaceRecIndex, labels: np.ndarray, naming: str):
    """(class folder name for each label, image-name width) under the chosen naming."""
    counts = np.bincount(labels, minlength=index.num_classes) if labels.size else np.zeros(0, int)
    if naming == "padded":
        width_c = len(str(max(index.num_classes - 1, 0)))
        width_i = len(str(max(int(counts.max(initial=1)) - 1, 0)))
        return (lambda c: str(c).zfill(width_c)), width_i
    if index.identity_ranges is not None:
        # The identity records follow the images: key of class c = first identity key + c.
        first_id = int(index.identity_ranges[-1, 1]) if len(index.identity_ranges) else 1
        return (lambda c: f"0_{first_id + c}"), 0
    return (lambda c: f"0_{c}"), 0


def rec_to_images(rec_dir: os.PathLike | str, out: os.PathLike | str, *, limit: Optional[int] = None,
                  naming: str = "padded", progress: bool = True, force: bool = False) -> Rec2ImageSummary:
    """Write every image of the face rec in ``rec_dir`` (the first ``limit`` in key order if
    given) under ``out`` with its stored bytes; see the module docstring for names."""
    if naming not in NAMINGS:
        raise ValueError(f"--naming must be one of {', '.join(NAMINGS)}, got {naming!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    with FaceRecIndex.open(rec_dir) as index:
        n = len(index) if limit is None else min(limit, len(index))
        labels = np.asarray(index.labels[:n], dtype=np.int64)
        class_name, width_i = _names(index, labels, naming)
        seen = np.zeros(index.num_classes, np.int64)  # images written so far per class
        with staged_output_dir(out, "rec2image", force=force, sources=[rec_dir]) as tmp:
            made, lst = set(), []
            for i in tqdm(range(n), total=n, unit="img", desc="rec2image", disable=not progress):
                label, data = index.read_image(i)
                key = int(index.image_keys[i])
                ext = image_extension(data)
                if ext is None:
                    raise RecordIOError(f"{index.rec.rec_path}: key {key}: payload of {len(data)} bytes "
                                        f"is not a JPEG or PNG (starts {data[:4].hex()}); "
                                        "run `python -m unpg.tools.inspect --verify` on this rec")
                folder = class_name(label)
                if label not in made:
                    (tmp / folder).mkdir()
                    made.add(label)
                rel = f"{folder}/{str(int(seen[label])).zfill(width_i)}{ext}"
                seen[label] += 1
                (tmp / rel).write_bytes(data)
                lst.append(f"{key}\t{label}\t{rel}\n")
            (tmp / "train.lst").write_text("".join(lst))
    return Rec2ImageSummary(images=n, classes=len(made), out=Path(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unpg.tools.rec2image",
        description="Unpack an insightface face rec (train.rec/train.idx) into OUT/<class>/<n>.jpg, "
                    "writing each record's JPEG bytes unchanged (no MXNet, no re-encoding).")
    p.add_argument("--rec", required=True, help="folder holding train.rec and train.idx (and property)")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty or an earlier rec2image output; appears only when complete")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out not written by rec2image")
    p.add_argument("--limit", type=int, default=None,
                   help="write only the first N images in key order (a quick preview)")
    p.add_argument("--naming", choices=NAMINGS, default="padded",
                   help="padded: OUT/00042/007.jpg (sorted names give labels 0..N-1 back); "
                        "insightface: OUT/0_<identity key>/7.jpg as insightface's/the official code's script")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = rec_to_images(args.rec, args.out, limit=args.limit, naming=args.naming,
                          progress=not args.no_progress, force=args.force)
    except (OSError, ValueError) as e:  # RecordIOError is a ValueError
        print(f"rec2image: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s.images} images of {s.classes} classes to {s.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
