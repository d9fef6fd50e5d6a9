"""Negative-class sampling of one class shard (PartialFC v2 style).

Keep every class of the shard that appears in the global batch (positives) and fill up to
``int(sample_rate * num_local)`` with uniformly drawn negatives; if the positives alone exceed
that, keep just the positives. Labels are remapped to positions in the sorted sampled set
(-1 where the label lives on another shard).
"""
# B: global batch, C: local classes, S: sampled classes
from typing import Optional, Tuple

import torch

from .reference import local_targets


def check_sample_rate(sample_rate: float) -> float:
    rate = float(sample_rate)
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return rate


def sample_classes(
    labels_global_B: torch.Tensor,
    class_start: int,
    num_local: int,
    sample_rate: float,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(index_S, local_labels_B)``: sorted sampled local class ids and remapped labels.

    Deterministic given ``generator`` (which must live on the labels' device). The size of the
    sampled set depends on how many positives the batch holds, so this costs one host sync
    (``torch.unique``), exactly as PartialFC v2; the unsampled path has none.
    """
    rate = check_sample_rate(sample_rate)
    device = labels_global_B.device
    num_sample = int(rate * num_local)
    local_B, in_shard_B = local_targets(labels_global_B, class_start, num_local)
    positive_P = torch.unique(local_B[in_shard_B], sorted=True)
    if num_sample >= positive_P.numel():
        # Positives score 2 (above any uniform draw), so top-k keeps them all plus the
        # num_sample - P negatives with the highest random scores: a uniform sample.
        score_C = torch.rand(num_local, generator=generator, device=device)
        score_C[positive_P] = 2.0
        index_S = torch.topk(score_C, k=num_sample, sorted=False).indices.sort().values
    else:
        index_S = positive_P
    remapped_B = torch.searchsorted(index_S, local_B)
    local_labels_B = torch.where(in_shard_B, remapped_B, torch.full_like(remapped_B, -1))
    return index_S, local_labels_B
