"""Plain full-tile definition of ``ell_B`` (the specification every backend is tested against)
and the small shard/dtype bookkeeping all backends share.

``nontarget_lse_reference`` builds the whole B x C cosine tile (memory O(B*C)); it exists to
state the maths in five lines, not for training.
"""
# B: batch, C: classes (local shard), D: embedding dim
from typing import Tuple

import torch
import torch.nn.functional as F

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
