"""Margin-softmax + UNPG loss: forward+backward time and peak memory per implementation.

Implementations (ArcFace s=64 m=0.5, UNPG wisk 1.5 by default, MS1MV2 shape B=512 D=512
C=85,742):
  seed     ``unpg.official_loss.official_margin_softmax_loss`` (B x (C + |S'|) concatenated logits)
  torch    ``unpg.losses.margin_softmax_loss(backend='torch')`` (decomposed, full B x C tile)
  chunked  ``margin_softmax_loss(backend='chunked')``; while the loss does not accept that
  triton   backend yet, the same decomposition assembled here around
           ``unpg.kernels.nontarget_lse`` (the table says which path ran). triton: CUDA only.

Each implementation runs in a fresh subprocess: one warm-up, then ``--repeats`` timed
forward+backward passes (median reported). Peak memory is measured above the state after the
warm-up with the inputs alive and gradients cleared:
  CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at that point.
  CPU:  the process's resident-set high-water mark (VmHWM, reset through
        ``/proc/self/clear_refs``) minus VmRSS at that point. torch's CPU allocator does not
        cache, and the children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns
        freed tensor memory at once: this tracks live tensors (tracemalloc cannot see them).
Both include the weight gradient (C x D) every implementation must produce.
On CUDA the table adds achieved TFLOP/s for the nominal 8*B*C*D flops (forward logits, and
backward recompute + dX + dW: ~180 GFLOP at the default shape) and the fraction of
``--peak-tflops`` (roofline time = flops / peak). The CPU is often shared: the load average
before and after is printed; rerun when it is high.

    python bench/loss.py [--json FILE] [--B 512 --D 512 --C 85742] [--repeats 3]
                         [--impls seed,torch,chunked,triton] [--device cpu|cuda]
"""
# B: batch, C: classes, D: embedding dim
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

IMPLS = ("seed", "torch", "chunked", "triton")


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _assembled_loss(args, backend: str) -> Callable:
    """The decomposition of unpg.losses, built on unpg.kernels directly (``ell`` and the
    target cosine from one fused node, so the weight gradient exists once)."""
    import torch
    import torch.nn.functional as F
    from unpg.kernels import nontarget_lse_and_target

    from unpg.heads import build_head
    from unpg.negatives import unpg_logsumexp

    head = build_head(args.head, s=args.s, m=args.m)

    def loss_fn(emb_BD, labels_B, weight_CD):
        norm_B = torch.linalg.vector_norm(emb_BD.float(), dim=1)
        emb_hat_BD = F.normalize(emb_BD, dim=1)
        ell_B, cos_t_B = nontarget_lse_and_target(emb_hat_BD, weight_CD, labels_B, head.s,
                                                  backend=backend, chunk_size=args.chunk_size)
        spsi_B = head.s * head.target_logit(cos_t_B, norm_B)
        terms = [ell_B, spsi_B]
        if args.wisk is not None:
            u, _ = unpg_logsumexp(emb_hat_BD.to(ell_B.dtype), labels_B, head.s, args.wisk)
            terms.append(u.expand_as(ell_B))
        lse_B = torch.logsumexp(torch.stack(terms, dim=1), dim=1)
        return (lse_B - spsi_B).mean() + head.regularizer(norm_B)

    return loss_fn


def _loss_fn(args, impl: str, device) -> Tuple[Callable, str]:
    """``(loss_fn(emb, labels, weight), how)`` for one implementation."""
    import torch

    head_kw = dict(unpg_wisk=args.wisk, s=args.s, m=args.m)
    if impl == "seed":
        from unpg.official_loss import official_margin_softmax_loss

        return (lambda e, y, w: official_margin_softmax_loss(e, y, w, args.head, **head_kw)), "seed"
    from unpg.losses import margin_softmax_loss

    def via_loss(e, y, w):
        return margin_softmax_loss(e, y, w, args.head, backend=impl, validate=False, **head_kw)

    if impl == "torch":
        return via_loss, "margin_softmax_loss"
    try:  # is the backend wired into unpg.losses yet?
        probe = torch.randn(4, 8, device=device)
        via_loss(probe, torch.arange(4, device=device), torch.randn(6, 8, device=device))
        return via_loss, "margin_softmax_loss"
    except ValueError:
        return _assembled_loss(args, impl), "kernels assembly"


def run_child(args) -> Dict[str, object]:
    """Time and measure one implementation in this (fresh) process."""
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    emb = torch.randn(args.B, args.D, generator=gen).to(device, dtype).requires_grad_()
    weight = (0.01 * torch.randn(args.C, args.D, generator=gen)).to(device, dtype)
    weight.requires_grad_()
    labels = torch.randint(0, args.C, (args.B,), generator=gen).to(device)
    loss_fn, how = _loss_fn(args, args.child, device)
    cuda = device.type == "cuda"

    def step() -> float:
        emb.grad = None
        weight.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_fn(emb, labels, weight).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step()  # warm-up: lazy init, Triton compilation
    emb.grad = None
    weight.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        base = _proc_status_kb("VmRSS") * 1024
    times = [step() for _ in range(args.repeats)]
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _proc_status_kb("VmHWM") * 1024 - base
    return {"impl": args.child, "how": how, "seconds": statistics.median(times),
            "all_seconds": times, "peak_mb": peak / 2**20}


def _child_argv(args, impl: str) -> List[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", impl,
            "--B", str(args.B), "--D", str(args.D), "--C", str(args.C),
            "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype,
            "--chunk-size", str(args.chunk_size), "--head", args.head,
            "--s", str(args.s), "--m", str(args.m)]
    return argv + (["--no-unpg"] if args.wisk is None else ["--wisk", str(args.wisk)])


def _child_env() -> Dict[str, str]:
    """glibc serves allocations above the mmap threshold with mmap and returns them on free.
    Pinning the threshold (64 KiB; setting it also stops glibc from raising it dynamically)
    makes freed tensor memory leave the RSS at once, so VmHWM - VmRSS measures live tensors
    instead of heap memory the warm-up left behind for reuse. Same setting for every impl."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write {'results': [{name, value, unit}]} here")
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C", type=int, default=85742)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default=None,
                    help="comma list of seed,torch,chunked,triton (default: all that run here)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="dtype of the embeddings and weight fed to every implementation")
    ap.add_argument("--chunk-size", type=int, default=8192, help="classes per chunk (chunked)")
    ap.add_argument("--head", default="arcface", choices=("arcface", "cosface"))
    ap.add_argument("--s", type=float, default=64.0)
    ap.add_argument("--m", type=float, default=0.5)
    ap.add_argument("--wisk", type=float, default=1.5)
    ap.add_argument("--no-unpg", dest="wisk", action="store_const", const=None)
    ap.add_argument("--peak-tflops", type=float, default=800.0,
                    help="accelerator peak for the roofline column (CUDA only)")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error(f"--repeats must be >= 3 (median of at least three), got {args.repeats}")
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return 0

    default = "seed,torch,chunked,triton" if args.device == "cuda" else "seed,torch,chunked"
    impls = [s.strip() for s in (args.impls or default).split(",") if s.strip()]
    for impl in impls:
        if impl not in IMPLS:
            ap.error(f"--impls: unknown implementation {impl!r}; choose from {IMPLS}")
        if impl == "triton" and args.device != "cuda":
            ap.error("--impls triton needs --device cuda (the CPU interpreter is for tests)")
    flops = 8.0 * args.B * args.C * args.D
    print(f"loss bench: B={args.B} D={args.D} C={args.C} {args.head} s={args.s} m={args.m} "
          f"wisk={args.wisk} device={args.device} dtype={args.dtype} "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows, results = [], []
    for impl in impls:
        print(f"  running {impl} ...", flush=True)
        proc = subprocess.run(_child_argv(args, impl), capture_output=True, text=True,
                              env=_child_env())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"  {impl} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        res = json.loads(lines[-1][len("RESULT "):])
        rows.append(res)
        results += [{"name": f"loss/{impl}/seconds", "value": res["seconds"], "unit": "s"},
                    {"name": f"loss/{impl}/peak_mb", "value": res["peak_mb"], "unit": "MB"}]
        if args.device == "cuda":
            tflops = flops / res["seconds"] / 1e12
            res["tflops"], res["roofline"] = tflops, tflops / args.peak_tflops
            results += [{"name": f"loss/{impl}/tflops", "value": tflops, "unit": "TFLOP/s"},
                        {"name": f"loss/{impl}/roofline_frac", "value": res["roofline"],
                         "unit": "fraction"}]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    header = f"{'impl':<8} {'path':<20} {'seconds':>9} {'peak MB':>9}"
    if args.device == "cuda":
        header += f" {'TFLOP/s':>8} {'roofline':>8}"
    print(header)
    for r in rows:
        line = f"{r['impl']:<8} {r['how']:<20} {r['seconds']:>9.3f} {r['peak_mb']:>9.1f}"
        if args.device == "cuda":
            line += f" {r['tflops']:>8.1f} {r['roofline']:>8.1%}"
        print(line)
    if args.device == "cuda":
        print(f"nominal work {flops / 1e9:.0f} GFLOP; roofline time at {args.peak_tflops:.0f} "
              f"TFLOP/s: {flops / args.peak_tflops / 1e9:.3f} ms")
    if args.json:
        from unpg.fileio import atomic_write_json

        atomic_write_json(args.json, {"results": results}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
