"""Memory-lean pure-torch backend of ``nontarget_lse``: classes in chunks, recompute in backward.

Forward streams over class chunks, keeping only a running per-row log-sum-exp, and also
returns the target cosine (see ``target.py``: its gradient is added into the same dW); it saves
the inputs and length-B vectors for backward (nothing B x C). Backward recomputes each chunk's
logits and uses ``d ell_i / d cos_ij = s * exp(s * cos_ij - ell_i)`` (0 for the target column) to
accumulate dX_hat and the gradient of the *raw* weight through the fused ``1/|w_j|`` scale:
``dW_j = (dW_hat_j - w_hat_j (w_hat_j . dW_hat_j)) / |w_j|``. Peak extra memory is
O(B * chunk + chunk * D). Half inputs are upcast per chunk to float32; float64 stays float64.
"""
# B: batch, C: classes (local shard), c: classes in one chunk, D: embedding dim
from typing import Tuple

import torch

from .reference import NORM_EPS, accumulate_dtype, local_targets
from .target import TargetRows, add_target_grads, target_rows

NEG_INF = float("-inf")


class _Workspace:
    """Scratch buffers reused by every chunk of one call: the peak stays at
    O(B*chunk + chunk*D) with no allocator churn between chunks."""

    def __init__(self, B: int, D: int, chunk: int, cdt: torch.dtype, device: torch.device,
                 upcast_weight: bool, need_a: bool) -> None:
        def buf(n: int, wanted: bool = True):
            return torch.empty(n, dtype=cdt, device=device) if wanted else None

        self.B, self.D = B, D
        self.logits = buf(B * chunk)
        self.w_scaled = buf(chunk * D)
        self.w_up = buf(chunk * D, upcast_weight)  # half weights upcast per chunk
        self.a = buf(chunk * D, need_a)  # dW rows before the cast to a half weight dtype

    @staticmethod
    def view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return flat[: rows * cols].view(rows, cols)

    def scaled_chunk(self, weight_CD: torch.Tensor, c0: int, c1: int, scale: float):
        """``(w_c, 1/|w_c| (c,), s * w_c/|w_c|)`` for classes ``[c0, c1)``, compute dtype."""
        c = c1 - c0
        w_cD = weight_CD[c0:c1]
        if self.w_up is not None:
            w_cD = self.view(self.w_up, c, self.D).copy_(w_cD)
        inv_c = 1.0 / torch.linalg.vector_norm(w_cD, dim=1).clamp_min(NORM_EPS)
        w_scaled_cD = torch.mul(w_cD, (scale * inv_c)[:, None],
                                out=self.view(self.w_scaled, c, self.D))
        return w_cD, inv_c, w_scaled_cD


def _mask_targets_(
    logits_Bc: torch.Tensor, local_B: torch.Tensor, in_shard_B: torch.Tensor, c0: int, c1: int
) -> None:
    """Set each row's target column to -inf if it falls into this chunk (no host sync)."""
    in_chunk_B1 = (in_shard_B & (local_B >= c0) & (local_B < c1))[:, None]
    idx_B1 = (local_B - c0).clamp(0, c1 - c0 - 1)[:, None]
    current_B1 = logits_Bc.gather(1, idx_B1)
    logits_Bc.scatter_(1, idx_B1, current_B1.masked_fill(in_chunk_B1, NEG_INF))


class ChunkedNonTargetLSE(torch.autograd.Function):
    """``(emb_hat_BD, weight_CD, labels_B, scale, class_start, chunk) -> (ell_B, cos_t_B)``."""

    @staticmethod
    def forward(ctx, emb_hat_BD, weight_CD, labels_B, scale, class_start, chunk_size):
        cdt = accumulate_dtype(emb_hat_BD.dtype)
        x_BD = emb_hat_BD.to(cdt)
        num_local = weight_CD.shape[0]
        local_B, in_shard_B = local_targets(labels_B, class_start, num_local)
        B, D = x_BD.shape
        ell_B = torch.full((B,), NEG_INF, dtype=cdt, device=x_BD.device)
        ws = _Workspace(B, D, min(chunk_size, max(num_local, 1)), cdt, x_BD.device,
                        upcast_weight=weight_CD.dtype != cdt, need_a=False)
        for c0 in range(0, num_local, chunk_size):
            c1 = min(c0 + chunk_size, num_local)
            _, _, w_scaled_cD = ws.scaled_chunk(weight_CD, c0, c1, scale)
            logits_Bc = torch.mm(x_BD, w_scaled_cD.t(), out=ws.view(ws.logits, B, c1 - c0))
            _mask_targets_(logits_Bc, local_B, in_shard_B, c0, c1)
            # In-place log-sum-exp of the chunk (torch.logsumexp would allocate a B x c temp).
            max_B = logits_Bc.amax(dim=1)
            max_B = max_B.masked_fill(max_B == NEG_INF, 0.0)  # fully masked row in this chunk
            sum_B = logits_Bc.sub_(max_B[:, None]).exp_().sum(dim=1)
            ell_B = torch.logaddexp(ell_B, max_B + sum_B.log())
        rows = target_rows(x_BD, weight_CD, labels_B, class_start, cdt)
        ctx.save_for_backward(emb_hat_BD, weight_CD, labels_B, ell_B, *rows)
        ctx.scale, ctx.class_start, ctx.chunk_size = scale, class_start, chunk_size
        return ell_B, rows.cos_B

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ell_B, grad_cos_B):
        emb_hat_BD, weight_CD, labels_B, ell_B, *rows = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale, chunk_size = ctx.scale, ctx.chunk_size
        cdt = ell_B.dtype
        x_BD = emb_hat_BD.to(cdt)
        g_B = grad_ell_B.to(cdt)
        num_local = weight_CD.shape[0]
        local_B, in_shard_B = local_targets(labels_B, ctx.class_start, num_local)
        # A row with no class at all has ell = -inf and every logit -inf: shift by 0 so that
        # exp(-inf - 0) = 0 instead of exp(-inf + inf) = nan.
        neg_ell_B1 = torch.where(torch.isinf(ell_B), torch.zeros_like(ell_B), -ell_B)[:, None]
        dx_acc_BD = torch.zeros_like(x_BD) if need_dx else None
        gx_BD = g_B[:, None] * x_BD if need_dw else None
        dw_CD = torch.empty_like(weight_CD) if need_dw else None
        B, D = x_BD.shape
        ws = _Workspace(B, D, min(chunk_size, max(num_local, 1)), cdt, x_BD.device,
                        upcast_weight=weight_CD.dtype != cdt,
                        need_a=need_dw and weight_CD.dtype != cdt)
        for c0 in range(0, num_local, chunk_size):
            c1 = min(c0 + chunk_size, num_local)
            w_cD, inv_c, w_scaled_cD = ws.scaled_chunk(weight_CD, c0, c1, scale)
            # p_Bc = exp(s cos - ell), built in place on the recomputed logits.
            p_Bc = torch.addmm(neg_ell_B1, x_BD, w_scaled_cD.t(),
                               out=ws.view(ws.logits, B, c1 - c0))
            _mask_targets_(p_Bc, local_B, in_shard_B, c0, c1)
            p_Bc.exp_()
            if need_dx:
                # dX_i = g_i * sum_j p_ij * s/|w_j| * w_j
                dx_acc_BD.addmm_(p_Bc, w_scaled_cD)
            if need_dw:
                # a_j = sum_i g_i p_ij s/|w_j| x_i  is  dW_hat_j / |w_j|; then project out w_j.
                a_cD = dw_CD[c0:c1] if ws.a is None else ws.view(ws.a, c1 - c0, D)
                torch.mm(p_Bc.t(), gx_BD, out=a_cD)
                a_cD.mul_((scale * inv_c)[:, None])
                r_c = (w_cD.unsqueeze(1) @ a_cD.unsqueeze(2)).view(-1)
                a_cD.addcmul_(w_cD, (-(inv_c * inv_c) * r_c)[:, None])
                if ws.a is not None:
                    dw_CD[c0:c1].copy_(a_cD)
        dx_BD = g_B[:, None] * dx_acc_BD if need_dx else None
        add_target_grads(grad_cos_B, x_BD, weight_CD, TargetRows(*rows), dx_BD, dw_CD)
        if need_dx:
            dx_BD = dx_BD.to(emb_hat_BD.dtype)
        return dx_BD, dw_CD, None, None, None, None


def chunked_nontarget_lse_and_target(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    class_start: int = 0,
    chunk_size: int = 8192,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked ``(ell_B, cos_t_B)`` (float64 for float64 inputs, else float32)."""
    return ChunkedNonTargetLSE.apply(
        emb_hat_BD, weight_CD, labels_B, float(scale), int(class_start), int(chunk_size)
    )


def chunked_nontarget_lse(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    class_start: int = 0,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Chunked ``ell_B`` alone."""
    return chunked_nontarget_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                            class_start=class_start, chunk_size=chunk_size)[0]
