"""The plain full-tile definition of ``(ell_B, cos_t_B)``: backend ``"torch"`` and the test oracle.

``reference_lse_and_target`` builds the whole B x C logit tile with torch autograd (memory
O(B*C), float64 accepted); it states the maths in a few lines, every other backend is tested
against it, and it is the "same-dtype torch" of the accuracy rule. The small shard/dtype
bookkeeping here is shared by all backends.
"""
# B: batch, C: classes (local shard), D: embedding dim
from typing import Tuple

import torch
import torch.nn.functional as F

from .precision import TILE_DTYPES

NORM_EPS = 1e-12  # the eps of F.normalize, so kernels and references agree on tiny rows


def local_targets(labels_B: torch.Tensor, class_start: int, num_local: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Map global labels to the local shard: ``(local_idx_B, in_shard_B)``.

    ``local_idx_B`` is clamped into ``[0, num_local)`` so it can index safely; ``in_shard_B`` says
    whether the label really falls into ``[class_start, class_start + num_local)``.
    """
    local_B = labels_B.long() - int(class_start)
    in_shard_B = (local_B >= 0) & (local_B < num_local)
    return local_B.clamp(0, max(num_local - 1, 0)), in_shard_B


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nontarget_lse_reference(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    class_start: int = 0,
) -> torch.Tensor:
    """``ell_i = log sum_{j != y_i} exp(s * x_i . w_j / |w_j|)``, computed in the input dtype.

    Labels outside ``[class_start, class_start + C)`` mask nothing. A row with no unmasked class
    gives ``-inf``.
    """
    num_local = weight_CD.shape[0]
    w_hat_CD = F.normalize(weight_CD, dim=1, eps=NORM_EPS)
    logits_BC = scale * (emb_hat_BD @ w_hat_CD.t())
    local_B, in_shard_B = local_targets(labels_B, class_start, num_local)
    target_mask_BC = F.one_hot(local_B, num_local).bool() & in_shard_B[:, None]
    logits_BC = logits_BC.masked_fill(target_mask_BC, float("-inf"))
    return torch.logsumexp(logits_BC, dim=1)


def reference_lse_and_target(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    class_start: int = 0,
    precision: str = "ieee",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ell_B, cos_t_B)`` from the full B x C tile (backend ``"torch"``).

    Inputs are promoted to their common dtype; with ``precision`` bf16/fp16 the cosine matmul
    runs in that dtype, as plain torch under autocast would (tf32/ieee: torch's own fp32 matmul
    settings apply). Outputs are float32 (float64 for float64 inputs); ``cos_t`` is 0 for labels
    outside the shard.
    """
    common = torch.promote_types(emb_hat_BD.dtype, weight_CD.dtype)
    out_dtype = accumulate_dtype(common)
    num_local = weight_CD.shape[0]
    B = emb_hat_BD.shape[0]
    if num_local == 0:
        empty_B = emb_hat_BD.new_zeros(B, dtype=out_dtype)
        return empty_B - float("inf"), empty_B
    mm_dtype = TILE_DTYPES.get(precision, common) if common != torch.float64 else common
    w_hat_CD = F.normalize(weight_CD.to(common), dim=1, eps=NORM_EPS)
    cos_BC = (emb_hat_BD.to(mm_dtype) @ w_hat_CD.to(mm_dtype).t()).to(out_dtype)
    local_B, in_shard_B = local_targets(labels_B, class_start, num_local)
    target_mask_BC = F.one_hot(local_B, num_local).bool() & in_shard_B[:, None]
    ell_B = torch.logsumexp((scale * cos_BC).masked_fill(target_mask_BC, float("-inf")), dim=1)
    cos_t_B = cos_BC.gather(1, local_B[:, None]).squeeze(1)
    return ell_B, torch.where(in_shard_B, cos_t_B, torch.zeros_like(cos_t_B))
