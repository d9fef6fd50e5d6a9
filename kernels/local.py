"""The local layer: one shard's ``(ell_B, cos_t_B)`` with no collectives.

``ell_i = log sum_{j != y_i} exp(s * x_hat_i . w_j / |w_j|)`` over the local classes and the
target cosine ``x_hat_i . w_{y_i} / |w_{y_i}|`` (0 where the label lives elsewhere), both from
one autograd node so the weight gradient exists once. This module owns the one list of
backends of the project and picks one; the sharded layer (``sharded.py``) calls down into it,
never the other way. Triton is imported only on the Triton path.

Backends:
  ``"torch"``    the plain B x C reference (``reference.py``; stores the logits; float64 OK)
  ``"chunked"``  memory-lean torch (``chunked.py``), the CPU twin of the kernel
  ``"triton"``   the fused kernel (CUDA; CPU under ``TRITON_INTERPRET=1``)
  ``"auto"``     triton for CUDA tensors when triton imports (not float64), else chunked
"""
# B: batch, C: classes (local shard), D: embedding dim
import os
from typing import Tuple

import torch

from .chunked import chunked_lse_and_target
from .reference import reference_lse_and_target

BACKENDS = ("auto", "torch", "chunked", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (optional dependency: probed, not used here)
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, emb_hat_BD: torch.Tensor) -> str:
    """The concrete backend (``'torch'``, ``'chunked'`` or ``'triton'``) for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        usable = emb_hat_BD.is_cuda and emb_hat_BD.dtype != torch.float64 and triton_available()
        return "triton" if usable else "chunked"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' but triton is not installed (pip install "
                             "triton); use backend='chunked'")
        if not (emb_hat_BD.is_cuda or interpreting()):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                             "CPU); use backend='chunked' on CPU")
    return backend


def check_inputs(emb_hat_BD, weight_CD, labels_B, chunk_size) -> None:
    """Shape/dtype checks (metadata only, no host sync); errors name the argument."""
    if emb_hat_BD.dim() != 2 or weight_CD.dim() != 2:
        raise ValueError(
            f"lse_and_target: emb_hat must be [B, D] and weight [C, D]; got "
            f"{tuple(emb_hat_BD.shape)} and {tuple(weight_CD.shape)}")
    if emb_hat_BD.shape[1] != weight_CD.shape[1]:
        raise ValueError(
            f"lse_and_target: embedding dim {emb_hat_BD.shape[1]} != weight dim "
            f"{weight_CD.shape[1]}")
    if labels_B.dim() != 1 or labels_B.shape[0] != emb_hat_BD.shape[0]:
        raise ValueError(
            f"lse_and_target: labels must be [B] with B={emb_hat_BD.shape[0]}; got "
            f"{tuple(labels_B.shape)}")
    if labels_B.dtype.is_floating_point or labels_B.dtype == torch.bool:
        raise ValueError(f"lse_and_target: labels must be integer class ids, got "
                         f"{labels_B.dtype}")
    if not emb_hat_BD.dtype.is_floating_point or not weight_CD.dtype.is_floating_point:
        raise ValueError(
            f"lse_and_target: floating inputs needed, got {emb_hat_BD.dtype}/{weight_CD.dtype}")
    if int(chunk_size) < 1:
        raise ValueError(f"lse_and_target: chunk_size must be >= 1, got {chunk_size}")


def local_lse_and_target(emb_hat_BD: torch.Tensor, weight_CD: torch.Tensor,
                         labels_B: torch.Tensor, scale: float, *, backend: str, precision: str,
                         chunk_size: int = 8192, class_start: int = 0
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shard-local ``(ell_B, cos_t_B)`` for a resolved backend and precision."""
    if backend == "triton":
        from .triton_function import triton_lse_and_target

        return triton_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                     class_start=class_start, precision=precision)
    if backend == "torch":
        return reference_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                        class_start=class_start, precision=precision)
    return chunked_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                  class_start=class_start, chunk_size=chunk_size,
                                  precision=precision)
