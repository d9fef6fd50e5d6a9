"""``lse_and_target``: the one public entry of the margin-softmax compute.

It checks the arguments, resolves the backend and the precision once, and hands the call to
the local layer (``process_group=None``) or to the sharded layer, which wraps the same local
call in the shard collectives. Everything below it calls down only.
"""
# B: batch (global when sharded), C: classes (local shard), D: embedding dim
from typing import Optional, Tuple

import torch

from .local import check_inputs, local_lse_and_target, resolve_backend
from .precision import check_precision, resolve_precision
from .sharded import sharded_lse_and_target


def lse_and_target(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
    precision: str = "auto",
    chunk_size: int = 8192,
    class_start: int = 0,
    process_group: Optional[object] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ell_B, cos_t_B)``: ``ell_i = log sum_{j != y_i} exp(s * x_hat_i . w_j / |w_j|)`` and
    the target cosine ``x_hat_i . w_{y_i} / |w_{y_i}|``, differentiable in both inputs.

    ``emb_hat_BD`` is the normalised embedding; ``weight_CD`` the raw (un-normalised) weight of
    global classes ``[class_start, class_start + C)``; ``labels_B`` global class ids (a label
    outside the range masks nothing and gets ``cos_t = 0`` locally). ``backend`` is one of
    ``BACKENDS`` (see ``local.py``), ``precision`` one of ``PRECISIONS`` (see
    ``precision.py``), ``chunk_size`` the classes per chunk of the chunked backend. With
    ``process_group`` the weight is this rank's shard, the inputs are the global batch, and
    the results are combined over the group's ranks.

    Outputs are float32 (float64 when either input is float64: both are then promoted, and
    ``"auto"`` precision means ieee). Gradients come back in each input's own dtype. A row
    without any non-target class gets ``ell = -inf`` and no gradient.
    """
    check_inputs(emb_hat_BD, weight_CD, labels_B, chunk_size)
    check_precision(precision)
    if torch.float64 in (emb_hat_BD.dtype, weight_CD.dtype):
        emb_hat_BD, weight_CD = emb_hat_BD.to(torch.float64), weight_CD.to(torch.float64)
    resolved = resolve_backend(backend, emb_hat_BD)
    if resolved == "triton" and emb_hat_BD.dtype == torch.float64:
        raise ValueError("backend='triton' does not take float64 inputs; use "
                         "backend='chunked' (or 'torch') for float64")
    tiles = resolve_precision(precision, emb_hat_BD)
    # The resolved precision is the whole contract from here on: autocast (already read by
    # resolve_precision) must not also recast the chunked/reference matmuls' outputs to bf16.
    with torch.autocast(emb_hat_BD.device.type, enabled=False):
        if process_group is None:
            return local_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                        backend=resolved, precision=tiles,
                                        chunk_size=chunk_size, class_start=class_start)
        return sharded_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                      class_start=class_start, process_group=process_group,
                                      backend=resolved, precision=tiles, chunk_size=chunk_size)
