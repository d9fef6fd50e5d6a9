"""``nontarget_lse`` / ``nontarget_lse_and_target``: argument checks, backend dispatch and the
Triton ``autograd.Function``.

``ell_i = log sum_{j != y_i} exp(s * x_hat_i . w_j / |w_j|)`` over the local classes, never
storing the B x C tile; the fused variant also returns the target cosine from the same node. Backends: ``'triton'`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``'chunked'`` (pure torch, memory-lean), ``'auto'`` (triton for CUDA tensors when triton
imports, else chunked; float64 always goes to chunked). Triton is imported only on its path.
"""
# B: batch, C: classes (local shard), D: embedding dim
from typing import Optional, Tuple

import torch

from .chunked import chunked_nontarget_lse_and_target
from .target import TargetRows, add_target_grads, target_rows

BACKENDS = ("auto", "triton", "chunked")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonNonTargetLSE(torch.autograd.Function):
    """``(emb_hat_BD, weight_CD, labels_B, scale, class_start, plans) -> (ell_B, cos_t_B)``."""

    @staticmethod
    def forward(ctx, emb_hat_BD, weight_CD, labels_B, scale, class_start, fwd_plan, bwd_plan):
        from . import triton_kernels as tk

        x_BD = emb_hat_BD.contiguous()
        w_CD = weight_CD if weight_CD.stride(1) == 1 else weight_CD.contiguous()
        labels_B = labels_B.to(torch.int64).contiguous()
        inv_C = tk.inv_norms(w_CD)
        ell_B = tk.lse_forward(x_BD, w_CD, labels_B, inv_C, scale, class_start, fwd_plan)
        rows = target_rows(x_BD, w_CD, labels_B, class_start, torch.float32)
        ctx.save_for_backward(x_BD, w_CD, labels_B, inv_C, ell_B, *rows)
        ctx.scale, ctx.class_start, ctx.bwd_plan = scale, class_start, bwd_plan
        return ell_B, rows.cos_B

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ell_B, grad_cos_B):
        from . import triton_kernels as tk

        x_BD, w_CD, labels_B, inv_C, ell_B, *rows = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx_BD, dw_CD = tk.lse_backward(
            x_BD, w_CD, labels_B, inv_C, ell_B, grad_ell_B, ctx.scale, ctx.class_start,
            need_dx, need_dw, ctx.bwd_plan)
        add_target_grads(grad_cos_B, x_BD, w_CD, TargetRows(*rows), dx_BD, dw_CD)
        if need_dx:
            dx_BD = dx_BD.to(x_BD.dtype)
        return dx_BD, dw_CD, None, None, None, None, None


def _check_inputs(emb_hat_BD, weight_CD, labels_B, chunk_size) -> None:
    if emb_hat_BD.dim() != 2 or weight_CD.dim() != 2:
        raise ValueError(
            f"nontarget_lse: emb_hat must be [B, D] and weight [C, D]; got "
            f"{tuple(emb_hat_BD.shape)} and {tuple(weight_CD.shape)}")
    if emb_hat_BD.shape[1] != weight_CD.shape[1]:
        raise ValueError(
            f"nontarget_lse: embedding dim {emb_hat_BD.shape[1]} != weight dim "
            f"{weight_CD.shape[1]}")
    if labels_B.dim() != 1 or labels_B.shape[0] != emb_hat_BD.shape[0]:
        raise ValueError(
            f"nontarget_lse: labels must be [B] with B={emb_hat_BD.shape[0]}; got "
            f"{tuple(labels_B.shape)}")
    if labels_B.dtype.is_floating_point or labels_B.dtype == torch.bool:
        raise ValueError(f"nontarget_lse: labels must be integer class ids, got {labels_B.dtype}")
    if not emb_hat_BD.dtype.is_floating_point or not weight_CD.dtype.is_floating_point:
        raise ValueError(
            f"nontarget_lse: floating inputs needed, got {emb_hat_BD.dtype}/{weight_CD.dtype}")
    if int(chunk_size) < 1:
        raise ValueError(f"nontarget_lse: chunk_size must be >= 1, got {chunk_size}")


def resolve_backend(backend: str, emb_hat_BD: torch.Tensor) -> str:
    """The concrete backend (``'triton'`` or ``'chunked'``) for ``backend`` and these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"nontarget_lse: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        usable = emb_hat_BD.is_cuda and emb_hat_BD.dtype != torch.float64 and triton_available()
        return "triton" if usable else "chunked"
    if backend == "triton":
        if not triton_available():
            raise ValueError("nontarget_lse: backend='triton' but triton is not installed; "
                             "use backend='chunked'")
        if not (emb_hat_BD.is_cuda or _interpreting()):
            raise ValueError("nontarget_lse: backend='triton' needs CUDA tensors (or "
                             "TRITON_INTERPRET=1 for CPU); use backend='chunked' on CPU")
    return backend


def local_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale: float, *, backend: str,
                         chunk_size: int, class_start: int, plans=(None, None)):
    """Shard-local ``(ell_B, cos_t_B)`` with a resolved backend (no collectives)."""
    if backend == "triton":
        return TritonNonTargetLSE.apply(emb_hat_BD, weight_CD, labels_B, float(scale),
                                        int(class_start), plans[0], plans[1])
    return chunked_nontarget_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                            class_start=class_start, chunk_size=chunk_size)


def nontarget_lse_and_target(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
    chunk_size: int = 8192,
    class_start: int = 0,
    process_group: Optional[object] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ell_B, cos_t_B)`` from one autograd node: the non-target log-sum-exp and the target
    cosine ``x_hat_i . w_{y_i}/|w_{y_i}|`` (0 where the label is not in the shard).

    Same arguments as ``nontarget_lse``. Prefer this over ``nontarget_lse`` + ``target_cosine``
    when memory matters: the target gradient is added into the kernel's dW in place, so no
    second weight-sized gradient buffer is created. With ``process_group``, ``ell`` is combined
    by ``lse_across_shards`` and ``cos_t`` by ``sum_across_shards`` (its owner rank holds it).
    """
    _check_inputs(emb_hat_BD, weight_CD, labels_B, chunk_size)
    if emb_hat_BD.dtype != weight_CD.dtype:
        common = torch.promote_types(emb_hat_BD.dtype, weight_CD.dtype)
        emb_hat_BD, weight_CD = emb_hat_BD.to(common), weight_CD.to(common)
    resolved = resolve_backend(backend, emb_hat_BD)
    if process_group is not None:
        # The collectives wrap the checked, promoted inputs (dX is summed over ranks in the
        # common dtype); shard_lse_and_target calls back here without the group.
        from .distributed import shard_lse_and_target

        return shard_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale,
                                    class_start=class_start, process_group=process_group,
                                    backend=resolved, chunk_size=chunk_size)
    return local_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale, backend=resolved,
                                chunk_size=chunk_size, class_start=class_start)


def nontarget_lse(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
    chunk_size: int = 8192,
    class_start: int = 0,
    process_group: Optional[object] = None,
) -> torch.Tensor:
    """``ell_B = log sum_{j != y_i} exp(s * x_hat_i . w_j/|w_j|)``; see the module docstring.

    ``emb_hat_BD`` is the normalised embedding (differentiable), ``weight_CD`` the raw local
    weight covering global classes ``[class_start, class_start + C)``; ``labels_B`` are global
    ids (outside the shard: nothing masked). Returns float32 (float64 for float64 inputs).
    Mixed input dtypes are promoted to the wider one (costs a cast of the smaller tensor).
    With ``process_group`` (class-sharded weight), ``emb_hat_BD`` enters through
    ``copy_to_shards`` and the shard-local results are combined by ``lse_across_shards``.
    """
    return nontarget_lse_and_target(
        emb_hat_BD, weight_CD, labels_B, scale, backend=backend, chunk_size=chunk_size,
        class_start=class_start, process_group=process_group)[0]
