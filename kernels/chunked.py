"""Memory-lean pure-torch backend (``"chunked"``): classes in chunks, recompute in backward.

It is the CPU twin of the Triton kernel and does the same arithmetic in the same order of
ideas, so a CPU run computes what the GPU computes (see ``precision.py``): each chunk's tiles of
x_hat and W are rounded to the compute precision and multiplied in fp32 (float64 stays float64),
the log-sum-exp and every reduction stay in the accumulation dtype, and the raw weight's norm
``1/|w_j|`` is applied to the fp32 product (no normalised copy of W).

Forward streams over class chunks keeping a running per-row log-sum-exp and saves only inputs
and length-B vectors. Backward recomputes each chunk's products ``r_ij = x_i . w_j`` and uses
``q_ij = dL/dr_ij = g_i * s * exp(s r_ij/|w_j| - ell_i) / |w_j|`` (0 on the target column):
``dX_i = sum_j q_ij w_j``, ``a_j = sum_i q_ij x_i``, ``t_j = sum_i q_ij r_ij`` and the raw-weight
gradient through the normalisation ``dW_j = a_j - t_j w_j / |w_j|^2``. Peak extra memory is
O(B * chunk + chunk * D).
"""
# B: batch, C: classes (local shard), c: classes in one chunk, D: embedding dim
from typing import Tuple

import torch

from .precision import round_tile
from .reference import NORM_EPS, accumulate_dtype, local_targets
from .target import TargetRows, add_target_grads, target_rows

NEG_INF = float("-inf")


def _mask_targets_(
    logits_Bc: torch.Tensor, local_B: torch.Tensor, in_shard_B: torch.Tensor, c0: int, c1: int,
    fill: float = NEG_INF,
) -> None:
    """Set each row's target column to ``fill`` if it falls into this chunk (no host sync)."""
    in_chunk_B1 = (in_shard_B & (local_B >= c0) & (local_B < c1))[:, None]
    idx_B1 = (local_B - c0).clamp(0, c1 - c0 - 1)[:, None]
    current_B1 = logits_Bc.gather(1, idx_B1)
    logits_Bc.scatter_(1, idx_B1, current_B1.masked_fill(in_chunk_B1, fill))


def _chunk(weight_CD: torch.Tensor, c0: int, c1: int, precision: str, cdt: torch.dtype):
    """``(w_c in cdt, rounded tile of w_c, 1/|w_c|)`` for classes ``[c0, c1)``."""
    w_cD = weight_CD[c0:c1].to(cdt)
    inv_c = 1.0 / torch.linalg.vector_norm(w_cD, dim=1).clamp_min(NORM_EPS)
    return w_cD, round_tile(w_cD, precision, cdt), inv_c


class ChunkedLSEAndTarget(torch.autograd.Function):
    """``(emb_hat_BD, weight_CD, labels_B, scale, class_start, chunk, precision)
    -> (ell_B, cos_t_B)``."""

    @staticmethod
    def forward(ctx, emb_hat_BD, weight_CD, labels_B, scale, class_start, chunk_size, precision):
        cdt = accumulate_dtype(torch.promote_types(emb_hat_BD.dtype, weight_CD.dtype))
        x_r_BD = round_tile(emb_hat_BD, precision, cdt)
        num_local = weight_CD.shape[0]
        local_B, in_shard_B = local_targets(labels_B, class_start, num_local)
        ell_B = torch.full((x_r_BD.shape[0],), NEG_INF, dtype=cdt, device=x_r_BD.device)
        for c0 in range(0, num_local, chunk_size):
            c1 = min(c0 + chunk_size, num_local)
            _, w_r_cD, inv_c = _chunk(weight_CD, c0, c1, precision, cdt)
            logits_Bc = (x_r_BD @ w_r_cD.t()).mul_((scale * inv_c)[None, :])
            _mask_targets_(logits_Bc, local_B, in_shard_B, c0, c1)
            # In-place log-sum-exp of the chunk (torch.logsumexp would allocate a B x c temp).
            max_B = logits_Bc.amax(dim=1)
            max_B = max_B.masked_fill(max_B == NEG_INF, 0.0)  # fully masked row in this chunk
            sum_B = logits_Bc.sub_(max_B[:, None]).exp_().sum(dim=1)
            ell_B = torch.logaddexp(ell_B, max_B + sum_B.log())
        rows = target_rows(emb_hat_BD, weight_CD, labels_B, class_start, cdt)
        ctx.save_for_backward(emb_hat_BD, weight_CD, labels_B, ell_B, *rows)
        ctx.scale, ctx.class_start = scale, class_start
        ctx.chunk_size, ctx.precision = chunk_size, precision
        return ell_B, rows.cos_B

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ell_B, grad_cos_B):
        emb_hat_BD, weight_CD, labels_B, ell_B, *rows = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale, chunk_size, precision = ctx.scale, ctx.chunk_size, ctx.precision
        cdt = ell_B.dtype
        x_BD = emb_hat_BD.to(cdt)
        x_r_BD = round_tile(emb_hat_BD, precision, cdt)
        gs_B1 = (grad_ell_B.to(cdt) * scale)[:, None]
        num_local = weight_CD.shape[0]
        local_B, in_shard_B = local_targets(labels_B, ctx.class_start, num_local)
        # A row with no class at all has ell = -inf and every logit -inf: shift by 0 so that
        # exp(-inf - 0) = 0 instead of exp(-inf + inf) = nan.
        ell_safe_B1 = torch.where(torch.isinf(ell_B), torch.zeros_like(ell_B), ell_B)[:, None]
        dx_BD = torch.zeros_like(x_BD) if need_dx else None
        dw_CD = torch.empty_like(weight_CD) if need_dw else None
        for c0 in range(0, num_local, chunk_size):
            c1 = min(c0 + chunk_size, num_local)
            w_cD, w_r_cD, inv_c = _chunk(weight_CD, c0, c1, precision, cdt)
            raw_Bc = x_r_BD @ w_r_cD.t()
            q_Bc = torch.mul(raw_Bc, (scale * inv_c)[None, :]).sub_(ell_safe_B1)
            _mask_targets_(q_Bc, local_B, in_shard_B, c0, c1)
            q_Bc.exp_().mul_(gs_B1).mul_(inv_c[None, :])  # dL/d(x_i . w_j), raw w
            q_r_Bc = round_tile(q_Bc, precision, cdt)
            if need_dx:
                dx_BD.addmm_(q_r_Bc, w_r_cD)
            if need_dw:
                t_c = (q_Bc * raw_Bc).sum(dim=0)
                a_cD = q_r_Bc.t() @ x_r_BD
                a_cD.addcmul_(w_cD, (-(inv_c * inv_c) * t_c)[:, None])
                dw_CD[c0:c1].copy_(a_cD)
        add_target_grads(grad_cos_B, x_BD, weight_CD, TargetRows(*rows), dx_BD, dw_CD)
        if need_dx:
            dx_BD = dx_BD.to(emb_hat_BD.dtype)
        return dx_BD, dw_CD, None, None, None, None, None


def chunked_lse_and_target(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    class_start: int = 0,
    chunk_size: int = 8192,
    precision: str = "ieee",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked ``(ell_B, cos_t_B)`` (float64 for float64 inputs, else float32) with a resolved
    ``precision`` (``bf16 | fp16 | tf32 | ieee``)."""
    return ChunkedLSEAndTarget.apply(emb_hat_BD, weight_CD, labels_B, float(scale),
                                     int(class_start), int(chunk_size), precision)
