"""The class centres and the margin-softmax loss, in the two parallel layouts of ``fc.mode``.

``MarginClassifier.forward(emb_bD, labels_b)`` takes this rank's backbone outputs and labels and
returns ``(loss, stats)``; what the loss *means* per rank, and how its gradients combine with
DDP, is written down once in ``unpg.distributed`` (module docstring):

* ``replicated``: ``weight [C, D]`` on every rank; the loss is this rank's local mean, UNPG's
  negatives come from the global batch (``negatives_group``).
* ``sharded``: ``PartialFC`` holds rows ``shard_range(C, rank, K)`` (optionally sampling
  classes, ``fc.sample_rate``); the embeddings and labels are all-gathered and the loss is the
  global-batch mean, the same on every rank.

The initial centres are N(0, 0.01) (insightface) drawn in fixed blocks of rows from
``(seed, block)``, so every layout and world size starts from the same full matrix.

# B: global batch, b: local batch, C: classes, D: embedding dim, S: sampled local classes
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from unpg.distributed import DistContext, gather_rows
from unpg.heads import build_head
from unpg.kernels import PartialFC, all_gather_rows, shard_range
from unpg.losses import assemble_loss, margin_softmax_loss

__all__ = ["MarginClassifier", "initial_centres"]

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


class MarginClassifier(nn.Module):
    """Class centres + margin head + UNPG for one rank (see the module docstring)."""

    def __init__(self, cfg: Any, num_classes: int, ctx: DistContext) -> None:
        super().__init__()
        self.mode = cfg.fc.mode
        self.ctx = ctx
        self.num_classes = int(num_classes)
        self.embedding_size = cfg.model.embedding_size
        self.head = build_head(cfg.head.name, **cfg.head.params())
        self.unpg_wisk = cfg.unpg.unpg_wisk
        self.backend, self.chunk_size = cfg.fc.backend, cfg.fc.chunk_size
        self.group = ctx.loss_group if ctx.distributed else None
        if self.mode == "sharded":
            self.start, self.num_local = shard_range(self.num_classes, ctx.rank, ctx.world_size)
            if self.num_local == 0:
                raise ValueError(f"fc.mode=sharded: {self.num_classes} classes cannot be split "
                                 f"over {ctx.world_size} ranks (rank {ctx.rank} would get none); "
                                 f"use fc.mode=replicated or fewer processes")
            # unpg.kernels has no B x C 'torch' reference; its chunked backend is plain torch.
            self.pfc = PartialFC(self.embedding_size, self.num_classes,
                                 sample_rate=cfg.fc.sample_rate, process_group=self.group,
                                 backend="chunked" if self.backend == "torch" else self.backend,
                                 chunk_size=cfg.fc.chunk_size)
            assert (self.pfc.class_start, self.pfc.num_local) == (self.start, self.num_local)
        else:
            self.start, self.num_local = 0, self.num_classes
            self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        with torch.no_grad():
            self.local_weight.copy_(initial_centres(self.num_classes, self.embedding_size,
                                                    self.start, self.num_local, cfg.train.seed))
        self._sampled: List[torch.Tensor] = []

    @property
    def local_weight(self) -> nn.Parameter:
        """This rank's centres: all ``[C, D]`` (replicated) or its shard ``[C_local, D]``."""
        return self.pfc.weight if self.mode == "sharded" else self.weight

    @property
    def sampling(self) -> bool:
        return self.mode == "sharded" and self.pfc.sample_rate < 1.0

    # ------------------------------------------------------------------------- loss
    def forward(self, emb_bD: torch.Tensor, labels_b: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(loss, unpg_stats)`` for this rank's rows (float32 embeddings from the backbone)."""
        if self.mode == "replicated":
            return margin_softmax_loss(
                emb_bD, labels_b, self.weight, self.head, unpg_wisk=self.unpg_wisk,
                backend=self.backend, negatives_group=self.group, return_stats=True,
                validate=False, chunk_size=self.chunk_size)
        return self._sharded_loss(emb_bD, labels_b)

    def _sharded_loss(self, emb_bD: torch.Tensor, labels_b: torch.Tensor
                      ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The global-batch loss (the same on every rank) from PartialFC's ``(ell, cos_t)``,
        which samples classes when ``fc.sample_rate < 1``; ``unpg.losses.assemble_loss`` adds
        margin, UNPG and regulariser exactly as ``margin_softmax_loss`` does."""
        emb_BD = all_gather_rows(emb_bD.float(), self.group)  # backward: this rank's slice
        labels_B = all_gather_rows(labels_b, self.group)
        norm_B = torch.linalg.vector_norm(emb_BD, dim=1)
        emb_hat_BD = F.normalize(emb_BD, dim=1)
        ell_B, cos_t_B = self.pfc(emb_hat_BD, labels_B, self.head.s)
        if self.sampling and self.training:
            self._sampled.append(self.pfc.last_sampled_index)
        return assemble_loss(ell_B, cos_t_B, norm_B, emb_hat_BD, labels_B, self.head,
                             self.unpg_wisk)

    # ------------------------------------------------------------------------- optimizer step
    @contextmanager
    def step_context(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Wrap ``optimizer.step()``: with class sampling, rows sampled by none of this step's
        micro-batches keep their weight and optimizer state (PartialFC's rule)."""
        if not self._sampled:
            yield
            return
        self.pfc.last_sampled_index = torch.unique(torch.cat(self._sampled))
        self._sampled = []
        with self.pfc.keep_unsampled_rows(optimizer):
            yield

    # ------------------------------------------------------------------------- checkpoints
    def full_weight(self) -> Optional[torch.Tensor]:
        """The full ``[C, D]`` centres on rank 0 (CPU), None elsewhere. Collective in
        sharded mode: every rank must call it."""
        if self.mode == "replicated":
            return self.weight.detach().cpu() if self.ctx.is_main else None
        return self.gather_rows(self.pfc.weight.detach())

    def gather_rows(self, local_CX: torch.Tensor) -> Optional[torch.Tensor]:
        """Full-``C`` tensor on rank 0 from every rank's row block (sharded layout)."""
        counts = [shard_range(self.num_classes, r, self.ctx.world_size)[1]
                  for r in range(self.ctx.world_size)]
        return gather_rows(local_CX, counts, self.ctx)

    def load_full_weight(self, weight_CD: torch.Tensor, where: str = "checkpoint") -> None:
        """Copy this rank's rows out of a full ``[C, D]`` matrix (any saved layout)."""
        if tuple(weight_CD.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"{where}: class centres are {tuple(weight_CD.shape)} but this run has "
                f"{self.num_classes} classes x {self.embedding_size} dims (data.num_classes / "
                f"model.embedding_size); resume only with the data and model it was trained on")
        with torch.no_grad():
            self.local_weight.copy_(weight_CD[self.start:self.start + self.num_local])
