"""The sharded layer: class-sharded (partial FC) layout, differentiable collectives, and the
shard combine around the local layer (``local.py``), which it calls down into.

Every rank holds a contiguous class range of the classifier (``shard_range``) and computes the
loss *redundantly on the global batch* (Megatron-style): the length-B parts of the graph (UNPG
scalar, margin, final log-sum-exp) are identical on all ranks, so their gradients are complete
everywhere and no collective is needed for them. Only the shard-local pieces need one:

* ``all_gather_rows``: local embeddings -> global batch; backward keeps this rank's slice.
* ``copy_to_shards``: identity; backward sums the shard-local partial dX_hat over ranks.
* ``lse_across_shards``: logsumexp over ranks of the local ``ell_r``; backward gives each rank
  ``g * exp(ell_r - ell)`` (its own share, no double counting).
* ``sum_across_shards``: all_reduce SUM (the target cosine lives on its owner rank); backward
  identity.

``process_group=None`` means one process: the same autograd Functions run with no collective.
"""
# B: global batch, b: local batch, C: local classes, D: embedding dim, K: ranks
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .local import local_lse_and_target

_CHECKED_ROW_SHAPES: Dict[Tuple[int, int, Tuple[int, ...]], bool] = {}
_SHARD_STARTS: Dict[Tuple[int, int, int], int] = {}


def shard_range(num_classes: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(start, num_local)`` of ``rank``'s contiguous class range (insightface's split)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: need 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    if num_classes < 0:
        raise ValueError(f"shard_range: num_classes must be >= 0, got {num_classes}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def group_rank_size(group: Optional[object]) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``None`` is a single process ``(0, 1)``."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_equal_rows(x_bD: torch.Tensor, group, world: int) -> None:
    """Raise unless every rank passes the same shape. One small all_gather (and host read) the
    first time a (group, shape) is seen; cached after that so steady-state steps do not sync."""
    key = (id(group), world, tuple(x_bD.shape))
    if key in _CHECKED_ROW_SHAPES:
        return
    shape_1S = torch.tensor([list(x_bD.shape)], dtype=torch.int64, device=x_bD.device)
    shapes = [torch.empty_like(shape_1S) for _ in range(world)]
    dist.all_gather(shapes, shape_1S, group=group)
    seen = [tuple(s.view(-1).tolist()) for s in shapes]
    if len(set(seen)) != 1:
        raise ValueError(f"all_gather_rows: every rank must pass the same local batch shape; "
                         f"got {seen} (pad or drop_last so local batches are equal)")
    _CHECKED_ROW_SHAPES[key] = True


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_bD, group):
        rank, world = group_rank_size(group)
        ctx.rank, ctx.rows = rank, x_bD.shape[0]
        if world == 1:
            return x_bD.clone()
        _check_equal_rows(x_bD, group, world)
        parts = [torch.empty_like(x_bD) for _ in range(world)]
        dist.all_gather(parts, x_bD.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_BD):
        # The downstream gradient is already complete on every rank (redundant loss).
        start = ctx.rank * ctx.rows
        return grad_BD[start:start + ctx.rows].contiguous(), None


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _, world = group_rank_size(ctx.group)
        grad = grad.contiguous().clone()
        if world > 1:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _SumAcrossShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        _, world = group_rank_size(group)
        out = t.contiguous().clone()
        if world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LseAcrossShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ell_local_B, group):
        _, world = group_rank_size(group)
        if world == 1:
            ell_B = ell_local_B.clone()
        else:
            parts = [torch.empty_like(ell_local_B) for _ in range(world)]
            dist.all_gather(parts, ell_local_B.contiguous(), group=group)
            ell_B = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(ell_local_B, ell_B)
        return ell_B

    @staticmethod
    def backward(ctx, grad_B):
        ell_local_B, ell_B = ctx.saved_tensors
        # A shard with no class for a row (ell_r = -inf) gets 0, not exp(-inf + inf) = nan.
        share_B = torch.where(torch.isinf(ell_local_B), torch.zeros_like(ell_local_B),
                              torch.exp(ell_local_B - ell_B))
        return grad_B * share_B, None


def all_gather_rows(x_local_bD: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """Concatenate every rank's rows (equal local shapes); backward returns this rank's slice."""
    return _AllGatherRows.apply(x_local_bD, group)


def copy_to_shards(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """Identity forward; backward all_reduce(SUM) of the shard-local partial gradients."""
    return _CopyToShards.apply(x, group)


def sum_across_shards(t: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """all_reduce(SUM) forward; identity backward (the incoming gradient is the same on all ranks)."""
    return _SumAcrossShards.apply(t, group)


def lse_across_shards(ell_local_B: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """Global ``ell_B = logsumexp_r ell_r`` of the shard-local non-target log-sum-exps."""
    return _LseAcrossShards.apply(ell_local_B, group)


def shard_start(num_local: int, group: Optional[object], device: torch.device) -> int:
    """First global class of this rank for any contiguous rank-ordered layout: the sum of the
    lower ranks' class counts. One all_gather and host read per (group, count), then cached."""
    rank, world = group_rank_size(group)
    if world == 1:
        return 0
    key = (id(group), rank, num_local)
    if key not in _SHARD_STARTS:
        count_1 = torch.tensor([num_local], dtype=torch.int64, device=device)
        counts = [torch.empty_like(count_1) for _ in range(world)]
        dist.all_gather(counts, count_1, group=group)
        _SHARD_STARTS[key] = int(sum(int(c) for c in counts[:rank]))
    return _SHARD_STARTS[key]


def sharded_lse_and_target(emb_hat_BD: torch.Tensor, weight_CD: torch.Tensor,
                           labels_B: torch.Tensor, scale: float, *, class_start: int,
                           process_group: Optional[object], backend: str, precision: str,
                           chunk_size: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """copy_to_shards -> local ``(ell, cos_t)`` over ``weight_CD`` (global classes
    ``[class_start, class_start + C)``, one autograd node) -> combined over ranks.

    ``emb_hat_BD`` and ``labels_B`` are the global batch; backend and precision are resolved.
    ``ell`` is combined by ``lse_across_shards``, ``cos_t`` by ``sum_across_shards`` (the
    label's owner rank holds it, the others 0). ``process_group=None`` runs the same autograd
    Functions without collectives (one process)."""
    x_BD = copy_to_shards(emb_hat_BD, process_group)
    ell_local_B, cos_local_B = local_lse_and_target(
        x_BD, weight_CD, labels_B, scale, backend=backend, precision=precision,
        chunk_size=chunk_size, class_start=class_start)
    return (lse_across_shards(ell_local_B, process_group),
            sum_across_shards(cos_local_B, process_group))
