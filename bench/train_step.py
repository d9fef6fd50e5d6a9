"""Training-step throughput on in-memory batches: backbone + margin softmax (+ UNPG) + SGD.

    python bench/train_step.py --device cuda --model iresnet100 --batch 512 --amp bf16 \
        --channels-last --json out.json

One step is what ``unpg/train.py`` does per iteration on one GPU: forward under autocast,
ArcFace + UNPG through ``unpg.losses.margin_softmax_loss`` (the fused kernel on CUDA), backward,
SGD with momentum and weight decay (``fused=True`` on CUDA). Data loading is left out on
purpose (``bench/throughput.py`` measures it): the number is the compute ceiling, comparable to
insightface's published per-GPU speeds. Reports the median of ``--passes`` timed passes.
"""
# B: batch, C: classes, D: embedding dim
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def build(args):
    from unpg.losses import margin_softmax_loss
    from unpg.models import build_backbone

    dev = torch.device(args.device)
    model = build_backbone(args.model, embedding_size=args.embedding_size,
                           channels_last=args.channels_last).to(dev).train()
    weight_CD = torch.nn.Parameter(torch.randn(args.classes, args.embedding_size, device=dev) * 0.01)
    params = list(model.parameters()) + [weight_CD]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4,
                          **({"fused": True} if dev.type == "cuda" else {}))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")
    wisk = None if args.no_unpg else args.wisk

    def step(images, labels_B):
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            emb_BD = model(images)
        loss = margin_softmax_loss(emb_BD, labels_B, weight_CD, "arcface", s=64.0, m=0.5,
                                   unpg_wisk=wisk, backend=args.backend, validate=False)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="iresnet100")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--classes", type=int, default=85742)
    ap.add_argument("--embedding-size", type=int, default=512)
    ap.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "chunked", "triton"))
    ap.add_argument("--wisk", type=float, default=1.5)
    ap.add_argument("--no-unpg", action="store_true")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed pass")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--json", help="write {'results': [{name, value, unit}]} here")
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.amp != "none":
        print("note: CPU run; autocast bf16 on CPU is slow, consider --amp none")

    torch.manual_seed(0)
    dev = torch.device(args.device)
    step = build(args)
    images = torch.randn(args.batch, 3, 112, 112, device=dev)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels_B = torch.randint(0, args.classes, (args.batch,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: autotune, cuDNN algorithm search, allocator
        step(images, labels_B)
    sync()
    times = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(images, labels_B)
        sync()
        times.append((time.perf_counter() - t0) / args.steps)
    sec = statistics.median(times)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
    name = f"train_step/{args.model}_b{args.batch}_{args.amp}"
    results = [
        {"name": f"{name}/seconds", "value": sec, "unit": "s"},
        {"name": f"{name}/images_per_s", "value": args.batch / sec, "unit": "images/s"},
        {"name": f"{name}/peak_mb", "value": peak_mb, "unit": "MB"},
    ]
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{args.model}, batch {args.batch}, C={args.classes}, amp {args.amp}, channels_last "
          f"{args.channels_last}, UNPG {'off' if args.no_unpg else args.wisk}, on {where}; "
          f"last loss {float(loss.detach()):.3f}")
    print(f"{'name':48s} {'value':>12s}")
    for r in results:
        print(f"{r['name']:48s} {r['value']:12.4g} {r['unit']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
