"""Training-step throughput on in-memory batches, the loss's share of it, and the backbone alone.

    python bench/train_step.py --device cuda --model iresnet100 --batch 512 --amp bf16 \
        --channels-last [--compile] --json out.json

The full step is ``unpg.trainer.Trainer.train_step`` itself (built with
``Trainer(cfg, num_classes=C).setup(data=False, ...)``): backbone under autocast, the
classifier (ArcFace + UNPG, fc.backend / fc.precision), backward, optimizer step. ``--compile``
sets ``train.compile`` (``torch.compile`` of the backbone, as training does). Data loading is
left out on purpose (``bench/throughput.py`` measures it): the number is the compute ceiling.

The loss's share: timers around the classifier call (CUDA events on CUDA; module hooks start
one before the forward and stop one after it, tensor hooks time its backward from the loss's
gradient to the embedding's), summed per step and divided by the step time.

The backbone alone runs the same backbone, autocast, SGD and compile setting with the loss
replaced by the mean square of the embedding: the step the loss is measured against (the
share target is ~3 %). Each number is the median of ``--passes`` timed passes.
"""
# B: batch, C: classes, D: embedding dim
import argparse
import statistics
import sys
import tempfile
import time
from typing import Callable, List

import torch
from unpg.kernels import BACKENDS, PRECISIONS

from unpg.config import load_config
from unpg.fileio import atomic_write_json
from unpg.models import build_backbone
from unpg.trainer import Trainer


class Stopwatch:
    """Intervals on the device's timeline: CUDA events on CUDA, the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pairs: List[list] = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.pairs.append([self.mark(), None])

    def stop(self) -> None:
        self.pairs[-1][1] = self.mark()

    def total_s(self) -> float:
        """Seconds over all closed intervals (after a device sync), then reset."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self.pairs if b is not None) / 1e3
        else:
            total = sum(b - a for a, b in self.pairs if b is not None)
        self.pairs.clear()
        return total


def time_loss_calls(module: torch.nn.Module, watch: Stopwatch) -> None:
    """Time every call of ``module`` (forward, and its backward through tensor hooks)."""

    def pre(_mod, args):
        watch.start()
        emb = args[0]
        if emb.requires_grad:
            # The embedding's gradient is the classifier backward's last output.
            emb.register_hook(lambda g: (watch.stop(), g)[1])

    def post(_mod, _args, out):
        watch.stop()
        loss = out[0] if isinstance(out, tuple) else out
        if loss.requires_grad:
            # The loss's own gradient is the first thing its backward computes.
            loss.register_hook(lambda g: (watch.start(), g)[1])

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def build_trainer(args, out_dir: str) -> Trainer:
    overrides = [
        f"model.name={args.model}", f"model.embedding_size={args.embedding_size}",
        f"model.channels_last={str(args.channels_last).lower()}",
        f"train.batch_size={args.batch}", f"train.amp={args.amp}",
        f"train.compile={str(args.compile).lower()}", f"train.device={args.device}",
        f"train.output_dir={out_dir}", "train.name=bench", "eval.every=0",
        "head.name=arcface", "head.s=64.0", "head.m=0.5",
        f"unpg.enabled={str(not args.no_unpg).lower()}", f"unpg.wisk={args.wisk}",
        f"fc.backend={args.backend}", f"fc.precision={args.precision}",
    ]
    return Trainer(load_config(None, overrides), num_classes=args.classes).setup(
        data=False, steps_per_epoch=1000)


def backbone_alone(args, device: torch.device) -> Callable[[torch.Tensor], None]:
    """The same backbone, autocast, SGD and compile setting; loss = mean(emb^2)."""
    model = build_backbone(args.model, embedding_size=args.embedding_size,
                           channels_last=args.channels_last).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          **({"fused": True} if device.type == "cuda" else {}))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def step(images):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            emb = fwd(images)
        scaler.scale(emb.float().square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], args, device: torch.device,
          after_warmup: Callable[[], object] = lambda: None) -> float:
    """Median seconds per step over ``--passes`` passes of ``--steps`` steps."""
    for _ in range(args.warmup):  # compile, autotune, cuDNN algorithm search, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    after_warmup()
    times = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / args.steps)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="iresnet100")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--classes", type=int, default=85742)
    ap.add_argument("--embedding-size", type=int, default=512)
    ap.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--wisk", type=float, default=1.5)
    ap.add_argument("--no-unpg", action="store_true")
    ap.add_argument("--no-backbone-alone", action="store_true",
                    help="skip the backbone-alone comparison step")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed pass")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write {'results': [{name, value, unit}]} here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if device.type == "cpu" and args.amp != "none":
        print("note: CPU run; autocast bf16 on CPU is slow, consider --amp none")

    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 112, 112, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels_B = torch.randint(0, args.classes, (args.batch,), device=device)
    with tempfile.TemporaryDirectory(prefix="unpg_bench_") as out_dir:
        trainer = build_trainer(args, out_dir)
        watch = Stopwatch(device)
        time_loss_calls(trainer.classifier, watch)
        last = {}

        def full_step():
            last.update(trainer.train_step(images, labels_B))

        sec = timed(full_step, args, device, after_warmup=watch.total_s)  # drops warm-up
        loss_s = watch.total_s() / (args.passes * args.steps)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    alone = None
    if not args.no_backbone_alone:
        del trainer
        step = backbone_alone(args, device)
        alone = timed(lambda: step(images), args, device)
    tag = f"train_step/{args.model}_b{args.batch}_{args.amp}" + ("_compile" if args.compile else "")
    results = [
        {"name": f"{tag}/seconds", "value": sec, "unit": "s"},
        {"name": f"{tag}/images_per_s", "value": args.batch / sec, "unit": "images/s"},
        {"name": f"{tag}/loss_seconds", "value": loss_s, "unit": "s"},
        {"name": f"{tag}/loss_share", "value": loss_s / sec, "unit": "fraction"},
        {"name": f"{tag}/peak_mb", "value": peak_mb, "unit": "MB"},
    ]
    if alone is not None:
        results += [{"name": f"{tag}/backbone_alone_seconds", "value": alone, "unit": "s"},
                    {"name": f"{tag}/backbone_alone_images_per_s", "value": args.batch / alone,
                     "unit": "images/s"}]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.model}, batch {args.batch}, C={args.classes}, amp {args.amp}, channels_last "
          f"{args.channels_last}, compile {args.compile}, UNPG "
          f"{'off' if args.no_unpg else args.wisk}, fc.backend {args.backend}, fc.precision "
          f"{args.precision}, on {where}; last loss {float(last['loss']):.3f}")
    print(f"{'name':56s} {'value':>12s}")
    for r in results:
        print(f"{r['name']:56s} {r['value']:12.4g} {r['unit']}")
    if args.json:
        atomic_write_json(args.json, {"machine": where, "results": results}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
