"""Write a DALI-ready copy of an insightface rec: image records only, globally shuffled, sharded.

    python -m unpg.tools.prepare_dali --rec data/faces_emore --out data/faces_emore_dali \\
        [--shards N] [--seed S] [--no-verify] [--on-corrupt skip|error] [--workers W]

Why: DALI's ``fn.readers.mxnet`` ignores ``.idx`` keys and treats every record as an image, so
insightface's header and identity records break decoding; and it shuffles only inside a buffer of
``initial_fill`` records, so a class-sorted rec would give batches of few identities. The layout
written is described in ``unpg.loaders.dali_layout``. Record payloads (IRHeader with the label,
then the JPEG) are copied byte for byte, never re-encoded. With verification (default) every JPEG
passes ``unpg.loaders.decode.verify_jpeg`` once (the one strict check shared with the loaders,
``inspect`` and ``pack``: libjpeg warnings count as corrupt); corrupt ones, and records whose
header is damaged, are dropped and listed in the manifest (``--on-corrupt skip``, default) or stop
the run naming file and key (``error``): DALI itself cannot skip a bad image.
Every file is written under a temporary name and renamed; the manifest is removed first and
written last, so a folder is complete exactly when its manifest matches its files. A non-empty
``--out`` is refused unless prepare_dali wrote it (its ``unpg_manifest.json`` or DALI manifest says
so; it is then rewritten); ``--force`` replaces any other folder's contents.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from unpg.fileio import atomic_write_json, atomic_write_text, claim_output_dir
from unpg.loaders.dali_layout import DALI_INDEX, FORMAT, MANIFEST, VERSION, shard_names
from unpg.loaders.decode import DecodeError, verify_jpeg
from unpg.recordio import CorruptRecordError, FaceRecIndex, IndexedRecordIO, parse_idx, unpack

log = logging.getLogger("unpg.tools.prepare_dali")
_STREAM_SHUFFLE = 21
_CHUNK = 2048


def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The global shuffle prepare_dali writes (a function of ``n`` and ``seed`` only)."""
    return np.random.default_rng([seed, _STREAM_SHUFFLE]).permutation(n).astype(np.int64)


def _verify(src: FaceRecIndex, order: np.ndarray, image_size: Tuple[int, int], workers: int,
            on_corrupt: str, progress: bool) -> List[Dict[str, Any]]:
    """Decode every image once; return ``[{key, reason}]`` of the corrupt ones."""
    def check(i: int) -> Optional[Tuple[int, str]]:
        key = int(src.image_keys[i])
        try:
            _, jpeg = src.read_image(i)
            verify_jpeg(jpeg, image_size)  # the project's one definition of a corrupt JPEG
        except (DecodeError, CorruptRecordError) as e:
            return key, str(e)
        return None

    bad: List[Dict[str, Any]] = []
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(order), desc="verify", unit="img", disable=not progress) as bar:
        for lo in range(0, len(order), _CHUNK):
            for res in pool.map(check, order[lo:lo + _CHUNK].tolist()):
                if res is not None:
                    if on_corrupt == "error":
                        raise ValueError(f"{src.rec.rec_path}: record key {res[0]} is corrupt: "
                                         f"{res[1]}; fix the record or use --on-corrupt skip")
                    log.warning("%s: dropping corrupt record key %d: %s", src.rec.rec_path, *res)
                    bad.append({"key": res[0], "reason": res[1]})
            bar.update(min(_CHUNK, len(order) - lo))
    return bad


def _dali_folder(path: Path) -> bool:
    """A folder prepare_dali wrote before output folders carried ``unpg_manifest.json``."""
    try:
        with open(path / MANIFEST, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def prepare_dali(rec_dir, out_dir, *, shards: int = 1, seed: int = 0, verify: bool = True,
                 on_corrupt: str = "skip", workers: int = 2, progress: bool = True,
                 force: bool = False) -> Dict[str, Any]:
    """Write the prepared folder (see module doc); returns the manifest."""
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    if on_corrupt not in ("skip", "error"):
        raise ValueError(f"--on-corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    out = Path(out_dir)
    if Path(rec_dir).resolve() == out.resolve():
        raise ValueError(f"--out {out} is the source folder; write the prepared copy elsewhere")
    src = FaceRecIndex.open(rec_dir)
    try:
        # Checked before the long verification pass, not after it.
        claim_output_dir(out, "prepare_dali", force=force, mark=False, ours=_dali_folder,
                         sources=[rec_dir])
        n = len(src)
        image_size = tuple(src.image_size) if src.image_size else (112, 112)
        order = shuffle_order(n, seed)
        bad = _verify(src, order, image_size, workers, on_corrupt, progress) if verify else []
        # Damaged records an image-only rec left out when it was opened: listed as skipped too.
        for key, offset, reason in src.damaged:
            if not np.isin(key, src.image_keys):
                if on_corrupt == "error":
                    raise ValueError(f"{src.rec.rec_path}: record key {key} at byte offset {offset} "
                                     f"is damaged: {reason}; repair the rec or use --on-corrupt skip")
                bad.append({"key": int(key), "reason": f"damaged record at byte offset {offset}: {reason}"})
        bad_keys = {b["key"] for b in bad}
        keep = order[~np.isin(src.image_keys[order], list(bad_keys))] if bad_keys else order
        if shards > keep.size:
            raise ValueError(f"--shards {shards} exceeds the {keep.size} images")
        claim_output_dir(out, "prepare_dali", force=force, ours=_dali_folder)
        (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until it is rewritten
        bounds = np.linspace(0, keep.size, shards + 1).astype(np.int64)
        shard_info, index_lines, base = [], [], 0
        bar = tqdm(total=keep.size, desc="write", unit="img", disable=not progress)
        for s in range(shards):
            rec_name, idx_name = shard_names(s)
            part = keep[bounds[s]:bounds[s + 1]]
            with IndexedRecordIO(out / idx_name, out / rec_name, "w") as w:
                for i in part.tolist():
                    key = int(src.image_keys[i])
                    payload = src.rec.read_idx(key)
                    header, _ = unpack(payload)
                    label = header.label if header.flag == 0 else float(header.label[0])
                    if label != src.labels[i]:
                        raise ValueError(f"{src.rec.rec_path}: record key {key} has label {label}, "
                                         f"its identity record says {int(src.labels[i])}")
                    w.write_idx(key, payload)  # the payload as stored: IRHeader + JPEG bytes
                    bar.update()
            keys, offsets = parse_idx((out / idx_name).read_bytes(), str(out / idx_name))
            index_lines += [f"{k}\t{o + base}\n" for k, o in zip(keys.tolist(), offsets.tolist())]
            size = (out / rec_name).stat().st_size
            shard_info.append({"rec": rec_name, "idx": idx_name, "count": int(part.size),
                               "bytes": size})
            base += size
        bar.close()
        atomic_write_text(out / DALI_INDEX, "".join(index_lines))
        listed = {name for sh in shard_info for name in (sh["rec"], sh["idx"])}
        for stale in list(out.glob("part-*.rec")) + list(out.glob("part-*.idx")):
            if stale.name not in listed:
                stale.unlink()
        manifest = {
            "format": FORMAT, "version": VERSION, "source": str(Path(rec_dir).resolve()),
            "source_images": n, "num_images": int(keep.size), "num_classes": int(src.num_classes),
            "image_size": list(image_size), "seed": seed, "verified": bool(verify),
            "shards": shard_info, "dali_index": DALI_INDEX, "skipped": bad,
        }
        atomic_write_json(out / MANIFEST, manifest, indent=1)
        return manifest
    finally:
        src.close()


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m unpg.tools.prepare_dali",
        description="Write image-only, globally shuffled, sharded rec/idx files (plus one global "
                    "DALI index and a manifest) from an insightface rec, for loader.name=dali.")
    ap.add_argument("--rec", required=True, help="folder with train.rec, train.idx, property")
    ap.add_argument("--out", required=True, help="output folder (use it as data.dali_dir)")
    ap.add_argument("--force", action="store_true",
                    help="replace the contents of a non-empty --out not written by prepare_dali")
    ap.add_argument("--shards", type=int, default=1, help="number of rec files (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip decoding every JPEG once (faster; a corrupt JPEG then stops DALI)")
    ap.add_argument("--on-corrupt", choices=("skip", "error"), default="skip",
                    help="verification: drop corrupt images (listed in the manifest) or stop")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="decode threads for verification")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        m = prepare_dali(a.rec, a.out, shards=a.shards, seed=a.seed, verify=not a.no_verify,
                         on_corrupt=a.on_corrupt, workers=a.workers, force=a.force)
    except (ValueError, OSError, ImportError) as e:  # ImportError: the strict check's simplejpeg
        ap.exit(2, f"prepare_dali: error: {e}\n")
    print(f"{a.out}: {m['num_images']} images of {m['num_classes']} classes in "
          f"{len(m['shards'])} shard(s); {len(m['skipped'])} corrupt dropped; "
          f"use data.dali_dir={a.out}")
    return m


if __name__ == "__main__":
    main()
