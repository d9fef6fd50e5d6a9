"""Margin-softmax loss (ArcFace / CosFace / MagFace / combined) with optional UNPG negatives.

The loss is written as the decomposition the fused kernels use; the B×C work is one call of
``unpg.kernels.lse_and_target`` (which owns every backend and precision), the rest is length-B
torch::

    emb_hat = normalize(emb);  cos_t_B = emb_hat_i · normalize(weight[y_i])
    psi_B   = head.target_logit(cos_t_B, ‖emb‖)                   (length-B, torch)
    ell_B   = log Σ_{j≠y_i} exp(s·cos_ij)                          (lse_and_target: the B×C work)
    U       = logsumexp(s·S')  (UNPG kept negatives, shared by every row; −inf when off/empty)
    loss    = mean_i(logsumexp([ell_i, s·psi_i, U]) − s·psi_i) + head.regularizer(‖emb‖)

This equals the official code's ``cross_entropy(s·[logits, negatives], labels)``
(``unpg.official_loss``) without materialising ``B × (C + |S'|)`` logits.

One path per layout of the class centres; ``margin_softmax_loss`` (the functional contract) and
``unpg.classifier.MarginClassifier`` (training) both call these two:

* ``local_batch_loss`` -- the weight holds every class (one process, or replicated data
  parallelism): the loss is the mean over this process's rows; UNPG's negatives come from the
  batch all-gathered over ``negatives_group`` (summing backward, see ``unpg.distributed``).
* ``global_batch_loss`` -- the weight is this rank's class shard (partial FC): the batch is
  all-gathered, classes are optionally sampled, the shards' log-sum-exps are combined by the
  kernels' sharded layer, and every rank computes the same global-batch mean.

Precision: embeddings may come in bf16/fp16 (the backbone under autocast). The length-B and
B×D work (norms, normalisation, margin, UNPG) runs in float32, float64 stays float64; the class
centres are passed as they are (the fp32 master, never copied to half precision) and
``precision`` tells the kernel which tiles to use. ``precision='auto'`` with bf16/fp16
embeddings means bf16/fp16 tiles (the embedding's own precision); otherwise the kernel decides.

# B: global batch, b: local batch, C: classes (local shard), S: sampled classes, D: embedding dim
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from unpg.kernels import BACKENDS, PRECISIONS, all_gather_rows, copy_to_shards, lse_and_target

from .heads import MarginHead, build_head
from .negatives import check_wisk, unpg_logsumexp

__all__ = ["BACKENDS", "PRECISIONS", "assemble_loss", "global_batch_loss", "local_batch_loss",
           "margin_softmax_loss"]

# (labels_B) -> (index_S sorted local rows, labels_B remapped into them; -1 = other shard)
Sampler = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
_HALF_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------- checks
def _check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                  backend: str, precision: str) -> None:
    """Shape/dtype/device checks: metadata only, never a host sync."""
    for name, tensor in (("embeddings", embeddings), ("labels", labels), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be [B, D] with B >= 1, got {tuple(embeddings.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [C, D] with C >= 1, got {tuple(weight.shape)}")
    if not (embeddings.is_floating_point() and weight.is_floating_point()):
        raise ValueError(
            f"embeddings and weight must be floating point, got {embeddings.dtype} and "
            f"{weight.dtype}"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor (e.g. int64), got {labels.dtype}")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"labels must be [B] = [{embeddings.shape[0]}] to match embeddings "
            f"{tuple(embeddings.shape)}, got {tuple(labels.shape)}"
        )
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embedding dim mismatch: embeddings are [B, {embeddings.shape[1]}] but weight is "
            f"{tuple(weight.shape)} (expected [C, {embeddings.shape[1]}])"
        )
    if not embeddings.device == labels.device == weight.device:
        raise ValueError(
            f"embeddings, labels and weight must share a device, got {embeddings.device}, "
            f"{labels.device}, {weight.device}"
        )


def _check_values(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Label range and finiteness: ONE host sync (``tolist``); ``validate=False`` skips it."""
    flags = torch.stack(
        [labels.min() < 0, labels.max() >= num_classes, ~torch.isfinite(embeddings).all()]
    )
    below, above, nonfinite = flags.tolist()
    if below or above:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (weight has {num_classes} classes); found "
            f"{bad.numel()} outside, e.g. {bad[:5].tolist()}"
        )
    if nonfinite:
        rows = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"embeddings contain NaN/inf in {rows.numel()} row(s), e.g. rows {rows[:5].tolist()}"
        )


# ----------------------------------------------------------------------------- shared pieces
def _prepare(emb_bD: torch.Tensor, weight_CD: torch.Tensor, precision: str
             ) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(emb in the length-B dtype, weight, resolved precision)``: float64 if either input is
    float64, else float32 for the small tensors; half-precision embeddings under
    ``precision='auto'`` ask the kernel for tiles of their own precision. The weight is cast
    only when it is not already in that dtype (an fp32 master passes through: no copy)."""
    if precision == "auto":
        precision = _HALF_PRECISION.get(emb_bD.dtype, "auto")
    wide = torch.float64 in (emb_bD.dtype, weight_CD.dtype)
    dtype = torch.float64 if wide else torch.float32
    return emb_bD.to(dtype), weight_CD.to(dtype), precision


def _gather_negatives(
    emb_hat_BD: torch.Tensor, labels_B: torch.Tensor, group: Optional[Any]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global batch for UNPG under replicated data parallelism: all-gather over ``group``
    whose backward SUMS every rank's gradient into each rank's rows, so that ``mean_k loss_k``
    has the single-process gradient (convention in ``unpg.distributed``). ``None``: local batch."""
    if group is None:
        return emb_hat_BD, labels_B
    # all_gather_rows keeps its own slice of the gradient; copy_to_shards first sums the
    # gathered gradient over ranks: together, rank r gets sum_k d loss_k / d rows_r.
    emb_hat_global = copy_to_shards(all_gather_rows(emb_hat_BD, group), group)
    return emb_hat_global, all_gather_rows(labels_B, group)


def assemble_loss(
    ell_B: torch.Tensor,
    cos_t_B: torch.Tensor,
    norm_B: torch.Tensor,
    emb_hat_BD: torch.Tensor,
    labels_B: torch.Tensor,
    head: MarginHead,
    unpg_wisk: Optional[float],
    *,
    negatives_group: Optional[Any] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Everything after the B×C work, on length-B vectors with ordinary autograd:
    ``mean_i(logsumexp([ell_i, s·psi_i, U]) − s·psi_i) + regulariser`` and the UNPG stats."""
    s = head.s
    psi_B = head.target_logit(cos_t_B, norm_B)
    if unpg_wisk is None:
        stats: Dict[str, torch.Tensor] = {}
        lse_B = torch.logaddexp(ell_B, s * psi_B)
    else:
        u, stats = unpg_logsumexp(
            *_gather_negatives(emb_hat_BD, labels_B, negatives_group), s, unpg_wisk
        )
        # U = −inf (nothing kept) gets weight exp(−inf − lse) = 0 here: finite gradients.
        lse_B = torch.logsumexp(torch.stack([ell_B, s * psi_B, u.expand_as(ell_B)], dim=1), dim=1)
    loss = (lse_B - s * psi_B).mean() + head.regularizer(norm_B)
    return loss, stats


# ----------------------------------------------------------------------------- the two layouts
def local_batch_loss(
    emb_bD: torch.Tensor,
    labels_b: torch.Tensor,
    weight_CD: torch.Tensor,
    head: MarginHead,
    unpg_wisk: Optional[float],
    *,
    backend: str = "auto",
    precision: str = "auto",
    chunk_size: int = 8192,
    negatives_group: Optional[Any] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(loss, unpg_stats)``: every class is in ``weight_CD``; the mean over these rows."""
    emb_bD, weight_CD, precision = _prepare(emb_bD, weight_CD, precision)
    labels_b = labels_b.long()
    norm_b = torch.linalg.vector_norm(emb_bD, dim=1)
    emb_hat_bD = F.normalize(emb_bD, dim=1)
    ell_b, cos_t_b = lse_and_target(emb_hat_bD, weight_CD, labels_b, head.s, backend=backend,
                                    precision=precision, chunk_size=chunk_size, class_start=0)
    return assemble_loss(ell_b, cos_t_b, norm_b, emb_hat_bD, labels_b, head, unpg_wisk,
                         negatives_group=negatives_group)


def global_batch_loss(
    emb_bD: torch.Tensor,
    labels_b: torch.Tensor,
    weight_local_CD: torch.Tensor,
    head: MarginHead,
    unpg_wisk: Optional[float],
    *,
    process_group: Optional[Any],
    class_start: int,
    backend: str = "auto",
    precision: str = "auto",
    chunk_size: int = 8192,
    sampler: Optional[Sampler] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """``(loss, unpg_stats, index_S)`` with this rank's class shard ``weight_local_CD`` (global
    classes ``[class_start, class_start + C)``): the global-batch mean, the same on every rank.

    The local rows are all-gathered (backward: this rank's slice; convention in
    ``unpg.kernels``); ``sampler`` (partial FC) picks the shard rows used by this call, returned
    as ``index_S`` (None without sampling). ``process_group=None`` is one process."""
    emb_bD, weight_local_CD, precision = _prepare(emb_bD, weight_local_CD, precision)
    emb_BD = all_gather_rows(emb_bD, process_group)
    labels_B = all_gather_rows(labels_b.long(), process_group)
    norm_B = torch.linalg.vector_norm(emb_BD, dim=1)
    emb_hat_BD = F.normalize(emb_BD, dim=1)
    index_S, weight, kernel_labels_B = None, weight_local_CD, labels_B
    if sampler is not None:
        index_S, kernel_labels_B = sampler(labels_B)
        weight, class_start = weight_local_CD[index_S], 0
    ell_B, cos_t_B = lse_and_target(emb_hat_BD, weight, kernel_labels_B, head.s, backend=backend,
                                    precision=precision, chunk_size=chunk_size,
                                    class_start=class_start, process_group=process_group)
    loss, stats = assemble_loss(ell_B, cos_t_B, norm_B, emb_hat_BD, labels_B, head, unpg_wisk)
    return loss, stats, index_S


# ----------------------------------------------------------------------------- functional
def _shard_counts(num_local: int, group: Any, device: torch.device) -> list:
    """Every rank's class count (one small all_gather; the functional's sharded form only)."""
    count_1 = torch.tensor([num_local], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count_1) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count_1, group=group)
    return [int(c) for c in counts]


def margin_softmax_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    head: Union[str, MarginHead],
    *,
    unpg_wisk: Optional[float] = None,
    backend: str = "auto",
    process_group: Optional[Any] = None,
    precision: str = "auto",
    negatives_group: Optional[Any] = None,
    return_stats: bool = False,
    validate: bool = True,
    chunk_size: int = 8192,
    **head_params: Any,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Batch-mean margin-softmax loss, with UNPG negatives when ``unpg_wisk`` is not None.

    Args:
        embeddings: ``[B, D]`` unnormalised backbone outputs (any float dtype).
        labels: ``[B]`` integer class indices in ``[0, C)``.
        weight: ``[C, D]`` unnormalised class centres.
        head: ``'arcface'|'cosface'|'magface'|'combined'`` (with ``**head_params``: ``s, m``
            (+ ``arcface_grad``) | ``s, l_margin, u_margin, l_a, u_a, lambda_g`` |
            ``s, m1, m2, m3``) or a prebuilt ``MarginHead`` (then no ``head_params``).
        unpg_wisk: whisker factor of UNPG's box-and-whisker filter; None disables UNPG.
        backend: one of ``unpg.kernels.BACKENDS``: ``'auto'`` (Triton on CUDA, chunked
            elsewhere), ``'triton'``, ``'chunked'`` (memory-lean pure torch), or ``'torch'`` (the
            plain reference that stores the B×C logits; the test oracle; float64 works).
        process_group: class-sharded mode (partial FC): ``embeddings``/``labels`` are this
            rank's local batch and ``weight`` its class shard ``unpg.kernels.shard_range``;
            the loss is the global-batch mean and each rank's gradients are the matching
            slices of the single-process gradients.
        precision: one of ``unpg.kernels.PRECISIONS``: the tiles of the B×C work (see the
            module docstring; ``'auto'`` follows half-precision embeddings, else the kernel).
        negatives_group: replicated data parallelism: UNPG's negatives come from the batch
            all-gathered over this group (summing backward); everything else stays local.
        return_stats: also return the UNPG statistics (empty dict when UNPG is off).
        validate: check label range and finiteness of the embeddings. This costs one host sync
            per call; the training hot path passes False. Shape/dtype checks are always done.
        chunk_size: classes per chunk of the ``'chunked'`` backend.
    """
    _check_inputs(embeddings, labels, weight, backend, precision)
    if isinstance(head, MarginHead):
        if head_params:
            raise ValueError(
                f"got a prebuilt head {head!r} and extra head parameters {sorted(head_params)}; "
                "pass one or the other"
            )
        head_obj = head
    else:
        head_obj = build_head(head, **head_params)
    wisk = None if unpg_wisk is None else check_wisk(unpg_wisk)
    if process_group is not None and negatives_group is not None:
        raise ValueError(
            "pass process_group (class-sharded: the loss runs on the global batch, so UNPG "
            "already sees every rank's negatives) or negatives_group (replicated), not both"
        )
    kw = dict(backend=backend, precision=precision, chunk_size=chunk_size)
    if process_group is None:
        if validate:
            _check_values(embeddings, labels, weight.shape[0])
        loss, stats = local_batch_loss(embeddings, labels, weight, head_obj, wisk,
                                       negatives_group=negatives_group, **kw)
    else:
        counts = _shard_counts(weight.shape[0], process_group, weight.device)
        if validate:
            _check_values(embeddings, labels, sum(counts))
        class_start = sum(counts[:dist.get_rank(process_group)])
        loss, stats, _ = global_batch_loss(embeddings, labels, weight, head_obj, wisk,
                                           process_group=process_group,
                                           class_start=class_start, **kw)
    return (loss, stats) if return_stats else loss
