"""The target cosine ``cos_t_i = x_hat_i . w_{y_i} / |w_{y_i}|`` of the local shard.

Two forms:
* ``target_cosine``: plain torch autograd. Its weight gradient goes through a gather, whose
  backward materialises a dense C x D tensor that autograd then adds to the kernel's dW: one
  extra weight-sized buffer at the peak.
* ``target_rows`` / ``add_target_grads``: the pieces the kernels' autograd Functions use to
  return ``(ell_B, cos_t_B)`` together and add the target gradient into their own dX_hat/dW
  in place (B rows, ``index_add_``), so dW exists once.

Rows whose label is outside ``[class_start, class_start + C)`` get ``cos_t = 0`` and no gradient.
"""
# B: batch, C: classes (local shard), D: embedding dim
from typing import NamedTuple, Optional

import torch

from .reference import NORM_EPS, accumulate_dtype, local_targets


def target_cosine(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    *,
    class_start: int = 0,
) -> torch.Tensor:
    """``cos_t_B`` (float32; float64 for float64 inputs) with plain torch autograd."""
    out_dtype = accumulate_dtype(emb_hat_BD.dtype)
    num_local = weight_CD.shape[0]
    if num_local == 0:
        return emb_hat_BD.new_zeros(emb_hat_BD.shape[0], dtype=out_dtype)
    local_B, in_shard_B = local_targets(labels_B, class_start, num_local)
    w_t_BD = weight_CD[local_B].to(out_dtype)
    inv_norm_B = 1.0 / torch.linalg.vector_norm(w_t_BD, dim=1).clamp_min(NORM_EPS)
    cos_B = (emb_hat_BD.to(out_dtype) * w_t_BD).sum(dim=1) * inv_norm_B
    return torch.where(in_shard_B, cos_B, torch.zeros_like(cos_B))


class TargetRows(NamedTuple):
    """Forward values the target gradient needs (all length-B or B x D)."""

    cos_B: torch.Tensor  # 0 outside the shard
    index_B: torch.Tensor  # local row of the label, clamped into range
    gate_B: torch.Tensor  # 1.0 inside the shard, 0.0 outside (compute dtype)
    inv_B: torch.Tensor  # 1/|w_{y_i}|


def target_rows(x_BD: torch.Tensor, weight_CD: torch.Tensor, labels_B: torch.Tensor,
                class_start: int, cdt: torch.dtype) -> TargetRows:
    """Target cosines without autograd, in the compute dtype ``cdt`` (no host sync)."""
    num_local = weight_CD.shape[0]
    index_B, in_shard_B = local_targets(labels_B, class_start, max(num_local, 1))
    gate_B = in_shard_B.to(cdt)
    if num_local == 0:
        zeros_B = torch.zeros(x_BD.shape[0], dtype=cdt, device=x_BD.device)
        return TargetRows(zeros_B, index_B, zeros_B, zeros_B)
    w_t_BD = weight_CD[index_B].to(cdt)
    inv_B = 1.0 / torch.linalg.vector_norm(w_t_BD, dim=1).clamp_min(NORM_EPS)
    cos_B = (x_BD.to(cdt) * w_t_BD).sum(dim=1) * inv_B * gate_B
    return TargetRows(cos_B, index_B, gate_B, inv_B)


def add_target_grads(grad_cos_B: torch.Tensor, x_BD: torch.Tensor, weight_CD: torch.Tensor,
                     rows: TargetRows, dx_BD: Optional[torch.Tensor],
                     dw_CD: Optional[torch.Tensor]) -> None:
    """In place: ``dx_i += g_i w_hat_{y_i}``; ``dW_{y_i} += g_i (x_i - cos_i w_hat_{y_i}) / |w|``."""
    if weight_CD.shape[0] == 0:
        return
    cdt = rows.cos_B.dtype
    g_B1 = (grad_cos_B.to(cdt) * rows.gate_B * rows.inv_B)[:, None]
    w_t_BD = weight_CD[rows.index_B].to(cdt)
    if dx_BD is not None:
        dx_BD.add_((g_B1 * w_t_BD).to(dx_BD.dtype))
    if dw_CD is not None:
        contrib_BD = g_B1 * (x_BD.to(cdt) - (rows.cos_B * rows.inv_B)[:, None] * w_t_BD)
        dw_CD.index_add_(0, rows.index_B, contrib_BD.to(dw_CD.dtype))
