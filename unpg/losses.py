"""Margin-softmax loss (ArcFace / CosFace / MagFace / combined) with optional UNPG negatives.

The loss is written as the decomposition the fused kernels use, so that a backend only replaces
``_lse_and_target`` (the B×C work; ``unpg.kernels`` for every backend but the reference):

    emb_hat = normalize(emb);  cos_t_B = emb_hat_i · normalize(weight[y_i])
    psi_B   = head.target_logit(cos_t_B, ‖emb‖)                   (length-B, torch)
    ell_B   = log Σ_{j≠y_i} exp(s·cos_ij)                          (_lse_and_target: the B×C work)
    U       = logsumexp(s·S')  (UNPG kept negatives, shared by every row; −inf when off/empty)
    loss    = mean_i(logsumexp([ell_i, s·psi_i, U]) − s·psi_i) + head.regularizer(‖emb‖)

This equals the official code's ``cross_entropy(s·[logits, negatives], labels)`` (``unpg.official_loss``)
without materialising ``B × (C + |S'|)`` logits.

# B: batch, C: classes, D: embedding dim
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .heads import MarginHead, build_head
from .negatives import check_wisk, unpg_logsumexp

__all__ = ["BACKENDS", "MarginSoftmaxLoss", "margin_softmax_loss"]

BACKENDS = ("auto", "torch", "chunked", "triton")


def _nontarget_lse_torch(
    emb_hat_BD: torch.Tensor, weight_CD: torch.Tensor, labels_B: torch.Tensor, s: float
) -> torch.Tensor:
    """Reference: full B×C scaled cosines, target column masked to −inf, logsumexp per row."""
    logits_BC = s * (emb_hat_BD @ F.normalize(weight_CD, dim=1).transpose(0, 1))
    classes_C = torch.arange(weight_CD.shape[0], device=labels_B.device)
    target_BC = classes_C.unsqueeze(0) == labels_B.unsqueeze(1)
    return torch.logsumexp(logits_BC.masked_fill(target_BC, -math.inf), dim=1)


def _lse_and_target(
    emb_hat_BD: torch.Tensor,
    weight_CD: torch.Tensor,
    labels_B: torch.Tensor,
    s: float,
    backend: str,
    process_group: Optional[Any],
    chunk_size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ell_B, cos_t_B)``: the non-target log-sum-exp ``log Σ_{j≠y_i} exp(s·x̂_i·ŵ_j)`` and
    the target cosine ``x̂_i·ŵ_{y_i}``, differentiable wrt ``emb_hat_BD`` and ``weight_CD``.

    The single backend dispatch point. ``'torch'`` is the plain reference (it stores the B×C
    logits); every other backend goes to ``unpg.kernels``, which never stores them and returns
    both vectors from one autograd node (so the weight gets one gradient buffer, not two).
    With ``process_group`` the weight is this rank's class shard and ``emb_hat_BD``/``labels_B``
    are the global batch; ``unpg.kernels`` combines the shards' results.
    """
    if backend == "torch" and process_group is None:
        cos_t_B = (emb_hat_BD * F.normalize(weight_CD.index_select(0, labels_B), dim=1)).sum(1)
        return _nontarget_lse_torch(emb_hat_BD, weight_CD, labels_B, s), cos_t_B
    from unpg.kernels import nontarget_lse_and_target, sharded_nontarget_lse_and_target

    kernel_backend = "chunked" if backend == "torch" else backend
    if process_group is None:
        return nontarget_lse_and_target(
            emb_hat_BD, weight_CD, labels_B, s, backend=kernel_backend, chunk_size=chunk_size
        )
    return sharded_nontarget_lse_and_target(
        emb_hat_BD, weight_CD, labels_B, s, process_group=process_group,
        backend=kernel_backend, chunk_size=chunk_size,
    )


def _check_inputs(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, backend: str
) -> None:
    """Shape/dtype/device checks: metadata only, never a host sync."""
    for name, tensor in (("embeddings", embeddings), ("labels", labels), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
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


def _compute_dtype(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _gather_negatives(
    emb_hat_BD: torch.Tensor, labels_B: torch.Tensor, group: Optional[Any]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global batch for UNPG under replicated data parallelism: all-gather over ``group``
    whose backward SUMS every rank's gradient into each rank's rows, so that ``mean_k loss_k``
    has the single-process gradient (convention in ``unpg.distributed``). ``None``: local batch."""
    if group is None:
        return emb_hat_BD, labels_B
    from unpg.kernels import all_gather_rows, copy_to_shards

    # all_gather_rows keeps its own slice of the gradient; copy_to_shards first sums the
    # gathered gradient over ranks: together, rank r gets sum_k d loss_k / d rows_r.
    emb_hat_global = copy_to_shards(all_gather_rows(emb_hat_BD, group), group)
    return emb_hat_global, all_gather_rows(labels_B, group)


def margin_softmax_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    head: Union[str, MarginHead],
    *,
    unpg_wisk: Optional[float] = None,
    backend: str = "auto",
    process_group: Optional[Any] = None,
    negatives_group: Optional[Any] = None,
    return_stats: bool = False,
    validate: bool = True,
    chunk_size: int = 8192,
    **head_params: Any,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Batch-mean margin-softmax loss, with UNPG negatives when ``unpg_wisk`` is not None.

    Args:
        embeddings: ``[B, D]`` unnormalised backbone outputs.
        labels: ``[B]`` integer class indices in ``[0, C)``.
        weight: ``[C, D]`` unnormalised class centres.
        head: ``'arcface'|'cosface'|'magface'|'combined'`` (with ``**head_params``: ``s, m``
            (+ ``arcface_grad``) | ``s, l_margin, u_margin, l_a, u_a, lambda_g`` |
            ``s, m1, m2, m3``) or a prebuilt ``MarginHead`` (then no ``head_params``).
        unpg_wisk: whisker factor of UNPG's box-and-whisker filter; None disables UNPG.
        backend: ``'auto'`` (Triton on CUDA, chunked elsewhere), ``'triton'``, ``'chunked'``
            (memory-lean pure torch), or ``'torch'`` (the plain reference that stores the
            B×C logits; the test oracle).
        process_group: class-sharded mode (partial FC): ``embeddings``/``labels`` are this
            rank's local batch and ``weight`` its class shard ``unpg.kernels.shard_range``;
            the loss is the global-batch mean and each rank's gradients are the matching
            slices of the single-process gradients.
        negatives_group: replicated data parallelism: UNPG's negatives come from the batch
            all-gathered over this group (summing backward); everything else stays local.
        return_stats: also return the UNPG statistics (empty dict when UNPG is off).
        validate: check label range and finiteness of the embeddings. This costs one host sync
            per call; the training hot path passes False. Shape/dtype checks are always done.
        chunk_size: classes per chunk of the ``'chunked'`` backend.

    Float32 and float64 inputs are computed in their dtype; fp16/bf16 are upcast to float32.
    """
    _check_inputs(embeddings, labels, weight, backend)
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
    if validate:
        _check_values(embeddings, labels, _global_num_classes(weight, process_group))

    dtype = _compute_dtype(embeddings, weight)
    emb_BD, weight_CD = embeddings.to(dtype), weight.to(dtype)
    labels_B = labels.long()
    if process_group is not None:
        # Class-sharded: every rank computes the global-batch loss redundantly; the gather's
        # backward keeps this rank's slice (convention in unpg.kernels.distributed).
        from unpg.kernels import all_gather_rows

        emb_BD = all_gather_rows(emb_BD, process_group)
        labels_B = all_gather_rows(labels_B, process_group)

    norm_B = torch.linalg.vector_norm(emb_BD, dim=1)
    emb_hat_BD = F.normalize(emb_BD, dim=1)
    ell_B, cos_t_B = _lse_and_target(
        emb_hat_BD, weight_CD, labels_B, head_obj.s, backend,
        process_group, chunk_size,
    )
    loss, stats = assemble_loss(
        ell_B, cos_t_B, norm_B, emb_hat_BD, labels_B, head_obj, wisk,
        negatives_group=negatives_group,
    )
    return (loss, stats) if return_stats else loss


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
    ``mean_i(logsumexp([ell_i, s·psi_i, U]) − s·psi_i) + regulariser`` and the UNPG stats.

    Shared by ``margin_softmax_loss`` and callers that produce ``(ell_B, cos_t_B)`` themselves
    (``unpg.kernels.PartialFC`` with class sampling)."""
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


def _global_num_classes(weight: torch.Tensor, process_group: Optional[Any]) -> int:
    """Number of classes over all shards (one all_reduce; only on the validating path)."""
    if process_group is None:
        return weight.shape[0]
    import torch.distributed as dist

    count = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    dist.all_reduce(count, group=process_group)
    return int(count.item())


class MarginSoftmaxLoss(nn.Module):
    """Owns the class centres ``weight [num_classes, embedding_size]``, the head and UNPG setting.

    ``forward(embeddings, labels)`` returns the loss; the UNPG statistics of the last call are in
    ``last_stats`` (detached 0-dim tensors, empty when UNPG is off) or returned with
    ``return_stats=True``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        head: str = "arcface",
        *,
        unpg_wisk: Optional[float] = None,
        backend: str = "auto",
        validate: bool = True,
        **head_params: Any,
    ) -> None:
        super().__init__()
        for key, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        self.head = build_head(head, **head_params)
        self.unpg_wisk = None if unpg_wisk is None else check_wisk(unpg_wisk)
        self.backend = backend
        self.validate = validate
        # insightface (arcface_torch PartialFC) initialises the centres from N(0, 0.01).
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))
        self.last_stats: Dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(
        cls, cfg_head: Any, cfg_unpg: Any, num_classes: int, embedding_size: int, **kwargs: Any
    ) -> "MarginSoftmaxLoss":
        """Build from ``unpg.config`` objects (duck-typed: ``cfg_head.params()`` with the head's
        parameters and its name in ``cfg_head.name`` or a ``'name'`` key; ``cfg_unpg.enabled``,
        ``cfg_unpg.wisk``)."""
        params = dict(cfg_head.params())
        name = params.pop("name", None) or getattr(cfg_head, "name", None)
        if name is None:
            raise ValueError("head config has no 'name' (expected arcface|cosface|magface|combined)")
        wisk = cfg_unpg.wisk if cfg_unpg is not None and cfg_unpg.enabled else None
        return cls(num_classes, embedding_size, name, unpg_wisk=wisk, **kwargs, **params)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        loss, stats = margin_softmax_loss(
            embeddings,
            labels,
            self.weight,
            self.head,
            unpg_wisk=self.unpg_wisk,
            backend=self.backend,
            return_stats=True,
            validate=self.validate,
        )
        self.last_stats = stats
        return (loss, stats) if return_stats else loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.weight.shape[0]}, embedding_size={self.weight.shape[1]}, "
            f"head={self.head!r}, unpg_wisk={self.unpg_wisk}, backend={self.backend!r}"
        )
