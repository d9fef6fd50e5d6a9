"""Procedural face-like dataset: insightface-layout records plus verification pairs.

The faces come from :mod:`unpg.data.faces` (deterministic identities and nuisance; its public
names are re-exported here). ``generate`` writes to ``out_dir``:

- ``train.rec``, ``train.idx``, ``property``: insightface layout via :class:`unpg.recordio.FaceRecWriter`
  (``identities`` classes x ``images_per_identity`` JPEGs, labels ``0..identities-1``);
- ``synth_val.bin``: ``val_pairs`` pairs (half same-identity) of held-out identities at ``nuisance``;
- ``synth_hard.bin``: the same pairs and the same draws with nuisance amplified x1.5;
- ``unpg_manifest.json`` (first) and ``meta.json`` (written last): the parameters, counts, the
  identity streams used and the pair plan, so :func:`ensure_dataset` can reuse a matching folder.

``out_dir`` must be new, empty or a folder this module wrote (its manifest or ``meta.json`` says
so); any other non-empty folder is refused (``force=True`` / ``--force`` clears it first), and
the folder is proven writable before anything is rendered. Images are 112x112 RGB, stored as
JPEG (BGR order inside, as every JPEG decoder expects). With ``workers > 1`` a "forkserver" (or
"spawn") pool renders the images, so a calling script needs the usual
``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import pickle
from collections.abc import Iterator

import cv2
import numpy as np
from tqdm import tqdm

from unpg.data.faces import (  # noqa: F401  (re-exported: the public renderer API lives here too)
    _STREAM_PAIRS,
    SIZE,
    TRAIN_SPLIT,
    VAL_SPLIT,
    FaceParams,
    encode_jpeg,
    identity_rng,
    image_rng,
    render_face,
    render_image,
    sample_identity,
)
from unpg.fileio import OutputError, atomic_write, atomic_write_text, claim_output_dir
from unpg.recordio import FaceRecWriter

TOOL = "unpg.data.synthetic"
VERSION = 1
VAL_BIN, HARD_BIN = "synth_val.bin", "synth_hard.bin"
HARD_FACTOR = 1.5
VAL_IMAGES_PER_IDENTITY = 32  # image indices a held-out identity's pairs draw from

# ----------------------------------------------------------------------------- dataset writing
_META_KEYS = ("version", "seed", "identities", "images_per_identity", "val_identities",
              "val_pairs", "quality", "nuisance")


def _render_identity_jpegs(task: tuple) -> list:
    """Pool task: all training images of one identity, as JPEG bytes."""
    seed, split, ident, count, nuisance, quality = task
    params = sample_identity(identity_rng(seed, split, ident))
    return [encode_jpeg(render_face(params, image_rng(seed, split, ident, k), nuisance), quality)
            for k in range(count)]


def _render_jpeg(task: tuple) -> bytes:
    seed, split, ident, k, nuisance, quality = task
    return encode_jpeg(render_image(seed, split, ident, k, nuisance), quality)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process already keeps every core busy


class _Mapper:
    """Ordered map over tasks, in-process for one worker, else on a process pool."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self) -> _Mapper:
        if self.workers > 1:
            # Not "fork": a child forked after this process used OpenCV's thread pool inherits
            # its locks mid-state and can deadlock in its first cv2 call.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init_worker)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if exc[0] is not None:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()

    def map(self, fn, tasks: list, chunksize: int) -> Iterator:
        if self.pool is None:
            return map(fn, tasks)
        return self.pool.imap(fn, tasks, chunksize=chunksize)


def pair_plan(seed: int, val_identities: int, val_pairs: int) -> list:
    """``val_pairs`` pairs ``[ident_a, k_a, ident_b, k_b, issame]`` of held-out identities.

    Exactly half are positives (two different images of one identity), half negatives (two
    different identities), in a seeded random order so every contiguous fold is near balanced.
    """
    rng = np.random.default_rng([seed, _STREAM_PAIRS, val_identities, val_pairs])
    half = val_pairs // 2
    pairs = []
    for _ in range(half):
        ident = int(rng.integers(val_identities))
        ka, kb = (int(v) for v in rng.choice(VAL_IMAGES_PER_IDENTITY, 2, replace=False))
        pairs.append([ident, ka, ident, kb, True])
    for _ in range(half):
        a, b = (int(v) for v in rng.choice(val_identities, 2, replace=False))
        ka, kb = (int(v) for v in rng.integers(VAL_IMAGES_PER_IDENTITY, size=2))
        pairs.append([a, ka, b, kb, False])
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def _validate(identities, images_per_identity, val_identities, val_pairs, seed, quality,
              nuisance, workers) -> dict:
    kw = dict(
        identities=_check_int("identities", identities, 1),
        images_per_identity=_check_int("images_per_identity", images_per_identity, 1),
        val_identities=_check_int("val_identities", val_identities, 2),
        val_pairs=_check_int("val_pairs", val_pairs, 2),
        seed=_check_int("seed", seed, 0, 2**32 - 1),
        quality=_check_int("quality", quality, 1, 100),
    )
    if kw["val_pairs"] % 2:
        raise ValueError(f"val_pairs must be even (half positive, half negative), got {val_pairs}")
    if isinstance(nuisance, bool) or not isinstance(nuisance, (int, float, np.floating)) \
            or not math.isfinite(nuisance) or nuisance < 0:
        raise ValueError(f"nuisance must be a finite number >= 0, got {nuisance!r}")
    kw["nuisance"] = float(nuisance)
    if workers is not None:
        _check_int("workers", workers, 1)
    return kw


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _is_synthetic(path) -> bool:
    """A folder written by this module before output folders carried a manifest."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == "unpg-synthetic-faces"
    except (OSError, ValueError, AttributeError):
        return False


def generate(out_dir: str, identities: int, images_per_identity: int, *,
             val_identities: int = 100, val_pairs: int = 600, seed: int = 0, quality: int = 90,
             nuisance: float = 1.0, workers: int | None = None, progress: bool = True,
             force: bool = False) -> dict:
    """Write the training records, the verification bins and ``meta.json``; return the meta."""
    kw = _validate(identities, images_per_identity, val_identities, val_pairs, seed, quality,
                   nuisance, workers)
    workers = default_workers() if workers is None else int(workers)
    claim_output_dir(out_dir, TOOL, force=force, ours=_is_synthetic)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):  # the folder stops looking complete until meta is rewritten
        os.remove(meta_path)
    seed, n_id, n_img, q, nu = (kw["seed"], kw["identities"], kw["images_per_identity"],
                                kw["quality"], kw["nuisance"])
    plan = pair_plan(seed, kw["val_identities"], kw["val_pairs"])
    bins = {VAL_BIN: nu, HARD_BIN: nu * HARD_FACTOR}
    with _Mapper(workers) as mapper:
        tasks = [(seed, TRAIN_SPLIT, i, n_img, nu, q) for i in range(n_id)]
        chunk = max(1, min(16, n_id // (workers * 8)))
        bar = tqdm(total=n_id * n_img, desc="synthetic train", unit="img", disable=not progress)
        with FaceRecWriter(out_dir, image_size=(SIZE, SIZE)) as writer:
            for label, jpegs in enumerate(mapper.map(_render_identity_jpegs, tasks, chunk)):
                for jpeg in jpegs:
                    writer.add(label, jpeg)
                bar.update(len(jpegs))
        bar.close()
        for name, strength in bins.items():
            tasks = [(seed, VAL_SPLIT, a, ka, strength, q) for a, ka, b, kb, _ in plan
                     for a, ka in ((a, ka), (b, kb))]
            jpegs = list(tqdm(mapper.map(_render_jpeg, tasks, 32), total=len(tasks),
                              desc=f"synthetic {name}", unit="img", disable=not progress))
            issame = [bool(p[4]) for p in plan]
            with atomic_write(os.path.join(out_dir, name)) as f:
                pickle.dump((jpegs, issame), f, protocol=4)
    meta = dict(
        kw, version=VERSION, format="unpg-synthetic-faces", image_size=[SIZE, SIZE],
        num_classes=n_id, num_images=n_id * n_img,
        train_identities={"split": TRAIN_SPLIT, "ids": [0, n_id]},
        val_identity_ids={"split": VAL_SPLIT, "ids": [0, kw["val_identities"]]},
        bins={name: {"nuisance": s, "pairs": len(plan), "positives": len(plan) // 2}
              for name, s in bins.items()},
    )
    # One line per pair keeps the file short and readable; written last, it marks completion.
    text = json.dumps(meta, indent=1)[:-2] + ',\n "pairs": [\n  ' + \
        ",\n  ".join(json.dumps(p) for p in plan) + "\n ]\n}\n"
    meta["pairs"] = plan
    atomic_write_text(meta_path, text)
    return meta


def _matches(out_dir: str, kw: dict) -> dict | None:
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    want = dict(kw, version=VERSION)
    if not isinstance(meta, dict) or any(meta.get(k) != want[k] for k in _META_KEYS):
        return None
    needed = ["train.rec", "train.idx", "property", *meta.get("bins", {})]
    if not all(os.path.isfile(os.path.join(out_dir, n)) for n in needed):
        return None
    return meta


def ensure_dataset(out_dir: str, identities: int, images_per_identity: int, *,
                   val_identities: int = 100, val_pairs: int = 600, seed: int = 0,
                   quality: int = 90, nuisance: float = 1.0, workers: int | None = None,
                   progress: bool = True, force: bool = False) -> dict:
    """Reuse ``out_dir`` when its ``meta.json`` matches these parameters, else regenerate."""
    kw = _validate(identities, images_per_identity, val_identities, val_pairs, seed, quality,
                   nuisance, workers)
    meta = _matches(out_dir, kw)
    if meta is not None:
        return meta
    return generate(out_dir, workers=workers, progress=progress, force=force, **kw)


def main(argv: list | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m unpg.data.synthetic",
        description="Write a procedural face dataset: insightface train.rec/.idx/property, "
                    f"{VAL_BIN} and {HARD_BIN} (held-out identities, nuisance x{HARD_FACTOR}) "
                    "and meta.json.")
    ap.add_argument("--out", required=True,
                    help="output folder: new, empty, or one written by this command")
    ap.add_argument("--force", action="store_true",
                    help="clear a non-empty --out that this command did not write")
    ap.add_argument("--identities", type=int, required=True, help="training identities")
    ap.add_argument("--images-per-identity", type=int, required=True)
    ap.add_argument("--val-identities", type=int, default=100, help="held-out identities")
    ap.add_argument("--val-pairs", type=int, default=600, help="verification pairs (even)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100")
    ap.add_argument("--nuisance", type=float, default=1.0, help="per-image nuisance strength")
    ap.add_argument("--workers", type=int, default=None,
                    help=f"processes (default {default_workers()})")
    ap.add_argument("--reuse", action="store_true",
                    help="keep an existing folder whose meta.json matches")
    a = ap.parse_args(argv)
    fn = ensure_dataset if a.reuse else generate
    try:
        meta = fn(a.out, a.identities, a.images_per_identity, val_identities=a.val_identities,
                  val_pairs=a.val_pairs, seed=a.seed, quality=a.quality, nuisance=a.nuisance,
                  workers=a.workers, force=a.force)
    except OutputError as e:  # a refused or unwritable --out: one line, exit 2
        ap.exit(2, f"synthetic: error: {e}\n")
    except OSError as e:
        ap.exit(2, f"synthetic: error: writing {a.out}: {e}\n")
    except ValueError as e:
        ap.error(str(e))
    print(f"{a.out}: {meta['num_images']} images of {meta['num_classes']} identities, "
          f"bins {', '.join(meta['bins'])}")
    return meta


if __name__ == "__main__":
    main()
