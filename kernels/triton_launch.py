"""Launchers of the Triton kernels: tile plans, work splits, and autotuning on CUDA.

Import only on the Triton path. A ``Plan`` fixes the tiles of one kernel; on CUDA the plan of
each (kernel, compute dtype, storage dtypes, shape bucket) is chosen once by timing a small
per-dtype candidate set on the real arguments (``triton.testing.do_bench``: one host sync per
new bucket, none in steady state) and cached for the process. Buckets are powers of two of B
and C and the exact D, so a training run tunes once. Under ``TRITON_INTERPRET=1`` one fixed
plan is used: the interpreter cannot run multi-config tuning and its cost is per program.

``UNPG_TRITON_AUTOTUNE=0`` skips the timing and takes each set's first candidate that compiles
(the GPU tests use it: they check results, and tuning would multiply their compile time).

``LAST_LAUNCH`` records the compute dtype and plan of the latest launch of each kernel, so a
test can see what a call really ran (e.g. bf16 tiles for bf16 embeddings with an fp32 weight).
"""
# B: batch, C: classes (local shard), D: embedding dim, S: splits
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
from triton.testing import do_bench

from . import triton_kernels as tk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, as here
AUTOTUNE = os.environ.get("UNPG_TRITON_AUTOTUNE", "1") != "0"
TILE_CODES = {"ieee": 0, "tf32": 1, "bf16": 2, "fp16": 3}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DX_PARTIAL_BYTES = 64 * 2**20  # cap of the dX pass's [splits, B, D] fp32 partials
LAST_LAUNCH: Dict[str, Tuple[str, "Plan"]] = {}


@dataclass(frozen=True)
class Plan:
    """Tiles of one launch. ``splits``: class splits (forward, dX); ``None`` = from the shape.
    ``block_do``: output columns of D per program in the backward passes."""

    block_b: int
    block_c: int
    block_d: int
    block_do: int = 64
    num_warps: int = 4
    num_stages: int = 1
    splits: Optional[int] = None


def candidate_plans(kind: str, half: bool) -> Tuple[Plan, ...]:
    """Small per-dtype candidate sets (untuned starting points, chosen for Hopper).

    Backward accumulators are ``block_b x block_do`` (dX) or ``block_c x block_do`` (dW) fp32
    registers; a block_do below D recomputes the products once per D block, so the sets trade
    register pressure against recomputation."""
    if kind == "fwd":
        if half:  # the first of each set is the conservative one (see UNPG_TRITON_AUTOTUNE)
            return (Plan(128, 128, 64, num_warps=8, num_stages=3),
                    Plan(64, 128, 64, num_warps=4, num_stages=4),
                    Plan(128, 256, 64, num_warps=8, num_stages=3),
                    Plan(128, 64, 64, num_warps=4, num_stages=4))
        return (Plan(64, 64, 32, num_warps=4, num_stages=3),
                Plan(128, 64, 32, num_warps=8, num_stages=3),
                Plan(64, 128, 32, num_warps=4, num_stages=3))
    # Half tiles: a [64, 512] bf16 operand is 64 KB of shared memory, a 64 x 512 fp32
    # accumulator 128 registers per thread at 8 warps. Written for dX, whose accumulator rows
    # are block_b; dW's are block_c, so its candidates are the same with the two swapped.
    if half:
        dx = (Plan(64, 64, 64, block_do=256, num_warps=8, num_stages=2),
              Plan(64, 64, 64, block_do=512, num_warps=8, num_stages=2),
              Plan(32, 64, 64, block_do=512, num_warps=4, num_stages=2),
              Plan(128, 64, 64, block_do=256, num_warps=8, num_stages=2))
    else:
        dx = (Plan(64, 64, 32, block_do=128, num_warps=4, num_stages=2),
              Plan(64, 64, 32, block_do=256, num_warps=8, num_stages=2),
              Plan(32, 64, 32, block_do=512, num_warps=8, num_stages=2))
    if kind == "dx":
        return dx
    return tuple(replace(p, block_b=p.block_c, block_c=p.block_b) for p in dx)


def interpreter_plan(kind: str) -> Plan:
    """Few, large tiles: the interpreter's cost is per program instance."""
    if kind == "fwd":
        return Plan(16, 128, 64)
    return Plan(16, 64, 64, block_do=64)


def _target_programs(device: torch.device) -> int:
    """About two waves of programs: enough to fill the GPU without tiny splits."""
    if INTERPRET or device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _even_split(num_items: int, parts: int) -> Tuple[int, int]:
    """``(items_per_part, parts)`` with no empty part."""
    parts = max(1, min(parts, num_items))
    per = triton.cdiv(num_items, parts)
    return per, triton.cdiv(num_items, per)


def _fit(plan: Plan, D: int) -> Plan:
    """No D block wider than D needs (padded to a power of two)."""
    d_pad = triton.next_power_of_2(max(D, 16))
    return replace(plan, block_do=min(plan.block_do, d_pad), block_d=min(plan.block_d, d_pad))


_TUNED: Dict[tuple, Plan] = {}


def choose_plan(kind: str, tile: str, x_BD: torch.Tensor, w_CD: torch.Tensor,
                launch: Callable[[Plan], None], forced: Optional[Plan] = None) -> Plan:
    """The plan for this launch: ``forced``, the interpreter's, or the tuned one (cached)."""
    B, D = x_BD.shape
    C = w_CD.shape[0]
    if forced is not None:
        return _fit(forced, D)
    if INTERPRET or x_BD.device.type != "cuda":
        return _fit(interpreter_plan(kind), D)
    half = tile in ("bf16", "fp16")
    key = (kind, tile, x_BD.dtype, w_CD.dtype, triton.next_power_of_2(B),
           triton.next_power_of_2(C), D, x_BD.device.index)
    if key not in _TUNED:
        best, best_ms, error = None, float("inf"), None
        for plan in dict.fromkeys(_fit(p, D) for p in candidate_plans(kind, half)):
            try:
                ms = do_bench(lambda p=plan: launch(p), warmup=5, rep=20) if AUTOTUNE \
                    else launch(plan) or 0.0
            except Exception as exc:  # a config the compiler cannot fit (shared memory...)
                error = exc
                continue
            if ms < best_ms:
                best, best_ms = plan, ms
            if not AUTOTUNE:
                break  # the first candidate that compiles
        if best is None:
            raise RuntimeError(f"triton {kind} kernel: no candidate tile plan compiled for "
                               f"B={B} C={C} D={D} {tile}") from error
        _TUNED[key] = best
    return _TUNED[key]


def check_dtypes(x_BD: torch.Tensor, w_CD: torch.Tensor) -> None:
    if x_BD.dtype not in SUPPORTED_DTYPES or w_CD.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"backend='triton': dtypes {x_BD.dtype}/{w_CD.dtype} not supported; use float16, "
            "bfloat16 or float32 (float64: backend='chunked')")


def lse_forward(x_BD, w_CD, labels_B, scale: float, class_start: int, tile: str,
                forced: Optional[Plan] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ell_B, inv_C)`` (float32): the split forward kernel, a logsumexp over the splits, and
    the class norms ``1/max(|w_j|, eps)`` it computed on the way."""
    B, D = x_BD.shape
    C = w_CD.shape[0]
    inv_C = torch.zeros(C, dtype=torch.float32, device=w_CD.device)
    if B == 0 or C == 0:
        return torch.full((B,), float("-inf"), dtype=torch.float32, device=x_BD.device), inv_C
    out = {}

    def launch(plan: Plan) -> None:
        row_blocks = triton.cdiv(B, plan.block_b)
        want = plan.splits or triton.cdiv(_target_programs(x_BD.device), row_blocks)
        tiles_per_split, splits = _even_split(triton.cdiv(C, plan.block_c), want)
        m_SB = torch.empty(splits, B, dtype=torch.float32, device=x_BD.device)
        l_SB = torch.empty_like(m_SB)
        tk.fwd_kernel[(row_blocks, splits)](
            x_BD, w_CD, inv_C, labels_B, m_SB, l_SB, B, C, D, class_start, scale,
            tiles_per_split, x_BD.stride(0), w_CD.stride(0),
            BLOCK_B=plan.block_b, BLOCK_C=plan.block_c, BLOCK_D=plan.block_d,
            TILE=TILE_CODES[tile], INTERP=INTERPRET,
            num_warps=plan.num_warps, num_stages=plan.num_stages)
        out["m"], out["l"] = m_SB, l_SB

    plan = choose_plan("fwd", tile, x_BD, w_CD, launch, forced)
    launch(plan)
    LAST_LAUNCH["fwd"] = (tile, plan)
    return torch.logsumexp(out["m"] + torch.log(out["l"]), dim=0), inv_C


def lse_backward_dx(x_BD, w_CD, labels_B, inv_C, ell_B, g_B, scale: float, class_start: int,
                    tile: str, forced: Optional[Plan] = None) -> torch.Tensor:
    """``dX_hat`` (float32) of ``sum_i g_i ell_i``: row tiles x class splits, summed in torch."""
    B, D = x_BD.shape
    C = w_CD.shape[0]
    if B == 0 or C == 0:
        return torch.zeros(B, D, dtype=torch.float32, device=x_BD.device)
    out = {}

    def launch(plan: Plan) -> None:
        row_blocks = triton.cdiv(B, plan.block_b)
        d_blocks = triton.cdiv(D, plan.block_do)
        cap = max(1, DX_PARTIAL_BYTES // (B * D * 4))
        want = plan.splits or triton.cdiv(_target_programs(x_BD.device), row_blocks * d_blocks)
        tiles_per_split, splits = _even_split(triton.cdiv(C, plan.block_c), min(want, cap))
        part_SBD = torch.empty(splits, B, D, dtype=torch.float32, device=x_BD.device)
        tk.dx_kernel[(row_blocks, splits, d_blocks)](
            x_BD, w_CD, inv_C, labels_B, ell_B, g_B, part_SBD, B, C, D, class_start, scale,
            tiles_per_split, x_BD.stride(0), w_CD.stride(0),
            BLOCK_B=plan.block_b, BLOCK_C=plan.block_c, BLOCK_D=plan.block_d,
            BLOCK_DO=plan.block_do, TILE=TILE_CODES[tile], INTERP=INTERPRET,
            num_warps=plan.num_warps, num_stages=plan.num_stages)
        out["part"] = part_SBD

    plan = choose_plan("dx", tile, x_BD, w_CD, launch, forced)
    launch(plan)
    LAST_LAUNCH["dx"] = (tile, plan)
    part_SBD = out["part"]
    return part_SBD[0] if part_SBD.shape[0] == 1 else part_SBD.sum(dim=0)


def lse_backward_dw(x_BD, w_CD, labels_B, inv_C, ell_B, g_B, scale: float, class_start: int,
                    tile: str, forced: Optional[Plan] = None) -> torch.Tensor:
    """``dW`` (the weight's dtype) of ``sum_i g_i ell_i``: each program owns its class rows."""
    B, D = x_BD.shape
    C = w_CD.shape[0]
    dw_CD = torch.empty_like(w_CD, memory_format=torch.contiguous_format)
    if B == 0 or C == 0:
        return dw_CD.zero_()

    def launch(plan: Plan) -> None:
        grid = (triton.cdiv(C, plan.block_c), triton.cdiv(D, plan.block_do))
        tk.dw_kernel[grid](
            x_BD, w_CD, inv_C, labels_B, ell_B, g_B, dw_CD, B, C, D, class_start, scale,
            x_BD.stride(0), w_CD.stride(0), dw_CD.stride(0),
            BLOCK_B=plan.block_b, BLOCK_C=plan.block_c, BLOCK_D=plan.block_d,
            BLOCK_DO=plan.block_do, TILE=TILE_CODES[tile], INTERP=INTERPRET,
            num_warps=plan.num_warps, num_stages=plan.num_stages)

    plan = choose_plan("dw", tile, x_BD, w_CD, launch, forced)
    launch(plan)
    LAST_LAUNCH["dw"] = (tile, plan)
    return dw_CD
