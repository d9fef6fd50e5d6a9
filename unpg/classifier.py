"""``MarginClassifier``: THE owner of the class centres, and everything the trainer needs of them.

It holds this rank's rows of the ``[C, D]`` centres (one initialisation: insightface's
N(0, 0.01), drawn in fixed blocks of rows from ``(seed, block)`` so that every layout and world
size starts from the same full matrix), the margin head and the UNPG setting, and computes the
loss through one path per layout (``unpg.losses``). What the loss means per rank and how its
gradients meet DDP's is written down once, in ``unpg.distributed`` (module docstring):

* ``replicated``: all C rows on every rank; ``local_batch_loss`` (this rank's mean, UNPG's
  negatives from the all-gathered global batch). The centres' gradients are averaged over ranks
  by ``FcGradAverager`` (``arm_grad_sync`` / ``finish_grad_sync``); DDP averages the backbone.
* ``sharded``: rows ``shard_range(C, rank, K)``; ``global_batch_loss`` (gather -> optional class
  sampling ``fc.sample_rate`` -> normalised linear -> margin -> distributed LSE), the global mean
  on every rank. The backbone's DDP buckets are SUMMED (``backbone_comm_hook``); the shards
  need no communication.

Nothing outside this module branches on the layout: the trainer asks ``wrap_backbone``,
``arm_grad_sync``/``finish_grad_sync``, ``grad_sq_norm``, ``loss_is_global``, ``step_context``,
and ``state_dict``/``load_state_dict`` (the FULL matrix, so a checkpoint reshards to any world
size and either layout); ``gather_rows``/``local_rows`` do the same for per-row optimizer state
(``unpg.optim.OptimizerState``).

# B: global batch, b: local batch, C: classes, D: embedding dim, X: any trailing dims
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from unpg.distributed import (
    DistContext,
    FcGradAverager,
    gather_rows,
    sum_allreduce_hook,
    wrap_backbone,
)
from unpg.heads import MarginHead, build_head
from unpg.kernels import PRECISIONS, PartialFC, shard_range
from unpg.losses import global_batch_loss, local_batch_loss
from unpg.negatives import check_wisk

__all__ = ["MODES", "MarginClassifier", "initial_centres", "resolve_precision"]

MODES = ("replicated", "sharded")
_INIT_BLOCK = 65536  # rows per independently seeded block of the initial matrix


def initial_centres(num_classes: int, embedding_size: int, start: int, num_local: int,
                    seed: int) -> torch.Tensor:
    """Rows ``[start, start + num_local)`` of the seeded N(0, 0.01) initial ``[C, D]`` matrix;
    only the blocks that overlap them are drawn."""
    assert 0 <= start and start + num_local <= num_classes
    out = torch.empty(num_local, embedding_size)
    first, last = start // _INIT_BLOCK, (start + num_local - 1) // _INIT_BLOCK
    for block in range(first, last + 1 if num_local else first):
        lo = block * _INIT_BLOCK
        rows = min(_INIT_BLOCK, num_classes - lo)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.empty(rows, embedding_size).normal_(0.0, 0.01, generator=gen)
        a, b = max(start, lo), min(start + num_local, lo + rows)
        out[a - start:b - start] = values[a - lo:b - lo]
    return out


def resolve_precision(precision: str, amp_dtype: Optional[torch.dtype]) -> str:
    """``fc.precision`` for a run whose ``train.amp`` resolved to ``amp_dtype``: ``auto`` means
    bf16 tiles under bf16 AMP, fp16 under fp16 AMP, else the kernel's own choice. Explicit
    values pass through. The trainer calls the classifier outside autocast, so this explicit
    setting is what puts the B×C work on half-precision tensor cores in training."""
    if precision not in PRECISIONS:
        raise ValueError(f"fc.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "auto")


class MarginClassifier(nn.Module):
    """Class centres + margin head + UNPG for one rank (see the module docstring).

    ``forward(emb_bD, labels_b) -> (loss, unpg_stats)`` on this rank's rows; the embeddings may
    be bf16/fp16 (the backbone's dtype under autocast): ``precision`` picks the kernel's tiles.
    """

    def __init__(self, num_classes: int, embedding_size: int, head: MarginHead, *,
                 unpg_wisk: Optional[float] = None, mode: str = "replicated",
                 sample_rate: float = 1.0, backend: str = "auto", precision: str = "auto",
                 chunk_size: int = 8192, ctx: Optional[DistContext] = None, seed: int = 0,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        for key, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if mode not in MODES:
            raise ValueError(f"fc.mode: {mode!r} is not one of {list(MODES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"fc.precision: {precision!r} is not one of {list(PRECISIONS)}")
        if sample_rate < 1.0 and mode != "sharded":
            raise ValueError(f"fc.sample_rate={sample_rate} < 1 (partial FC) needs fc.mode=sharded")
        self.ctx = ctx or DistContext()
        self.mode, self.head = mode, head
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.unpg_wisk = None if unpg_wisk is None else check_wisk(unpg_wisk)
        self.backend, self.precision, self.chunk_size = backend, precision, chunk_size
        self.group = self.ctx.loss_group if self.ctx.distributed else None
        self.start, self.num_local = 0, num_classes
        self.pfc: Optional[PartialFC] = None
        if mode == "sharded":
            self.start, self.num_local = shard_range(num_classes, self.ctx.rank,
                                                     self.ctx.world_size)
            if self.num_local == 0:
                raise ValueError(f"fc.mode=sharded: {num_classes} classes cannot be split over "
                                 f"{self.ctx.world_size} ranks (rank {self.ctx.rank} would get "
                                 f"none); use fc.mode=replicated or fewer processes")
            if sample_rate < 1.0:
                self.pfc = PartialFC(self.start, self.num_local, sample_rate)
        self.weight = nn.Parameter(initial_centres(num_classes, embedding_size, self.start,
                                                   self.num_local, seed).to(device))
        self._grad_sync: Optional[FcGradAverager] = None

    @classmethod
    def from_config(cls, fc: Any, head: Any, unpg: Any, *, embedding_size: int,
                    num_classes: int, ctx: Optional[DistContext] = None, seed: int = 0,
                    amp_dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> "MarginClassifier":
        """From the ``fc``, ``head`` and ``unpg`` config sections (``unpg.config``) and the run's
        resolved AMP dtype (it decides ``fc.precision: auto``)."""
        return cls(num_classes, embedding_size, build_head(head.name, **head.params()),
                   unpg_wisk=unpg.unpg_wisk, mode=fc.mode, sample_rate=fc.sample_rate,
                   backend=fc.backend, precision=resolve_precision(fc.precision, amp_dtype),
                   chunk_size=fc.chunk_size, ctx=ctx, seed=seed, device=device)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, classes=[{self.start}, {self.start + self.num_local}) of "
                f"{self.num_classes}, dim={self.embedding_size}, head={self.head!r}, "
                f"unpg_wisk={self.unpg_wisk}, backend={self.backend}, precision={self.precision}"
                + (f", {self.pfc!r}" if self.pfc is not None else ""))

    # ------------------------------------------------------------------------- loss
    def forward(self, emb_bD: torch.Tensor, labels_b: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(loss, unpg_stats)`` for this rank's rows. Class sampling runs in training mode."""
        kw = dict(backend=self.backend, precision=self.precision, chunk_size=self.chunk_size)
        if self.mode == "replicated":
            return local_batch_loss(emb_bD, labels_b, self.weight, self.head, self.unpg_wisk,
                                    negatives_group=self.group, **kw)
        sampler = self.pfc if self.training else None
        loss, stats, _ = global_batch_loss(emb_bD, labels_b, self.weight, self.head,
                                           self.unpg_wisk, process_group=self.group,
                                           class_start=self.start, sampler=sampler, **kw)
        return loss, stats

    @property
    def loss_is_global(self) -> bool:
        """True when every rank's loss is already the global-batch mean (sharded, or one
        process); False when it is this rank's local mean (replicated over several ranks)."""
        return self.mode == "sharded" or not self.ctx.distributed

    # ------------------------------------------------------------------------- gradients
    def wrap_backbone(self, backbone: nn.Module) -> nn.Module:
        """DDP around ``backbone`` with the bucket reduction this layout's loss needs."""
        hook = sum_allreduce_hook if self.mode == "sharded" else None
        return wrap_backbone(backbone, self.ctx, comm_hook=hook)

    def arm_grad_sync(self) -> None:
        """Before the last micro-batch's backward: replicated centres over several ranks start
        their async gradient all-reduce as soon as each gradient is final."""
        if self.mode == "replicated" and self.ctx.distributed:
            if self._grad_sync is None:  # built here: after .to(device), on the final Parameter
                self._grad_sync = FcGradAverager([self.weight], self.ctx)
            self._grad_sync.arm()

    def finish_grad_sync(self) -> None:
        """After backward: wait for the all-reduce and divide (replicated); nothing (sharded)."""
        if self._grad_sync is not None:
            self._grad_sync.wait()

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of the centres' gradient over all C rows (0-dim float32, on the
        device). Collective when sharded (summed over the shards); call on every rank."""
        grad = self.weight.grad
        sq = (torch.zeros((), device=self.weight.device) if grad is None
              else torch.linalg.vector_norm(grad.float()) ** 2)
        if self.mode == "sharded" and self.ctx.distributed:
            dist.all_reduce(sq, group=self.ctx.loss_group)
        return sq

    @contextmanager
    def step_context(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Wrap ``optimizer.step()``: with class sampling, rows sampled by none of this step's
        micro-batches keep their weight and optimizer state (``unpg.kernels.PartialFC``)."""
        if self.pfc is None:
            yield
            return
        with self.pfc.keep_unsampled_rows(self.weight, optimizer):
            yield

    def rows_moved_by_last_step(self) -> torch.Tensor:
        """Bool ``[num_local]``: the local rows the last optimizer step could move."""
        if self.pfc is None:
            return torch.ones(self.num_local, dtype=torch.bool, device=self.weight.device)
        return self.pfc.rows_mask(self.pfc.last_step_index, self.weight.device)

    # ------------------------------------------------------------------------- state
    def gather_rows(self, local_CX: torch.Tensor) -> Optional[torch.Tensor]:
        """The full-``C`` tensor (CPU) on rank 0 from this rank's rows, None elsewhere.
        Collective when sharded: every rank must call it."""
        if self.mode == "replicated":
            return local_CX.detach().cpu() if self.ctx.is_main else None
        counts = [shard_range(self.num_classes, r, self.ctx.world_size)[1]
                  for r in range(self.ctx.world_size)]
        return gather_rows(local_CX, counts, self.ctx)

    def local_rows(self, full_CX: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full-``C`` tensor (a view)."""
        return full_CX[self.start:self.start + self.num_local]

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:  # type: ignore[override]
        """``{"weight": [C, D] CPU}`` on rank 0, ``{}`` on the others: the full matrix whatever
        the layout. Collective when sharded: every rank must call it."""
        full = self.gather_rows(self.weight.detach())
        return {"weight": full} if full is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True, *,
                        where: str = "checkpoint") -> None:  # type: ignore[override]
        """Copy this rank's rows out of ``state_dict["weight"]`` (full ``[C, D]``, any saved
        layout or world size)."""
        weight_CD = state_dict.get("weight")
        if not torch.is_tensor(weight_CD):
            raise ValueError(f"{where}: no class-centre matrix ('weight') in the classifier state")
        if tuple(weight_CD.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"{where}: class centres are {tuple(weight_CD.shape)} but this run has "
                f"{self.num_classes} classes x {self.embedding_size} dims (data.num_classes / "
                f"model.embedding_size); resume only with the data and model it was trained on")
        with torch.no_grad():
            self.weight.copy_(self.local_rows(weight_CD))
