"""The Triton ``autograd.Function`` of ``(ell_B, cos_t_B)``: forward kernel, two backward passes.

Imported only on the Triton path (``local.py`` imports it inside that branch). The target
cosine is computed in torch on B gathered rows (``target.py``) and its gradient added into the
kernels' dX/dW in place, so the weight gradient exists once. Only inputs and length-B vectors
are saved for backward; the products are recomputed.
"""
# B: batch, C: classes (local shard), D: embedding dim
from typing import Dict, Optional, Tuple

import torch
import triton  # noqa: F401  (the Triton path's entry: a missing install fails here, clearly)

from . import triton_launch as tl_launch
from .precision import TILE_DTYPES
from .target import TargetRows, add_target_grads, target_rows


class TritonLSEAndTarget(torch.autograd.Function):
    """``(emb_hat_BD, weight_CD, labels_B, scale, class_start, tile, plans) -> (ell, cos_t)``."""

    @staticmethod
    def forward(ctx, emb_hat_BD, weight_CD, labels_B, scale, class_start, tile, plans):
        tl_launch.check_dtypes(emb_hat_BD, weight_CD)
        x_BD = emb_hat_BD.contiguous()
        w_CD = weight_CD if weight_CD.stride(1) == 1 else weight_CD.contiguous()
        labels_B = labels_B.to(torch.int64).contiguous()
        # The small B x D operand is cast to half tiles once (every program re-reads it; the
        # values are those the in-register cast gives); W stays in its storage dtype.
        x_tiles_BD = x_BD.to(TILE_DTYPES.get(tile, x_BD.dtype))
        ell_B, inv_C = tl_launch.lse_forward(x_tiles_BD, w_CD, labels_B, scale, class_start,
                                             tile, plans.get("fwd"))
        rows = target_rows(x_BD, w_CD, labels_B, class_start, torch.float32)
        ctx.save_for_backward(x_BD, x_tiles_BD, w_CD, labels_B, inv_C, ell_B, *rows)
        ctx.scale, ctx.class_start, ctx.tile, ctx.plans = scale, class_start, tile, plans
        return ell_B, rows.cos_B

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ell_B, grad_cos_B):
        x_BD, x_tiles_BD, w_CD, labels_B, inv_C, ell_B, *rows = ctx.saved_tensors
        args = (x_tiles_BD, w_CD, labels_B, inv_C, ell_B, grad_ell_B.float().contiguous(),
                ctx.scale, ctx.class_start, ctx.tile)
        dx_BD = dw_CD = None
        if ctx.needs_input_grad[0]:
            dx_BD = tl_launch.lse_backward_dx(*args, ctx.plans.get("dx"))
        if ctx.needs_input_grad[1]:
            dw_CD = tl_launch.lse_backward_dw(*args, ctx.plans.get("dw"))
        add_target_grads(grad_cos_B, x_BD, w_CD, TargetRows(*rows), dx_BD, dw_CD)
        if dx_BD is not None:
            dx_BD = dx_BD.to(x_BD.dtype)
        return dx_BD, dw_CD, None, None, None, None, None


def triton_lse_and_target(emb_hat_BD: torch.Tensor, weight_CD: torch.Tensor,
                          labels_B: torch.Tensor, scale: float, *, class_start: int = 0,
                          precision: str = "ieee",
                          plans: Optional[Dict[str, "tl_launch.Plan"]] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused ``(ell_B, cos_t_B)`` (float32) with a resolved ``precision``. ``plans`` may force
    the tile plan of ``"fwd"``, ``"dx"`` or ``"dw"`` (tests use it to reach every path)."""
    return TritonLSEAndTarget.apply(emb_hat_BD, weight_CD, labels_B, float(scale),
                                    int(class_start), precision, dict(plans or {}))
