"""Data-loading throughput: each loader alone, decode-only ceilings, the training step alone, and
the training step fed by a loader (which side is the bottleneck). The profiling entry point.

    python bench/throughput.py [--json FILE] [--profile DIR] [--workers 2] [--batch 128]

Data: a synthetic insightface rec of ``--identities x --images-per-identity`` (default 1000 x 20 =
20,000) 112x112 JPEGs (quality 95, like insightface's packing) under ``bench/data/`` (git-ignored),
generated once and reused, plus its packed file (ffcv) and prepared shards (DALI).

Measured (every loader with the same ``--workers`` threads/processes; median of ``--passes``
full epochs after a warm-up):

* ``loader/seed``: what the official code does — a ``DataLoader`` whose workers decode each image with PIL,
  resize it to 112 (bicubic), flip it at random and normalise it (ImageNet mean/std) one by one.
  It reads the JPEG bytes from the same memory-mapped rec (the official code reads image files; reading
  files only adds cost), so the comparison isolates the per-sample decode/transform path.
* ``loader/torch``, ``loader/ffcv`` (``loader/ffcv_<decoder>`` for other decoders), ``loader/dali``
  (CPU pipeline here): ``unpg.loaders.build_loader`` output, normalised float batches.
* ``decode/<decoder>``: decode-only ceiling, the same JPEGs from memory with ``--workers`` threads
  into a preallocated buffer, nothing else.
* ``train/step``: mobilefacenet + ArcFace margin-softmax forward/backward/SGD on in-memory batches;
  ``train/fed_by_<loader>``: the same step fed by that loader.

Names in ``--json``: ``{"results": [{"name", "value", "unit"}]}``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS: List[Dict] = []


def record(name: str, value: float, unit: str = "images/s") -> None:
    RESULTS.append({"name": name, "value": float(value), "unit": unit})


def rate_median(fn: Callable[[], int], passes: int) -> float:
    """Median images/s of ``passes`` calls of ``fn`` (each returns the images it handled)."""
    rates = []
    for _ in range(passes):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


# ----------------------------------------------------------------------------- data
def ensure_data(args) -> Dict[str, str]:
    from unpg.data.synthetic import ensure_dataset
    from unpg.tools.pack import pack_rec
    from unpg.tools.prepare_dali import prepare_dali

    rec = DATA / f"synth_{args.identities}x{args.images_per_identity}"
    meta = ensure_dataset(str(rec), args.identities, args.images_per_identity, val_identities=10,
                          val_pairs=20, seed=0, quality=95)
    pack = rec.with_suffix(".unpgpack")
    if not pack.exists() or pack.stat().st_mtime < (rec / "train.rec").stat().st_mtime:
        pack_rec(rec, pack)
    dali = rec.with_name(rec.name + "_dali")
    try:
        m = json.loads((dali / "dali_manifest.json").read_text())
        fresh = m["source_images"] == meta["num_images"] and \
            (dali / "dali_manifest.json").stat().st_mtime > (rec / "train.rec").stat().st_mtime
    except (OSError, ValueError, KeyError):
        fresh = False
    if not fresh:
        prepare_dali(rec, dali, shards=2, seed=0, workers=args.workers)
    return {"rec": str(rec), "pack": str(pack), "dali": str(dali)}


def make_cfg(args, paths, loader: str, decoder: str = "cv2", normalize: str = "insightface"):
    from unpg.config import Config

    cfg = Config()
    cfg.data.rec, cfg.data.ffcv_file, cfg.data.dali_dir = paths["rec"], paths["pack"], paths["dali"]
    cfg.data.normalize = normalize
    cfg.loader.name, cfg.loader.decoder, cfg.loader.workers = loader, decoder, args.workers
    cfg.loader.batches_ahead = 2
    cfg.train.batch_size = args.batch
    return cfg.validate()


# ----------------------------------------------------------------------------- seed baseline
class SeedDataset(torch.utils.data.Dataset):
    """Per sample: PIL decode, bicubic resize to 112, random flip, ToTensor, Normalize."""

    def __init__(self, rec_dir: str):
        from unpg.config import NORMALIZE_MEAN_STD
        from unpg.recordio import FaceRecIndex

        self.index = FaceRecIndex.open(rec_dir)
        mean, std = NORMALIZE_MEAN_STD["imagenet"]
        self.mean = torch.tensor(mean).view(3, 1, 1) / 255
        self.std = torch.tensor(std).view(3, 1, 1) / 255

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        label, jpeg = self.index.read_image(i)
        img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((112, 112), Image.BICUBIC)
        if torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, label


def bench_seed(args, paths) -> float:
    try:
        import PIL  # noqa: F401
    except ImportError:
        print("PIL not importable: skipping the official code baseline")
        return float("nan")
    ds = SeedDataset(paths["rec"])
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                                     num_workers=args.workers, persistent_workers=args.workers > 0)

    def epoch() -> int:
        return sum(len(y) for _, y in dl)

    _warm(dl)
    return rate_median(epoch, args.passes)


def _warm(loader, batches: int = 5) -> None:
    for k, _ in enumerate(loader):
        if k + 1 >= batches:
            break


# ----------------------------------------------------------------------------- loaders
@contextlib.contextmanager
def torch_threads(n: int):
    """Loader benchmarks run with one torch (OpenMP) thread: the loaders' own ``--workers``
    threads/processes own the cores, and OpenMP workers spinning beside them on a busy machine
    cost more than they give (the on-device normalisation of a CPU batch is ~30 us/image)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_loader(args, paths, name: str, decoder: str = "cv2") -> float:
    from unpg.loaders import build_loader

    loader = build_loader(make_cfg(args, paths, name, decoder), 0, 1, args.device)
    _warm(loader)
    epochs = iter(range(1, 1000))

    def epoch() -> int:
        loader.set_epoch(next(epochs))
        n = 0
        for _, y in loader:
            n += len(y)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return n

    rate = rate_median(epoch, args.passes)
    if hasattr(loader, "close"):
        loader.close()
    return rate


def bench_decode(args, paths, decoder: str) -> float:
    """Decode-only ceiling: the rec's JPEGs from memory, ``--workers`` threads, preallocated out."""
    from unpg.loaders.decode import cpu_decoder

    from unpg.recordio import FaceRecIndex

    with FaceRecIndex.open(paths["rec"]) as index:
        n = min(len(index), args.decode_images)
        jpegs = [np.frombuffer(index.read_image(i)[1], np.uint8) for i in range(n)]
    if decoder == "pil":
        from PIL import Image

        def decode(buf, out):
            img = np.asarray(Image.open(io.BytesIO(buf.tobytes())).convert("RGB"))
            np.copyto(out, img.transpose(2, 0, 1))
    else:
        decode = cpu_decoder(decoder)
    out = np.empty((n, 3, 112, 112), np.uint8)
    bounds = np.linspace(0, n, 2 * max(1, args.workers) + 1).astype(int)

    def chunk(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            decode(jpegs[i], out[i])

    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        def run() -> int:
            list(pool.map(chunk, bounds[:-1], bounds[1:]))
            return n

        run()  # warm-up
        return rate_median(run, args.passes)


# ----------------------------------------------------------------------------- training step
def build_step(args, num_classes: int):
    try:
        from unpg.losses import margin_softmax_loss
        from unpg.models import build_backbone
    except ImportError as e:
        raise SystemExit(f"training-step benchmark needs unpg.models.build_backbone and "
                         f"unpg.losses.margin_softmax_loss: {e}") from None
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
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return args.train_steps * args.train_batch

    return rate_median(run, args.passes)


def bench_step_fed(args, paths, step, name: str, profile: Optional[str]) -> float:
    from unpg.loaders import build_loader

    cfg = make_cfg(args, paths, name)
    cfg.train.batch_size = args.train_batch
    loader = build_loader(cfg, 0, 1, args.device)
    epochs = iter(range(1, 1000))

    def run(steps: int = args.train_steps) -> int:
        loader.set_epoch(next(epochs))
        done = 0
        for images, labels in loader:
            step(images, labels)
            done += 1
            if done == steps:
                break
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return done * args.train_batch

    run(1)  # warm-up
    rate = rate_median(run, args.passes)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        os.makedirs(profile, exist_ok=True)
        with torch_profile(activities=acts, record_shapes=True) as prof:
            run(min(3, args.train_steps))
        trace = os.path.join(profile, f"train_fed_by_{name}.json")
        prof.export_chrome_trace(trace)
        print(f"profiler trace: {trace}")
    return rate


# ----------------------------------------------------------------------------- main
def main(argv: Optional[list] = None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--identities", type=int, default=1000)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="threads/processes for every loader")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--passes", type=int, default=3, help="timed passes (median reported)")
    ap.add_argument("--decode-images", type=int, default=8192)
    ap.add_argument("--train-batch", type=int, default=32,
                    help="batch of the training-step parts (mobilefacenet on a CPU is ~5 img/s)")
    ap.add_argument("--train-steps", type=int, default=1, help="steps per timed training pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="parts to skip: seed torch ffcv dali decode train")
    ap.add_argument("--json", help="write {'results': [...]} here")
    ap.add_argument("--profile", help="write a torch profiler trace of the fed training step here")
    args = ap.parse_args(argv)
    if args.passes < 1:
        ap.error("--passes must be >= 1")
    torch.manual_seed(0)
    paths = ensure_data(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"data: {paths['rec']}; {args.workers} workers, batch {args.batch} (training parts "
          f"{args.train_batch}), device {args.device}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average {load:.1f} (other processes share the CPUs)")
    rates: Dict[str, float] = {}
    with torch_threads(1):
        _bench_data_side(args, paths, rates)
    if "train" not in args.skip:
        from unpg.recordio import FaceRecIndex

        with FaceRecIndex.open(paths["rec"]) as index:
            num_classes = index.num_classes
        step = build_step(args, num_classes)
        rates["train/step"] = bench_step_alone(args, step, num_classes)
        rates["train/fed_by_ffcv"] = bench_step_fed(args, paths, step, "ffcv", args.profile)
    for name, value in rates.items():
        record(f"{name}/images_per_s", value)
    _report(rates)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": RESULTS}, indent=1) + "\n")
    return RESULTS


def _bench_data_side(args, paths, rates: Dict[str, float]) -> None:
    if "decode" not in args.skip:
        for dec in ("cv2", "simplejpeg", "pil"):
            try:
                rates[f"decode/{dec}"] = bench_decode(args, paths, dec)
            except ImportError as e:
                print(f"decode/{dec}: skipped ({e})")
    if "seed" not in args.skip:
        rates["loader/seed"] = bench_seed(args, paths)
    if "torch" not in args.skip:
        rates["loader/torch"] = bench_loader(args, paths, "torch")
    if "ffcv" not in args.skip:
        rates["loader/ffcv"] = bench_loader(args, paths, "ffcv")
        try:
            rates["loader/ffcv_simplejpeg"] = bench_loader(args, paths, "ffcv", "simplejpeg")
        except ImportError as e:
            print(f"loader/ffcv_simplejpeg: skipped ({e})")
        if args.device.startswith("cuda"):
            # Batched nvJPEG decode on the GPU (torchvision.io.decode_jpeg, device='cuda').
            try:
                rates["loader/ffcv_nvjpeg"] = bench_loader(args, paths, "ffcv", "nvjpeg")
            except ImportError as e:
                print(f"loader/ffcv_nvjpeg: skipped ({e})")
    if "dali" not in args.skip:
        try:
            rates["loader/dali"] = bench_loader(args, paths, "dali")
        except ImportError as e:
            print(f"loader/dali: skipped ({e})")


def _report(rates: Dict[str, float]) -> None:
    print(f"\n{'name':32s} {'images/s':>10s}")
    for name, value in rates.items():
        print(f"{name:32s} {value:10.0f}")
    seed, ffcv = rates.get("loader/seed"), rates.get("loader/ffcv")
    if seed and ffcv:
        print(f"\nffcv / seed = {ffcv / seed:.2f}x (target >= 3x)")
    for dec, key in (("cv2", "loader/ffcv"), ("simplejpeg", "loader/ffcv_simplejpeg")):
        if key in rates and f"decode/{dec}" in rates:
            print(f"{key} / decode/{dec} ceiling = {rates[key] / rates[f'decode/{dec}']:.0%} "
                  f"(target >= 70%)")
    step, fed = rates.get("train/step"), rates.get("train/fed_by_ffcv")
    if step and fed and ffcv:
        side = "the training step" if step < ffcv else "the loader"
        print(f"training step alone {step:.0f}/s, ffcv alone {ffcv:.0f}/s, fed {fed:.0f}/s: "
              f"bottleneck is {side}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
