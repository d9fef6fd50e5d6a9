"""Data-loading throughput: decode ceilings, every loader at 1, 2, 4, ... workers (a scaling
table), each loader under GIL load, the training step alone and fed by each loader.

    python bench/throughput.py [--workers N] [--device cpu|cuda] [--json FILE] [--skip ...]

Data: a synthetic insightface rec of ``--identities x --images-per-identity`` 112x112 JPEGs
(quality 95) under ``bench/data/`` (git-ignored, made once), its packed file and DALI shards.
Median of ``--passes`` full epochs after a warm-up; one torch intra-op thread on the data side.

* ``decode/<decoder>/<threads|processes>``: decode-only ceiling (JPEGs from memory into a
  preallocated buffer) with ``--workers`` threads, or forked processes writing into shared
  memory. ``.../gil_load``: the same while another thread of the process spins pure Python.
* ``loader/<name>/<w>``: ``unpg.loaders.build_loader`` output (normalised float batches on
  ``--device``) with ``loader.workers = w`` for w = 1, 2, 4, ..., ``--workers``. ``loader/seed``:
  the official code's ``DataLoader`` (per sample: PIL decode, bicubic resize, flip, normalise;
  JPEG bytes from the same mapped rec). ``loader/ffcv_threads``: the packed loader's batch code
  run by threads of the training process (the design it replaced), for comparison.
* ``loader/<name>/gil_load``: the same loader at ``--workers`` while the consuming thread runs a
  pure-Python loop after each batch, for ``--gil-load-frac`` (default 0.25) of the time that
  loader alone needs per batch (the training loop's own Python work). A loader needing the
  training process's GIL stalls then; a perfect one loses only the loop's CPU time (2 cores:
  up to ~frac/2).
* ``train/step``: mobilefacenet + ArcFace margin softmax forward/backward/SGD on in-memory
  batches; ``train/fed_by_<name>``: the same step fed by that loader (``--workers``).

``--json``: ``{"results": [{"name", "value", "unit"}]}``, names as above + ``/images_per_s``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import mmap
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from reference_loaders import (  # bench/, beside this file
    SeedDataset,
    SeedLoader,
    ThreadedPackedLoader,
)
from unpg.loaders import build_loader
from unpg.loaders.decode import cpu_decoder

from unpg.config import Config
from unpg.data.synthetic import ensure_dataset
from unpg.fileio import atomic_write_json
from unpg.losses import margin_softmax_loss
from unpg.models import build_backbone
from unpg.recordio import FaceRecIndex
from unpg.runtime import tune_cpu_allocator
from unpg.tools.pack import pack_rec
from unpg.tools.prepare_dali import prepare_dali

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
LOADERS = ("seed", "torch", "ffcv", "ffcv_threads", "dali")


def rate_median(fn: Callable[[], int], passes: int) -> float:
    """Median images/s of ``passes`` calls of ``fn`` (each returns the images it handled)."""
    rates = []
    for _ in range(passes):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def worker_counts(n: int) -> List[int]:
    """1, 2, 4, ... below ``n``, then ``n``."""
    return [1 << k for k in range(n.bit_length()) if 1 << k < n] + [n]


def ensure_data(args) -> Dict[str, str]:
    rec = DATA / f"synth_{args.identities}x{args.images_per_identity}"
    ensure_dataset(str(rec), args.identities, args.images_per_identity, val_identities=10,
                          val_pairs=20, seed=0, quality=95)
    pack = rec.with_suffix(".unpgpack")
    if not pack.exists() or pack.stat().st_mtime < (rec / "train.rec").stat().st_mtime:
        pack_rec(rec, pack, force=True)
    dali = rec.with_name(rec.name + "_dali")
    manifest = dali / "dali_manifest.json"
    fresh = manifest.exists() and manifest.stat().st_mtime > (rec / "train.rec").stat().st_mtime
    if not fresh and "dali" not in args.skip:
        prepare_dali(rec, dali, shards=2, seed=0, workers=args.workers, force=True)
    return {"rec": str(rec), "pack": str(pack), "dali": str(dali)}


def make_cfg(args, paths, loader: str, workers: int, batch: Optional[int] = None) -> Config:
    cfg = Config()
    cfg.data.rec, cfg.data.ffcv_file, cfg.data.dali_dir = paths["rec"], paths["pack"], paths["dali"]
    cfg.loader.name, cfg.loader.decoder, cfg.loader.workers = loader, args.decoder, workers
    cfg.loader.batches_ahead = 2
    cfg.train.batch_size = batch or args.batch
    return cfg.validate()


def open_loader(args, paths, name: str, workers: int, batch: Optional[int] = None):
    if name == "seed":
        return SeedLoader(SeedDataset(paths["rec"]), batch_size=batch or args.batch, shuffle=True,
                          drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    if name == "ffcv_threads":
        return ThreadedPackedLoader(args, paths, workers, batch or args.batch)
    return build_loader(make_cfg(args, paths, name, workers, batch), 0, 1, args.device)


def _sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def _python_loop(seconds: float) -> None:
    """Pure-Python work holding the GIL for ``seconds`` (the training loop's stand-in)."""
    end, x = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        for i in range(200):
            x += i * i


def bench_loader(args, paths, name: str, workers: int, python_s: float = 0.0) -> float:
    """images/s of ``name`` with ``workers``; ``python_s`` of pure Python after each batch."""
    loader = open_loader(args, paths, name, workers)
    epochs = iter(range(1, 10_000))

    def epoch() -> int:
        loader.set_epoch(next(epochs))
        n = 0
        for _, y in loader:
            n += len(y)
            if python_s:
                _python_loop(python_s)
        _sync(args)
        return n

    epoch()  # warm-up: workers started, page cache and allocator warm
    try:
        return rate_median(epoch, args.passes)
    finally:
        loader.close()


_JPEGS: List[np.ndarray] = []  # inherited by the forked decode processes


def _decode_range(decoder: str, out: np.ndarray, lo: int, hi: int) -> None:
    if decoder == "pil":
        from PIL import Image

        for i in range(lo, hi):
            img = np.asarray(Image.open(io.BytesIO(_JPEGS[i].tobytes())).convert("RGB"))
            np.copyto(out[i], img.transpose(2, 0, 1))
        return
    decode = cpu_decoder(decoder)
    for i in range(lo, hi):
        decode(_JPEGS[i], out[i])


_PROC_STATE: Dict = {}  # decoder, shared output mapping and its shape, set before the fork


def _process_chunk(job) -> int:
    lo, hi = job
    out = np.frombuffer(_PROC_STATE["mm"], np.uint8).reshape(_PROC_STATE["shape"])
    _decode_range(_PROC_STATE["decoder"], out, lo, hi)
    return hi - lo


@contextlib.contextmanager
def gil_load():
    """A thread of this process spinning pure Python until the block ends."""
    stop = threading.Event()
    t = threading.Thread(target=lambda: [_python_loop(0.005) for _ in iter(stop.is_set, True)])
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def bench_decode(args, paths, decoder: str, mode: str, loaded: bool = False) -> float:
    """Decode-only ceiling with ``--workers`` threads or forked processes; ``loaded``: while a
    thread of this process runs pure Python (threads then compete for its GIL too)."""
    with FaceRecIndex.open(paths["rec"]) as index:
        n = min(len(index), args.decode_images)
        _JPEGS[:] = [np.frombuffer(index.read_image(i)[1], np.uint8) for i in range(n)]
    shape = (n, 3, 112, 112)
    mm = mmap.mmap(-1, int(np.prod(shape)))  # shared with the forked processes
    out = np.frombuffer(mm, np.uint8).reshape(shape)
    w = max(1, args.workers)
    bounds = np.linspace(0, n, 4 * w + 1).astype(int)
    jobs = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    _PROC_STATE.update(decoder=decoder, mm=mm, shape=shape)
    with (ThreadPoolExecutor(w) if mode == "threads" else mp.get_context("fork").Pool(w)) as pool:
        def run() -> int:
            if mode == "threads":
                list(pool.map(lambda j: _decode_range(decoder, out, *j), jobs))
            else:
                pool.map(_process_chunk, jobs, chunksize=1)
            return n

        run()
        with gil_load() if loaded else contextlib.nullcontext():
            return rate_median(run, args.passes)


def build_step(args, num_classes: int):
    dev = torch.device(args.device)
    model = build_backbone("mobilefacenet").to(dev).train()
    weight = torch.nn.Parameter(torch.randn(num_classes, 512, device=dev) * 0.01)
    opt = torch.optim.SGD(list(model.parameters()) + [weight], lr=0.1, momentum=0.9)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = margin_softmax_loss(model(images), labels, weight, "arcface", s=64.0, m=0.5,
                                   validate=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_step_alone(args, step, num_classes: int) -> float:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.train_batch, 3, 112, 112, generator=g).to(args.device)
    labels = torch.randint(0, num_classes, (args.train_batch,), generator=g).to(args.device)
    step(images, labels)  # warm-up

    def run() -> int:
        for _ in range(args.train_steps):
            step(images, labels)
        _sync(args)
        return args.train_steps * args.train_batch

    return rate_median(run, args.passes)


def bench_step_fed(args, paths, step, name: str) -> float:
    loader = open_loader(args, paths, name, args.workers, args.train_batch)
    epochs = iter(range(1, 10_000))

    def run(steps: int = args.train_steps) -> int:
        loader.set_epoch(next(epochs))
        done = 0
        for images, labels in loader:
            step(images.to(args.device), labels.to(args.device))
            done += 1
            if done == steps:
                break
        _sync(args)
        return done * args.train_batch

    run(1)  # warm-up
    try:
        return rate_median(run, args.passes)
    finally:
        loader.close()


def _default_decoder() -> str:  # cv2 on a host without simplejpeg
    return "simplejpeg" if importlib.util.find_spec("simplejpeg") else "cv2"


def main(argv: Optional[list] = None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--identities", type=int, default=1000)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the most workers")
    ap.add_argument("--scaling", default="", help="worker counts, e.g. 1,16 (1, 2, 4, ... N)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--decoder", default=_default_decoder(), choices=["cv2", "simplejpeg"])
    ap.add_argument("--passes", type=int, default=3, help="timed passes (median reported)")
    ap.add_argument("--decode-images", type=int, default=8192)
    ap.add_argument("--gil-load-frac", type=float, default=0.25)
    ap.add_argument("--train-batch", type=int, default=32, help="batch of the training parts")
    ap.add_argument("--train-steps", type=int, default=1, help="steps per timed training pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: seed torch ffcv ffcv_threads dali "
                    "decode scaling gil_load train")
    ap.add_argument("--json", help="write {'results': [...]} here")
    args = ap.parse_args(argv)
    if args.passes < 1 or args.workers < 1:
        ap.error("--passes and --workers must be >= 1")
    counts = [int(v) for v in args.scaling.split(",")] if args.scaling else \
        worker_counts(args.workers)
    torch.manual_seed(0)
    if args.device == "cpu":
        tune_cpu_allocator()  # as unpg.train does on a CPU device: no page faults per batch
    paths = ensure_data(args)
    print(f"data: {paths['rec']}; workers {counts}, batch {args.batch} (training {args.train_batch}),"
          f" decoder {args.decoder}, {args.device}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rates: Dict[str, float] = {}

    def put(name: str, value: float) -> None:
        rates[name] = value
        print(f"{name:36s} {value:10.0f}", flush=True)

    loaders = [n for n in LOADERS if n not in args.skip]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loaders' workers own the cores on the data side
    if "decode" not in args.skip:
        for dec in (args.decoder, "pil"):
            for mode in ("threads", "processes"):
                put(f"decode/{dec}/{mode}", bench_decode(args, paths, dec, mode))
        if "gil_load" not in args.skip:
            for mode in ("threads", "processes"):
                put(f"decode/{args.decoder}/{mode}/gil_load",
                    bench_decode(args, paths, args.decoder, mode, loaded=True))
    for name in loaders:
        for w in (counts if "scaling" not in args.skip else [args.workers]):
            try:
                put(f"loader/{name}/{w}", bench_loader(args, paths, name, w))
            except ImportError as e:
                print(f"loader/{name}: skipped ({e})")
                break
    if "gil_load" not in args.skip:
        for name in loaders:
            alone = rates.get(f"loader/{name}/{args.workers}")
            if not alone:
                continue
            per_batch = args.batch / alone * args.gil_load_frac
            put(f"loader/{name}/gil_load", bench_loader(args, paths, name, args.workers,
                                                        python_s=per_batch))
    torch.set_num_threads(threads)
    if "train" not in args.skip:
        with FaceRecIndex.open(paths["rec"]) as index:
            num_classes = index.num_classes
        step = build_step(args, num_classes)
        put("train/step", bench_step_alone(args, step, num_classes))
        for name in loaders:
            if any(k.startswith(f"loader/{name}/") for k in rates):
                put(f"train/fed_by_{name}", bench_step_fed(args, paths, step, name))
    report(rates, args.workers, counts)
    if args.json:
        atomic_write_json(args.json, {"results": [
            {"name": f"{k}/images_per_s", "value": float(v), "unit": "images/s"}
            for k, v in rates.items()]}, indent=1)
    return rates


def report(rates: Dict[str, float], n: int, counts: List[int]) -> None:
    names = sorted({k.split("/")[1] for k in rates if k.startswith("loader/")},
                   key=lambda s: LOADERS.index(s) if s in LOADERS else 99)
    if names:
        print(f"\n{'loader':8s}" + "".join(f"{w:>9d}w" for w in counts) + f"{'gil_load':>10s}")
        for name in names:
            row = "".join(f"{rates[f'loader/{name}/{w}']:10.0f}" if f"loader/{name}/{w}" in rates
                          else f"{'-':>10s}" for w in counts)
            gil = rates.get(f"loader/{name}/gil_load")
            print(f"{name:8s}{row}" + (f"{gil:10.0f}" if gil else f"{'-':>10s}"))
    seed, ffcv = rates.get(f"loader/seed/{n}"), rates.get(f"loader/ffcv/{n}")
    ceiling = max([v for k, v in rates.items() if k.startswith("decode/") and "/pil/" not in k]
                  or [0.0])
    if seed and ffcv:
        print(f"\nffcv / seed at {n} workers = {ffcv / seed:.2f}x (target >= 3x)")
    if ffcv and ceiling:
        print(f"ffcv / best decode ceiling = {ffcv / ceiling:.0%} (target >= 80%)")
    for name in names:
        one, top, gil = (rates.get(f"loader/{name}/{k}") for k in (1, n, "gil_load"))
        if one and top and n > 1:
            print(f"{name} {n} workers / 1 worker = {top / one:.2f}x")
        if gil and top:
            print(f"gil_load costs {name} {1 - gil / top:.0%}"
                  + (" (target <= 20%)" if name == "ffcv" else ""))
    step = rates.get("train/step")
    for name in names:
        fed, alone = rates.get(f"train/fed_by_{name}"), rates.get(f"loader/{name}/{n}")
        if step and fed and alone:
            print(f"train/fed_by_{name} = {fed / min(step, alone):.0%} of min(step, loader)"
                  + (" (target >= 90%)" if name == "ffcv" else ""))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
