"""``PartialFC``: this rank's class shard of the classifier, with optional negative sampling.

The module owns the contiguous weight shard ``[start, start + num_local)`` of
``shard_range(num_classes, rank, world_size)`` (init normal, std 0.01) and returns the global
``(ell_B, cos_t_B)`` of the global batch; margin, UNPG and the final log-sum-exp stay with the
caller. With ``sample_rate < 1`` each forward samples classes (positives of the batch plus
uniform negatives) and computes over those rows only.

Optimizer state of un-sampled rows: their gradient is dense zero, but SGD momentum and weight
decay would still move them. Wrap the optimizer step in ``keep_unsampled_rows(optimizer)``: it
snapshots the weight and every per-parameter optimizer state tensor shaped like it, and after
the step puts the un-sampled rows back (state tensors created by that step get zeros there),
so only the sampled rows' parameters and optimizer state move, as in PartialFC v1.
"""
# B: global batch, C: local classes, S: sampled classes, D: embedding dim
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .distributed import group_rank_size, shard_lse_and_target, shard_range
from .sampling import check_sample_rate, sample_classes


class PartialFC(nn.Module):
    """Class-sharded classifier weight; ``forward(emb_hat, labels, scale) -> (ell_B, cos_t_B)``."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        sample_rate: float = 1.0,
        process_group: Optional[object] = None,
        backend: str = "auto",
        chunk_size: int = 8192,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"PartialFC: embedding_size and num_classes must be >= 1, got "
                             f"{embedding_size} and {num_classes}")
        self.sample_rate = check_sample_rate(sample_rate)
        self.process_group = process_group
        self.backend, self.chunk_size = backend, chunk_size
        self.rank, self.world_size = group_rank_size(process_group)
        self.num_classes = num_classes
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(
            torch.empty(self.num_local, embedding_size, device=device, dtype=dtype).normal_(0, 0.01))
        # Local ids of the rows used by the last forward (sorted); None = all rows.
        self.last_sampled_index: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"classes=[{self.class_start}, {self.class_start + self.num_local}) of "
                f"{self.num_classes}, dim={self.weight.shape[1]}, sample_rate={self.sample_rate}")

    def forward(
        self,
        emb_hat_global_BD: torch.Tensor,
        labels_global_B: torch.Tensor,
        scale: float,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global ``(ell_B, cos_t_B)``. Sampling runs in training mode only (eval uses every
        row); ``generator`` (on the weight's device) makes it deterministic."""
        if self.sample_rate < 1.0 and self.training:
            index_S, local_labels_B = sample_classes(
                labels_global_B, self.class_start, self.num_local, self.sample_rate, generator)
            self.last_sampled_index = index_S
            return shard_lse_and_target(
                emb_hat_global_BD, self.weight[index_S], local_labels_B, scale, class_start=0,
                process_group=self.process_group, backend=self.backend,
                chunk_size=self.chunk_size)
        self.last_sampled_index = None
        return shard_lse_and_target(
            emb_hat_global_BD, self.weight, labels_global_B, scale, class_start=self.class_start,
            process_group=self.process_group, backend=self.backend, chunk_size=self.chunk_size)

    def sampled_rows_mask(self) -> torch.Tensor:
        """Bool (num_local,): rows used by the last forward (all True without sampling)."""
        mask_C = torch.zeros(self.num_local, dtype=torch.bool, device=self.weight.device)
        if self.last_sampled_index is None:
            return mask_C.fill_(True)
        return mask_C.index_fill_(0, self.last_sampled_index, True)

    @contextmanager
    def keep_unsampled_rows(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """``with pfc.keep_unsampled_rows(opt): opt.step()`` -- un-sampled rows of the weight and
        of its optimizer state are restored after the step (see the module docstring)."""
        if self.last_sampled_index is None:
            yield
            return
        weight = self.weight
        keep_C1 = (~self.sampled_rows_mask())[:, None]
        state_before = {k: v.detach().clone() for k, v in optimizer.state.get(weight, {}).items()
                        if torch.is_tensor(v) and v.shape == weight.shape}
        weight_before = weight.detach().clone()
        yield
        with torch.no_grad():
            weight.copy_(torch.where(keep_C1, weight_before, weight))
            for key, value in optimizer.state.get(weight, {}).items():
                if not (torch.is_tensor(value) and value.shape == weight.shape):
                    continue
                old = state_before.get(key)
                old = torch.zeros_like(value) if old is None else old
                value.copy_(torch.where(keep_C1, old, value))
