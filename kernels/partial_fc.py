"""Partial FC's class sampling for one class shard, and the optimizer guard of unsampled rows.

``PartialFC`` holds no weight (the class centres belong to ``unpg.classifier.MarginClassifier``):
it samples, per forward, the shard rows a step computes with (PartialFC v2: the batch's
positives plus uniform negatives up to ``int(sample_rate * num_local)``, ``sample_classes``), and
remembers them until the optimizer step.

Why the guard: an unsampled row's gradient is dense zero, but SGD momentum and weight decay
would still move it. ``keep_unsampled_rows(weight, optimizer)`` wraps ``optimizer.step()``: it
snapshots the weight and every optimizer state tensor shaped like it, and after the step puts
back the rows sampled by none of the step's forwards (state tensors created by that step get
zeros there), so only the sampled rows' parameters and optimizer state move, as in PartialFC v1.
"""
# B: global batch, C: local classes, S: sampled classes, D: embedding dim
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch

from .sampling import check_sample_rate, sample_classes


class PartialFC:
    """Class sampling of the shard ``[class_start, class_start + num_local)``.

    ``sample(labels_B)`` -> ``(index_S, local_labels_B)`` (sorted local rows; labels remapped
    into them, -1 on other shards) and records ``index_S``; ``keep_unsampled_rows`` consumes the
    records of the step (several micro-batches: their union moves)."""

    def __init__(self, class_start: int, num_local: int, sample_rate: float = 1.0) -> None:
        if num_local < 1 or class_start < 0:
            raise ValueError(f"PartialFC: need class_start >= 0 and num_local >= 1, got "
                             f"{class_start} and {num_local}")
        self.class_start, self.num_local = int(class_start), int(num_local)
        self.sample_rate = check_sample_rate(sample_rate)
        self._pending: List[torch.Tensor] = []
        # Sorted local rows the last optimizer step was allowed to move (None: all rows).
        self.last_step_index: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return (f"PartialFC(classes=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate})")

    def sample(self, labels_global_B: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample this forward's rows (one host sync, see ``sample_classes``) and record them."""
        index_S, local_labels_B = sample_classes(labels_global_B, self.class_start,
                                                 self.num_local, self.sample_rate, generator)
        self._pending.append(index_S)
        return index_S, local_labels_B

    __call__ = sample

    def rows_mask(self, index_S: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Bool ``[num_local]``: the rows in ``index_S`` (all True for None)."""
        mask_C = torch.zeros(self.num_local, dtype=torch.bool, device=device)
        if index_S is None:
            return mask_C.fill_(True)
        return mask_C.index_fill_(0, index_S, True)

    @contextmanager
    def keep_unsampled_rows(self, weight: torch.Tensor,
                            optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """``with pfc.keep_unsampled_rows(w, opt): opt.step()`` -- rows of ``w`` (and of its
        optimizer state) sampled by none of the forwards since the last step are restored."""
        if not self._pending:
            self.last_step_index = None
            yield
            return
        index_S = torch.unique(torch.cat(self._pending))
        self._pending = []
        self.last_step_index = index_S
        keep_C1 = (~self.rows_mask(index_S, weight.device))[:, None]
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
