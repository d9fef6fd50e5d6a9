"""Triton kernels and launchers of the non-target log-sum-exp (forward and backward).

Import this module only on the Triton path (it imports triton at module level).

* ``_inv_norm_kernel``: ``1/max(|w_j|, eps)`` for every class, one pass over W (no normalised
  copy of W is ever written; the scale is applied to each cosine tile).
* ``_fwd_kernel``: grid (row blocks x class splits). Each program walks its class tiles with
  ``tl.dot`` (fp32 accumulation, D-loop), masks target and padding columns, and keeps an online
  (max, sum-exp) per row; it writes one partial (m, l) per split, so small batches still fill
  the GPU. A tiny torch logsumexp over splits combines them.
* ``_bwd_kernel``: grid (class tiles x row splits). Each program recomputes its cosine tiles,
  forms ``q_ij = g_i * s * exp(s cos_ij - ell_i) / |w_j|`` (0 on target/padding), adds
  ``q @ W`` into dX (fp32 atomics, spread over a few replicas to cut contention) and
  ``q^T @ X`` into its own class rows of an fp32 accumulator. With one row split the program
  owns its class rows: no atomics on dW, and it applies the normalisation gradient
  ``dW_j = a_j - t_j w_j / |w_j|^2`` (``t_j = sum_i P_ij cos_ij``) itself before storing.
  With several row splits (few classes) dW and t use atomics and torch finishes the epilogue.

Interpreter (``TRITON_INTERPRET=1``): half tiles are upcast to fp32 before ``tl.dot`` (bf16
dot is wrong there), one fixed config, no autotune, no libdevice, no bf16 atomics.
"""
# B: batch, C: classes (local shard), D: embedding dim, S: class splits, R: dX replicas
import os
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Plan:
    """Tile sizes and work split of one launch (``None`` fields are chosen from the shape)."""

    block_b: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int
    splits: Optional[int] = None  # forward: class splits
    row_splits: Optional[int] = None  # backward: row splits (1 = program owns its dW rows)
    dx_copies: Optional[int] = None  # backward: dX atomic replicas


def default_plan(dtype: torch.dtype, backward: bool) -> Plan:
    if INTERPRET:
        # Interpreter cost is per program instance: few, large tiles.
        return Plan(block_b=16, block_c=128, block_d=64, num_warps=4, num_stages=1)
    # Untuned starting points (no GPU was available while writing): large row tiles cut the
    # number of times W streams through L2 in the forward; 128-class tiles halve the dX atomics
    # of the backward. fp32 (IEEE dot, no tensor cores) gets smaller tiles for registers.
    if dtype == torch.float32:
        return Plan(block_b=64, block_c=64, block_d=32, num_warps=4, num_stages=2)
    if backward:
        return Plan(block_b=64, block_c=128, block_d=64, num_warps=8, num_stages=2)
    return Plan(block_b=128, block_c=128, block_d=64, num_warps=8, num_stages=3)


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


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot_tile(X, W, rows, cols64, row_ok, col_ok, D, stride_xb, stride_wc,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``X[rows] @ W[cols]^T`` in fp32, looping over D."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        x = tl.load(X + rows[:, None] * stride_xb + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cols64[:, None] * stride_wc + dd[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mm(x, tl.trans(w), acc, UPCAST, IEEE)
    return acc


@triton.jit
def _inv_norm_kernel(W, INV, C, D, stride_wc, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols.to(tl.int64)
    sumsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(W + cols64[:, None] * stride_wc + dd[None, :],
                    mask=col_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(w * w, 1)
    inv = 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)  # reference.NORM_EPS (F.normalize's eps)
    tl.store(INV + cols, inv, mask=col_ok)


@triton.jit
def _fwd_kernel(X, W, INV, LAB, M_OUT, L_OUT, B, C, D, class_start, scale, tiles_per_split,
                stride_xb, stride_wc,
                BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    tgt = tl.load(LAB + rows, mask=row_ok, other=-1) - class_start
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        cols = (pid_s * tiles_per_split + t) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        acc = _dot_tile(X, W, rows, cols.to(tl.int64), row_ok, col_ok, D, stride_xb, stride_wc,
                        BLOCK_B, BLOCK_C, BLOCK_D, UPCAST, IEEE)
        inv = tl.load(INV + cols, mask=col_ok, other=0.0)
        logit = acc * (inv * scale)[None, :]
        valid = col_ok[None, :] & (cols[None, :] != tgt[:, None])
        logit = tl.where(valid, logit, float("-inf"))
        m_new = tl.maximum(m, tl.max(logit, 1))
        # Rows with nothing unmasked yet keep m = -inf: shift by 0 to avoid -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)
        m = m_new
    tl.store(M_OUT + pid_s * B + rows, m, mask=row_ok)
    tl.store(L_OUT + pid_s * B + rows, l, mask=row_ok)


@triton.jit
def _bwd_kernel(X, W, INV, LAB, ELL, G, DX, DWACC, T, DW_OUT,
                B, C, D, class_start, scale, rb_per_split, dx_copies, stride_xb, stride_wc,
                BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, FUSED: tl.constexpr,
                NEED_DX: tl.constexpr, NEED_DW: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols.to(tl.int64)
    inv = tl.load(INV + cols, mask=col_ok, other=0.0)
    t_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dx_base = DX + (pid_c % dx_copies).to(tl.int64) * B * D
    for r in range(0, rb_per_split):
        rows = (pid_r * rb_per_split + r) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        tgt = tl.load(LAB + rows, mask=row_ok, other=-1) - class_start
        ell = tl.load(ELL + rows, mask=row_ok, other=0.0)
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        # ell = -inf only for rows with no class: all their columns are masked anyway.
        ell_safe = tl.where(ell == float("-inf"), 0.0, ell)
        acc = _dot_tile(X, W, rows, cols64, row_ok, col_ok, D, stride_xb, stride_wc,
                        BLOCK_B, BLOCK_C, BLOCK_D, UPCAST, IEEE)
        valid = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != tgt[:, None])
        logit = acc * (inv * scale)[None, :]
        p = tl.where(valid, tl.exp(logit - ell_safe[:, None]), 0.0)
        q = p * (g * scale)[:, None] * inv[None, :]  # dL/d(x_i . w_j), raw w
        t_acc += tl.sum(q * acc, 0)  # sum_i dL/dcos_ij * cos_ij
        q_in = q.to(X.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            if NEED_DX:
                w = tl.load(W + cols64[:, None] * stride_wc + dd[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                dx = _mm(q_in, w, tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32), UPCAST, IEEE)
                tl.atomic_add(dx_base + rows[:, None] * D + dd[None, :], dx,
                              mask=row_ok[:, None] & d_ok[None, :])
            if NEED_DW:
                x = tl.load(X + rows[:, None] * stride_xb + dd[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                dw = _mm(tl.trans(q_in), x, tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32),
                         UPCAST, IEEE)
                ptr = DWACC + cols64[:, None] * D + dd[None, :]
                cd_ok = col_ok[:, None] & d_ok[None, :]
                if FUSED:  # this program owns these class rows: plain read-modify-write
                    tl.store(ptr, tl.load(ptr, mask=cd_ok, other=0.0) + dw, mask=cd_ok)
                else:
                    tl.atomic_add(ptr, dw, mask=cd_ok)
    if NEED_DW:
        if FUSED:
            coef = inv * inv * t_acc
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                cd_ok = col_ok[:, None] & (dd < D)[None, :]
                a = tl.load(DWACC + cols64[:, None] * D + dd[None, :], mask=cd_ok, other=0.0)
                w = tl.load(W + cols64[:, None] * stride_wc + dd[None, :],
                            mask=cd_ok, other=0.0).to(tl.float32)
                dw = a - coef[:, None] * w
                tl.store(DW_OUT + cols64[:, None] * D + dd[None, :],
                         dw.to(DW_OUT.dtype.element_ty), mask=cd_ok)
        else:
            tl.atomic_add(T + cols, t_acc, mask=col_ok)


def _check(x_BD: torch.Tensor, w_CD: torch.Tensor) -> None:
    if x_BD.dtype not in SUPPORTED_DTYPES or w_CD.dtype != x_BD.dtype:
        raise ValueError(
            f"triton nontarget_lse: dtypes {x_BD.dtype}/{w_CD.dtype} not supported; "
            "use float16, bfloat16 or float32 for both (float64: backend='chunked')"
        )
    assert x_BD.stride(1) == 1 and w_CD.stride(1) == 1, "launcher expects contiguous rows"


def inv_norms(w_CD: torch.Tensor) -> torch.Tensor:
    """``1 / max(|w_j|, eps)`` as float32 (C,)."""
    C, D = w_CD.shape
    inv_C = torch.empty(C, dtype=torch.float32, device=w_CD.device)
    if C == 0:
        return inv_C
    block_c = 64 if INTERPRET else 32
    _inv_norm_kernel[(triton.cdiv(C, block_c),)](
        w_CD, inv_C, C, D, w_CD.stride(0), BLOCK_C=block_c, BLOCK_D=64)
    return inv_C


def _flags(dtype: torch.dtype) -> Tuple[bool, bool]:
    upcast = INTERPRET and dtype != torch.float32
    return upcast, (dtype == torch.float32 or upcast)


def lse_forward(x_BD, w_CD, labels_B, inv_C, scale: float, class_start: int,
                plan: Optional[Plan] = None) -> torch.Tensor:
    """``ell_B`` (float32) from the split forward kernel and a logsumexp over splits."""
    _check(x_BD, w_CD)
    B, D = x_BD.shape
    C = w_CD.shape[0]
    if B == 0 or C == 0:
        return torch.full((B,), float("-inf"), dtype=torch.float32, device=x_BD.device)
    plan = plan or default_plan(x_BD.dtype, backward=False)
    row_blocks = triton.cdiv(B, plan.block_b)
    class_tiles = triton.cdiv(C, plan.block_c)
    want = plan.splits or triton.cdiv(_target_programs(x_BD.device), row_blocks)
    tiles_per_split, splits = _even_split(class_tiles, want)
    m_SB = torch.empty(splits, B, dtype=torch.float32, device=x_BD.device)
    l_SB = torch.empty_like(m_SB)
    upcast, ieee = _flags(x_BD.dtype)
    _fwd_kernel[(row_blocks, splits)](
        x_BD, w_CD, inv_C, labels_B, m_SB, l_SB, B, C, D, class_start, scale, tiles_per_split,
        x_BD.stride(0), w_CD.stride(0),
        BLOCK_B=plan.block_b, BLOCK_C=plan.block_c, BLOCK_D=plan.block_d,
        UPCAST=upcast, IEEE=ieee, num_warps=plan.num_warps, num_stages=plan.num_stages)
    return torch.logsumexp(m_SB + torch.log(l_SB), dim=0)


def lse_backward(x_BD, w_CD, labels_B, inv_C, ell_B, grad_B, scale: float, class_start: int,
                 need_dx: bool, need_dw: bool, plan: Optional[Plan] = None):
    """``(dX_hat (float32) or None, dW (w dtype) or None)`` by recomputation."""
    _check(x_BD, w_CD)
    B, D = x_BD.shape
    C = w_CD.shape[0]
    if B == 0 or C == 0 or not (need_dx or need_dw):
        return (torch.zeros(B, D, dtype=torch.float32, device=x_BD.device) if need_dx else None,
                torch.zeros_like(w_CD) if need_dw else None)
    plan = plan or default_plan(x_BD.dtype, backward=True)
    row_blocks = triton.cdiv(B, plan.block_b)
    class_tiles = triton.cdiv(C, plan.block_c)
    want = plan.row_splits or triton.cdiv(_target_programs(x_BD.device), class_tiles)
    rb_per_split, row_splits = _even_split(row_blocks, want)
    fused = row_splits == 1
    dev = x_BD.device
    f32 = torch.float32
    dx_copies = min(plan.dx_copies or 8, class_tiles) if need_dx else 1
    dx_RBD = torch.zeros((dx_copies, B, D) if need_dx else (1, 1, 1), dtype=f32, device=dev)
    dwacc_CD = torch.zeros((C, D) if need_dw else (1, 1), dtype=f32, device=dev)
    t_C = torch.zeros(C if (need_dw and not fused) else 1, dtype=f32, device=dev)
    if need_dw and fused and w_CD.dtype != f32:
        dw_out = torch.empty_like(w_CD)
    else:
        # fp32 (or unfused): the result lands in the fp32 accumulator itself.
        dw_out = dwacc_CD
    upcast, ieee = _flags(x_BD.dtype)
    _bwd_kernel[(class_tiles, row_splits)](
        x_BD, w_CD, inv_C, labels_B, ell_B.contiguous(), grad_B.to(f32).contiguous(),
        dx_RBD, dwacc_CD, t_C, dw_out,
        B, C, D, class_start, scale, rb_per_split, dx_copies, x_BD.stride(0), w_CD.stride(0),
        BLOCK_B=plan.block_b, BLOCK_C=plan.block_c, BLOCK_D=plan.block_d,
        UPCAST=upcast, IEEE=ieee, FUSED=fused, NEED_DX=need_dx, NEED_DW=need_dw,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    dx_out = dx_RBD.sum(dim=0) if need_dx else None
    if not need_dw:
        return dx_out, None
    if not fused:
        dw_out = dwacc_CD.addcmul_(w_CD.to(f32), (inv_C * inv_C * t_C)[:, None], value=-1.0)
    return dx_out, dw_out.to(w_CD.dtype)


def with_overrides(plan: Plan, **kw) -> Plan:
    """A copy of ``plan`` with some fields replaced (tests force splits and paths with it)."""
    return replace(plan, **kw)


__all__ = ["Plan", "default_plan", "inv_norms", "lse_forward", "lse_backward", "with_overrides"]
