"""Process groups, and THE place where the loss's gradient convention meets DDP's averaging.

Launch: ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``;
``init_process_group(init_method="env://")`` reads them (multi-node included). Backend NCCL for
CUDA tensors plus Gloo for CPU tensors on CUDA, Gloo alone on CPU. Without those variables the
run is one process and no group is created.

Groups: the default group carries DDP's bucket all-reduces and host-side control messages
(stop flag, evaluation score, checkpoint gathers). ``loss_group`` (same ranks, own
communicator) carries the collectives of the margin-softmax loss and of the FC gradients, so
their order can never interleave with DDP's buckets.

Gradient convention (B global batch, K ranks, b = B / K local rows; L the single-process loss
on the global batch). DDP wraps the backbone only; the class centres are outside it.

* ``fc.mode: sharded`` -- rank k holds classes ``shard_range(C, k, K)``. The embeddings are
  all-gathered (``unpg.kernels.all_gather_rows``, backward = own slice) and every rank computes
  the SAME global-mean loss L. Rank k's gradients wrt its local embeddings and its weight shard
  are then exactly the matching slices of dL. A backbone parameter's full gradient is the SUM
  over ranks of the per-rank contributions, so DDP's default average (divide by K) would be K
  times too small: ``MarginClassifier.wrap_backbone`` registers ``sum_allreduce_hook``
  (all-reduce, no division). The shard gradients need no communication.
* ``fc.mode: replicated`` -- every rank holds all C centres and computes its own rows' terms,
  ``L_k = mean_{i in rank k} l_i``, with UNPG's shared scalar ``U`` from the all-gathered global
  batch whose backward SUMS the ranks' gradients (``unpg.losses.local_batch_loss(...,
  negatives_group=loss_group)``: ``copy_to_shards(all_gather_rows(x))``). Then
  ``mean_k L_k = L``; rank k's
  backprop yields ``d(sum_k L_k)/d e_i`` for its rows, so DDP's AVERAGE of the backbone
  gradients is dL/dtheta; the centres' gradients ``dL_k/dW`` are averaged by ``FcGradAverager``
  (all-reduce SUM / K, launched from a gradient hook as soon as they are final).

``unpg.classifier.MarginClassifier`` is the one place that knows which of the two applies; the
pieces here (``wrap_backbone``'s ``comm_hook``, ``FcGradAverager``) take no layout argument.

Batch norm keeps per-rank batch statistics (as insightface): a K-process run equals the
1-process run exactly only for BN-free (or eval-mode BN) backbones.
"""
from __future__ import annotations

import datetime
import gc
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "FcGradAverager", "all_reduce_min", "any_rank", "broadcast_float",
           "gather_objects", "gather_rows", "resolve_device", "setup_distributed",
           "sum_allreduce_hook", "teardown_distributed", "wrap_backbone"]

_ENV_KEYS = ("RANK", "WORLD_SIZE")


@dataclass
class DistContext:
    """Where this process sits: ranks, device and the process groups (None in one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    loss_group: Optional[Any] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``train.device``: auto (CUDA when available), cpu or cuda (error without CUDA)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available here; use "
                         "train.device=cpu or auto")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(device_choice: str = "auto", timeout_min: float = 30.0) -> DistContext:
    """Join the torchrun job described by the environment (or stay one process)."""
    launched = all(k in os.environ for k in _ENV_KEYS)
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    rank = int(os.environ.get("RANK", "0")) if launched else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return DistContext(0, 1, 0, device, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_min))
    loss_group = dist.new_group(list(range(world)),
                                backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device, loss_group)


def teardown_distributed() -> None:
    """Destroy every process group. Objects that hold a group (DDP's reducer, pending Work,
    autograd hooks) are collected first: one destroyed after its group, at interpreter exit,
    can make gloo abort the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- DDP
def sum_allreduce_hook(group, bucket):  # no annotations: DDP checks them against real types
    """DDP comm hook: all-reduce SUM without DDP's division by the world size (sharded FC mode,
    where every rank's gradient is already an exact share of the global one)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_backbone(backbone: nn.Module, ctx: DistContext,
                  comm_hook: Optional[Callable[..., Any]] = None) -> nn.Module:
    """DDP around the backbone (identity in one process); ``comm_hook`` replaces DDP's bucket
    averaging (``sum_allreduce_hook`` for the class-sharded loss)."""
    if not ctx.distributed:
        return backbone
    # Per-rank BN statistics, as insightface (no buffer broadcast each forward). Newer torch
    # spells it forward_sync_buffers; the buffers are equal at init anyway (same seed).
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                       else {"broadcast_buffers": False})
    ddp = nn.parallel.DistributedDataParallel(
        backbone, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        bucket_cap_mb=16, gradient_as_bucket_view=True, **no_sync_buffers)
    if comm_hook is not None:
        ddp.register_comm_hook(None, comm_hook)
    return ddp


class FcGradAverager:
    """Averages the replicated class centres' gradients over ranks (they are not under DDP).

    ``arm()`` before the last micro-step's backward; a post-accumulate-grad hook launches an
    async all-reduce as soon as each gradient is final (early in backward: the centres sit at
    the loss), overlapping it with the backbone's backward; ``wait()`` finishes and divides.
    """

    def __init__(self, params: List[nn.Parameter], ctx: DistContext) -> None:
        self.ctx, self.params = ctx, list(params)
        self._armed = False
        self._works: List[Any] = []
        self._handles = []
        if ctx.distributed:
            self._handles = [p.register_post_accumulate_grad_hook(self._launch) for p in self.params]

    def _launch(self, p: torch.Tensor) -> None:
        if self._armed:
            self._works.append(dist.all_reduce(p.grad, group=self.ctx.loss_group, async_op=True))

    def arm(self) -> None:
        self._armed = self.ctx.distributed

    def wait(self) -> None:
        if not self.ctx.distributed:
            return
        for work in self._works:
            work.wait()
        launched = len(self._works)
        self._works, self._armed = [], False
        grads = [p.grad for p in self.params if p.grad is not None]
        assert launched == len(grads), f"FC grad hooks fired {launched}x for {len(grads)} grads"
        if grads:
            torch._foreach_div_(grads, float(self.ctx.world_size))


# ----------------------------------------------------------------------------- small collectives
def all_reduce_min(flag: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Element-wise minimum over ranks, on the device (no host sync); identity in one process."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return flag
    out = flag.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN, group=group)
    return out


def broadcast_float(value: float, ctx: DistContext) -> float:
    """Rank 0's ``value`` on every rank (host-side, through the CPU/Gloo path)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is True on any (host-side CPU tensor: no device sync)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(local: torch.Tensor, counts: List[int], ctx: DistContext,
                to_cpu: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.detach().cpu()
                ) -> Optional[torch.Tensor]:
    """Concatenate every rank's row block (``counts[r]`` rows, any split) on rank 0; other ranks
    get None. Blocks travel as CPU tensors over Gloo, padded to the largest block."""
    local = to_cpu(local)
    if not ctx.distributed:
        return local
    rows = max(counts)
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts] if ctx.is_main else None
    dist.gather(padded, parts, dst=0)
    if not ctx.is_main:
        return None
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


def gather_objects(obj: Any, ctx: DistContext) -> List[Any]:
    """Every rank's ``obj`` (picklable; our own processes only) on every rank."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
