"""Margin-softmax (+ UNPG) loss: time and peak memory per implementation, side by side.

For each class count ``C`` and each state, every implementation runs in one process on the
same inputs; after a warm-up (Triton compilation and tuning) and one step that measures peak
memory, ``--repeats`` timed forward+backward steps run round-robin over the implementations
(so load drifts hit all alike), and the median is reported with its ratio to the 3-GEMM floor.

States (the loss's cost depends on them: filtering peers skip tiles of tiny probabilities):
  init     random unit embeddings, weight ~ N(0, 0.01): near-uniform softmax
  trained  embeddings near their class centre (target cosine ~0.5), the rest as init

Implementations (``s`` = 64, ArcFace m = 0.5, UNPG wisk 1.5 unless changed; embeddings in
``--dtype``, the weight is an fp32 master copy as in training):
  gemm3     the floor: three cuBLAS matmuls of the loss's shape in ``--dtype`` (logits, dX, dW)
  fwd       ``unpg.kernels.lse_and_target`` forward only
  kernel    ``unpg.kernels.lse_and_target`` forward + backward (normalisation fused)
  train     the training call: ``unpg.losses.margin_softmax_loss(emb, labels, weight,
            "arcface", s, m, unpg_wisk, precision=...)`` on ``--dtype`` embeddings, as the
            trainer calls it after an autocast backbone
  chunked   ``lse_and_target(backend="chunked")`` (the memory-lean torch twin)
  torch     unfused torch: ``cross_entropy((s * x_hat) @ w_hat^T)``
  official  the paper's official formulation (``unpg.official_loss``)
  cce       Apple's ``cut_cross_entropy.linear_cross_entropy(s * x_hat, w_hat)`` (if installed)
  liger     ``liger_kernel``'s fused linear cross-entropy on the same inputs (if installed)
The peers torch/cce/liger get the logits the kernel computes: ``w_hat = F.normalize(W)`` is
done in torch inside their step, so their times include the normalisation the kernel fuses.

Peak memory (``peak_mb``) is above the inputs and the gradients every implementation must
produce (``B x D`` and ``C x D``): CUDA ``max_memory_allocated``; CPU the resident-set
high-water mark (VmHWM, reset through ``/proc/self/clear_refs``; the process runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the RSS at once).

``--json`` names: ``loss/<impl>/<C>_<state>/ms`` and ``loss/<impl>/<C>_<state>/peak_mb``
(e.g. ``loss/kernel/85742_init/ms``), plus ``.../x_floor`` when gemm3 ran and, for the
Triton kernel, ``.../max_rel_diff_vs_chunked`` (its values and gradients against the chunked
twin at the same precision, with the tile plans tuning chose).

    python bench/loss.py [--device cuda] [--C 85742,2059906] [--states init,trained]
                         [--impls ...] [--dtype bfloat16] [--precision auto] [--json FILE]
"""
# B: batch, C: classes, D: embedding dim
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from unpg.kernels import BACKENDS, PRECISIONS, lse_and_target, resolve_backend

from unpg.fileio import atomic_write_json
from unpg.losses import margin_softmax_loss
from unpg.official_loss import official_margin_softmax_loss

IMPLS = ("gemm3", "fwd", "kernel", "train", "chunked", "torch", "official", "cce", "liger")
OPTIONAL = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _rss_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


class Inputs:
    """One state's tensors: normalised embeddings, raw embeddings, fp32 master weight."""

    def __init__(self, args, C: int, state: str, device: torch.device, floor: bool) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        B, D = args.B, args.D
        self.labels = torch.randint(0, C, (B,), device=device, generator=gen)
        self.weight = (0.01 * torch.randn(C, D, device=device, generator=gen)).requires_grad_()
        x = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=1)
        if state == "trained":
            # cos(x_i, w_{y_i}) = 0.5: the centre's direction plus an orthogonal unit part.
            centre = F.normalize(self.weight.detach()[self.labels], dim=1)
            ortho = F.normalize(x - (x * centre).sum(1, keepdim=True) * centre, dim=1)
            x = 0.5 * centre + math.sqrt(0.75) * ortho
        dtype = getattr(torch, args.dtype)
        self.x_hat = x.to(dtype).detach().clone().requires_grad_()
        self.emb = (10.0 * x).to(dtype).detach().requires_grad_()  # raw output, norm ~10
        self.grad_bytes = B * D * dtype.itemsize + C * D * 4
        # The floor's operands: plain low-precision copies (no normalisation, no master copy).
        self.x_lp = self.x_hat.detach().clone() if floor else None
        self.w_lp = self.weight.detach().to(dtype) if floor else None

    def clear(self) -> None:
        for t in (self.x_hat, self.emb, self.weight):
            t.grad = None


def _steps(args, inp: Inputs) -> Dict[str, Callable[[], None]]:
    """One callable per implementation: a full step (forward, and backward where it applies)."""
    s, dtype = args.s, getattr(torch, args.dtype)
    kw = dict(backend=args.backend, precision=args.precision)

    def gemm3():
        x, w = inp.x_lp, inp.w_lp
        logits = x @ w.t()  # forward product; dX and dW reuse it as the incoming gradient
        torch.mm(logits, w)
        torch.mm(logits.t(), x)

    def fwd():
        with torch.no_grad():
            lse_and_target(inp.x_hat, inp.weight, inp.labels, s, **kw)

    def kernel(backend=None):
        ell, cos_t = lse_and_target(inp.x_hat, inp.weight, inp.labels, s,
                                    backend=backend or args.backend, precision=args.precision)
        (ell.sum() - s * cos_t.sum()).backward()

    def train():
        margin_softmax_loss(inp.emb, inp.labels, inp.weight, args.head, s=s, m=args.m,
                            unpg_wisk=args.wisk, validate=False, **kw).backward()

    def peer_inputs():
        return (s * inp.x_hat).to(dtype), F.normalize(inp.weight, dim=1).to(dtype)

    def torch_unfused():
        e, c = peer_inputs()
        F.cross_entropy((e @ c.t()).float(), inp.labels).backward()

    def official():
        official_margin_softmax_loss(inp.emb, inp.labels, inp.weight, args.head, s=s, m=args.m,
                                     unpg_wisk=args.wisk).backward()

    def cce():
        from cut_cross_entropy import linear_cross_entropy  # optional peer (pip: bench extra)

        e, c = peer_inputs()
        linear_cross_entropy(e, c, inp.labels).backward()

    def liger():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional peer

        e, c = peer_inputs()
        LigerFusedLinearCrossEntropyLoss()(c, e, inp.labels).backward()

    return {"gemm3": gemm3, "fwd": fwd, "kernel": kernel, "train": train,
            "chunked": lambda: kernel("chunked"), "torch": torch_unfused, "official": official,
            "cce": cce, "liger": liger}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(step: Callable[[], None], inp: Inputs, device: torch.device,
             with_grads: bool) -> float:
    """Memory above the live inputs (and the gradients, for steps that make them)."""
    inp.clear()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        base = _rss_kb("VmRSS") * 1024
        step()
        peak = _rss_kb("VmHWM") * 1024 - base
    return (peak - (inp.grad_bytes if with_grads else 0)) / 2**20


def _time(step: Callable[[], None], inp: Inputs, device: torch.device) -> float:
    inp.clear()
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def _diff_vs_twin(args, inp: Inputs) -> float:
    """Largest relative difference of (ell, cos_t, dX, dW) between the kernel and the chunked
    twin at the same precision: a tuned tile plan that computes wrong would show here."""
    outs = []
    for backend in (args.backend, "chunked"):
        inp.clear()
        ell, cos_t = lse_and_target(inp.x_hat, inp.weight, inp.labels, args.s, backend=backend,
                                    precision=args.precision)
        (ell.sum() - args.s * cos_t.sum()).backward()
        outs.append((ell.detach(), cos_t.detach(), inp.x_hat.grad.float(), inp.weight.grad))
    inp.clear()
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(*outs))


def run_case(args, impls: List[str], C: int, state: str, device: torch.device) -> List[dict]:
    inp = Inputs(args, C, state, device, floor="gemm3" in impls)
    steps = _steps(args, inp)
    rows: Dict[str, dict] = {}
    for impl in impls:
        steps[impl]()  # warm-up: compilation, Triton tuning, allocator
        grads = impl not in ("gemm3", "fwd")
        rows[impl] = {"impl": impl, "C": C, "state": state, "times": [],
                      "peak_mb": _peak_mb(steps[impl], inp, device, grads)}
    for _ in range(args.repeats):
        for impl in impls:
            rows[impl]["times"].append(_time(steps[impl], inp, device))
    floor = statistics.median(rows["gemm3"]["times"]) if "gemm3" in rows else None
    for row in rows.values():
        row["ms"] = 1e3 * statistics.median(row["times"])
        row["x_floor"] = row["ms"] / (1e3 * floor) if floor else None
    if "kernel" in rows and resolve_backend(args.backend, inp.x_hat) != "chunked":
        rows["kernel"]["diff_vs_chunked"] = _diff_vs_twin(args, inp)
    del inp, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def _default_impls(device: torch.device) -> str:
    if device.type == "cuda":
        return "gemm3,fwd,kernel,train,torch,official,cce,liger"
    return "official,torch,chunked,train"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write {'results': [{name, value, unit}]} here")
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--C", default=None,
                    help="comma list of class counts (default: 85742,2059906 on CUDA, 85742 "
                         "on CPU)")
    ap.add_argument("--states", default=None,
                    help="comma list of init,trained (default: both on CUDA, init on CPU)")
    ap.add_argument("--impls", default=None, help=f"comma list of {','.join(IMPLS)} (default: "
                    "all on CUDA, uninstalled optional peers skipped; official,torch,chunked,"
                    "train on CPU)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="embedding dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto")
    ap.add_argument("--backend", choices=BACKENDS, default="auto")
    ap.add_argument("--head", default="arcface", choices=("arcface", "cosface"))
    ap.add_argument("--s", type=float, default=64.0)
    ap.add_argument("--m", type=float, default=0.5)
    ap.add_argument("--wisk", type=float, default=1.5)
    ap.add_argument("--no-unpg", dest="wisk", action="store_const", const=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error(f"--repeats must be >= 3 (median of at least three), got {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if device.type == "cpu" and os.environ.get(MMAP_ENV) != "65536":
        # Freed tensors must leave the RSS at once for the VmHWM measure: re-run with glibc's
        # mmap threshold pinned (it must be set before the process starts).
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, **{MMAP_ENV: "65536"}))
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    cuda = device.type == "cuda"
    try:
        classes = [int(c) for c in (args.C or ("85742,2059906" if cuda else "85742")).split(",")]
    except ValueError:
        ap.error(f"--C: comma list of integers expected, got {args.C!r}")
    states = [s for s in (args.states or ("init,trained" if cuda else "init")).split(",") if s]
    impls = [i for i in (args.impls or _default_impls(device)).split(",") if i]
    for name, seen, allowed in (("--states", states, ("init", "trained")),
                                ("--impls", impls, IMPLS)):
        bad = [x for x in seen if x not in allowed]
        if bad:
            ap.error(f"{name}: unknown {bad}; choose from {','.join(allowed)}")
    if "gemm3" in impls and not cuda:
        ap.error("--impls gemm3 is the cuBLAS floor: it needs --device cuda")
    for impl, module in OPTIONAL.items():
        if impl in impls and importlib.util.find_spec(module) is None:
            print(f"note: {impl} skipped: {module} is not installed (pip install "
                  f"'unpg[bench]')")
            impls.remove(impl)
    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    print(f"loss bench on {where}: B={args.B} D={args.D} {args.head} s={args.s} m={args.m} "
          f"wisk={args.wisk} emb {args.dtype}, fp32 weight, precision={args.precision} "
          f"backend={args.backend}; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for C in classes:
        for state in states:
            print(f"  C={C} {state} ...", flush=True)
            rows += run_case(args, impls, C, state, device)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"{'impl':<9} {'C':>9} {'state':<8} {'ms':>10} {'x floor':>8} {'peak MB':>9}")
    results = []
    for r in rows:
        xf = f"{r['x_floor']:8.2f}" if r["x_floor"] else f"{'-':>8}"
        print(f"{r['impl']:<9} {r['C']:>9} {r['state']:<8} {r['ms']:>10.3f} {xf} "
              f"{r['peak_mb']:>9.1f}")
        key = f"loss/{r['impl']}/{r['C']}_{r['state']}"
        results += [{"name": f"{key}/ms", "value": r["ms"], "unit": "ms"},
                    {"name": f"{key}/peak_mb", "value": r["peak_mb"], "unit": "MB"}]
        if r["x_floor"]:
            results.append({"name": f"{key}/x_floor", "value": r["x_floor"], "unit": "ratio"})
        if "diff_vs_chunked" in r:
            print(f"          kernel vs chunked twin: max relative difference "
                  f"{r['diff_vs_chunked']:.2e} (ell, cos_t, dX, dW)")
            results.append({"name": f"{key}/max_rel_diff_vs_chunked",
                            "value": r["diff_vs_chunked"], "unit": "ratio"})
    if args.json:
        atomic_write_json(args.json, {"machine": where, "results": results}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
