"""Pack a folder of identity folders, or a list file, into an insightface face rec.

    python -m unpg.tools.image2rec --images DIR --out REC_DIR [--size 112] [--quality 95]
    python -m unpg.tools.image2rec --list FILE [--root DIR] --out REC_DIR

Input:
  --images DIR   every sub-folder of DIR is one identity; ``sorted()`` folder names give labels
                 0..N-1 (as the official code's loader and torchvision's ImageFolder do). Images are all
                 files with an image extension anywhere below the identity folder (so aligned
                 K-FACE trees ID/Sxxx/Ly/Ezz/Cp.jpg work), in ``sorted()`` relative-path order.
                 Files directly in DIR are ignored.
  --list FILE    one image per line, either ``path label`` (split at the last whitespace, so a
                 path may hold spaces) or MXNet/insightface ``.lst`` style
                 ``index<TAB>label[<TAB>more labels]<TAB>path`` (chosen by the first line: three or
                 more tab-separated fields mean ``.lst``). Labels must be integers (``3.000000`` is
                 fine). Relative paths are under --root (default: the list file's folder). Images
                 are grouped by label (stable: list order within a label) and the distinct labels,
                 in increasing order, are renumbered 0..N-1.

Output (REC_DIR): train.rec, train.idx, property (the insightface layout written by
``unpg.recordio.FaceRecWriter``: header record, images, identity records) and ``classes.txt`` with
one ``label<TAB>name`` line per class (name = folder name, or the label given in the list).

A JPEG whose header says it is already ``size``x``size`` (1 or 3 components) is copied byte for
byte; any other image is decoded once, resized to ``size``x``size`` (cv2 INTER_AREA to shrink,
INTER_CUBIC to enlarge; not cropped: align faces first) and JPEG-encoded at ``--quality``.
Copied JPEGs are not decoded, so a truncated one passes; ``python -m unpg.tools.inspect --verify``
decodes every record. Unreadable files are skipped and counted (``--strict``: an error instead);
an identity left with no image is dropped and the labels stay contiguous.

The output appears only when complete: it is built in a sibling folder ``REC_DIR.tmp-<random>`` and
renamed at the end (removed on any error). REC_DIR must not exist yet, be empty, or be an earlier
image2rec output (its ``unpg_manifest.json`` says so), which is replaced; ``--force`` replaces any
other folder.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from unpg.fileio import staged_output_dir
from unpg.recordio import FaceRecWriter

__all__ = ["IMAGE_EXTENSIONS", "Image2RecSummary", "collect_folder", "encode_face", "images_to_rec",
           "jpeg_info", "main", "read_list"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm", ".jp2"})
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); C4/C8/CC are not.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD9)) | {0x01}  # RSTn, SOI, TEM: no length field


def jpeg_info(data: bytes) -> Optional[Tuple[int, int, int]]:
    """(height, width, components) from a JPEG's frame header, walking the marker segments
    without decoding; None if ``data`` is not a JPEG or its header is malformed or cut off."""
    n = len(data)
    if n < 4 or data[:3] != b"\xff\xd8\xff":
        return None
    i = 2
    while i < n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes may precede a marker
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if i + 2 > n:
            return None
        seglen = data[i] << 8 | data[i + 1]
        if seglen < 2:
            return None
        if marker in _SOF:
            if i + 8 > n:
                return None
            h = data[i + 3] << 8 | data[i + 4]
            w = data[i + 5] << 8 | data[i + 6]
            # h == 0 means "defined later by a DNL marker": let the decoder find out.
            return (h, w, data[i + 7]) if h and w else None
        i += seglen
    return None


class _Unreadable(Exception):
    """An input file that cannot be read or decoded (skipped unless --strict)."""


def encode_face(data: bytes, size: int, quality: int) -> Tuple[bytes, bool]:
    """(JPEG bytes of a ``size``x``size`` image, copied?) for one encoded input image.

    Raises ``_Unreadable`` if the bytes do not decode."""
    info = jpeg_info(data)
    if info is not None and info[:2] == (size, size) and info[2] in (1, 3):
        return data, True
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise _Unreadable("cannot be decoded as an image")
    h, w = img.shape[:2]
    if (h, w) != (size, size):
        # INTER_AREA averages when shrinking (no aliasing); it degrades to nearest when enlarging.
        interp = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_CUBIC
        img = cv2.resize(img, (size, size), interpolation=interp)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise _Unreadable("JPEG encoding failed")
    return buf.tobytes(), False


def collect_folder(images_dir: os.PathLike | str) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """([(image path, class index)], class names) of a folder of identity folders."""
    root = Path(images_dir)
    if not root.is_dir():
        raise ValueError(f"--images {root}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"--images {root}: has no sub-folders; expected one folder per identity")
    items = []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        items += [(p, c) for p in files]
    return items, classes


def _parse_label(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value != int(value):
        raise ValueError(f"{where}: label {text!r} is not an integer")
    return int(value)


def read_list(list_file: os.PathLike | str, root: Optional[os.PathLike | str] = None
              ) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """([(image path, class index)], class names = original labels) from a list file; see the
    module docstring for the two accepted line formats. Classes are the distinct labels in
    increasing order; images keep list order within a class."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    rows, lst_style = [], None
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{list_file}:{lineno}"
            if lst_style is None:
                lst_style = len(line.split("\t")) >= 3
            if lst_style:
                fields = line.split("\t")
                if len(fields) < 3:
                    raise ValueError(f"{where}: expected 'index<TAB>label<TAB>path' (.lst style, as "
                                     f"on the first line), got {line[:80]!r}")
                path, label = fields[-1], _parse_label(fields[1], where)
            else:
                fields = line.rsplit(None, 1)
                if len(fields) != 2:
                    raise ValueError(f"{where}: expected 'path label', got {line[:80]!r}")
                path, label = fields[0].strip(), _parse_label(fields[1], where)
            rows.append((base / path, label))
    if not rows:
        raise ValueError(f"--list {list_file}: no images listed")
    labels = sorted({label for _, label in rows})
    remap = {label: c for c, label in enumerate(labels)}
    # Stable sort: images of one label keep their list order.
    items = sorted(((p, remap[label]) for p, label in rows), key=lambda r: r[1])
    return items, [str(label) for label in labels]


def _load(path: Path, size: int, quality: int) -> Tuple[Optional[bytes], bool, str]:
    try:
        data = path.read_bytes()
        jpeg, copied = encode_face(data, size, quality)
        return jpeg, copied, ""
    except OSError as e:
        return None, False, f"cannot read: {e.strerror or e}"
    except _Unreadable as e:
        return None, False, str(e)


def _ordered_map(fn, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` on a thread pool with a bounded window of pending work (cv2 and file
    reads release the GIL); results come back in input order."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        window: collections.deque = collections.deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


@dataclass
class Image2RecSummary:
    images: int = 0
    classes: int = 0
    copied: int = 0
    reencoded: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    empty_classes: List[str] = field(default_factory=list)


def images_to_rec(items: Sequence[Tuple[Path, int]], class_names: Sequence[str],
                  out: os.PathLike | str, *, size: int = 112, quality: int = 95,
                  strict: bool = False, workers: int = 4, progress: bool = True,
                  force: bool = False) -> Image2RecSummary:
    """Write ``items`` ([(path, class index)] sorted by class index) as an insightface rec in
    ``out``; labels are renumbered densely over the classes that keep at least one image."""
    if size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if any(b[1] < a[1] for a, b in zip(items, items[1:])):
        raise ValueError("images_to_rec: items must be sorted by class index")
    s = Image2RecSummary()
    folders = sorted({str(Path(path).parent) for path, _ in items})  # replacing out must not delete them
    with staged_output_dir(out, "image2rec", force=force, sources=folders) as tmp:
        writer = FaceRecWriter(tmp, (size, size))
        results = _ordered_map(lambda it: _load(it[0], size, quality), items, workers)
        try:
            names, current = [], None
            bar = tqdm(zip(items, results), total=len(items), unit="img", desc="image2rec",
                       disable=not progress)
            for (path, c), (jpeg, copied, why) in bar:  # in order: labels must be contiguous
                if jpeg is None:
                    if strict:
                        raise ValueError(f"{path}: {why} (drop --strict to skip unreadable files)")
                    s.skipped.append((str(path), why))
                    if len(s.skipped) <= 10:
                        log.warning("skipping %s: %s", path, why)
                    continue
                if c != current:
                    names.append(class_names[c])
                    current = c
                writer.add(len(names) - 1, jpeg)
                s.images += 1
                s.copied += copied
                s.reencoded += not copied
            if not names:
                raise ValueError(f"no readable image among the {len(items)} inputs; nothing written")
            s.classes = len(names)
            kept = set(names)
            s.empty_classes = [n for n in class_names if n not in kept]
            (tmp / "classes.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(names)),
                                             encoding="utf-8")
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            results.close()  # stop the reader threads now, not when the generator is collected
    if s.skipped:
        log.warning("skipped %d unreadable file(s)", len(s.skipped))
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unpg.tools.image2rec",
        description="Pack identity folders or a list file into an insightface rec "
                    "(train.rec/train.idx/property + classes.txt). JPEGs already at the target "
                    "size are copied byte for byte; others are resized and re-encoded.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder with one sub-folder per identity (sorted names -> labels)")
    src.add_argument("--list", help="list file: 'path label' lines, or .lst 'index<TAB>label<TAB>path'")
    p.add_argument("--root", help="folder that relative paths in --list are under "
                                  "(default: the list file's folder)")
    p.add_argument("--out", required=True,
                   help="output rec folder: new, empty or an earlier image2rec output")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out not written by image2rec")
    p.add_argument("--size", type=int, default=112, help="output images are SIZE x SIZE (default 112)")
    p.add_argument("--quality", type=int, default=95,
                   help="JPEG quality for re-encoded images (default 95, as insightface)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads reading/decoding images (default: min(8, CPUs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="image2rec: %(message)s")
    if args.root is not None and args.list is None:
        print("image2rec: error: --root only applies to --list", file=sys.stderr)
        return 2
    try:
        items, names = collect_folder(args.images) if args.images else read_list(args.list, args.root)
        s = images_to_rec(items, names, args.out, size=args.size, quality=args.quality,
                          strict=args.strict, workers=args.workers, progress=not args.no_progress,
                          force=args.force)
    except (OSError, ValueError) as e:
        print(f"image2rec: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s.images} images of {s.classes} classes to {args.out} "
          f"({s.copied} copied, {s.reencoded} re-encoded, {len(s.skipped)} skipped"
          + (f", {len(s.empty_classes)} identities without images dropped" if s.empty_classes else "")
          + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
