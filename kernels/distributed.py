"""Former name of ``sharded.py`` (the sharded layer); kept importable for existing imports.

Deprecated: import from ``unpg.kernels`` (or ``unpg.kernels.sharded``) instead.
"""
from .api import lse_and_target
from .sharded import (  # noqa: F401  (re-exports)
    all_gather_rows,
    copy_to_shards,
    group_rank_size,
    lse_across_shards,
    shard_range,
    shard_start,
    sum_across_shards,
)


def shard_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale, *, class_start,
                         process_group, backend="auto", chunk_size=8192):
    """Deprecated: ``unpg.kernels.lse_and_target(..., process_group=group)``."""
    return lse_and_target(emb_hat_BD, weight_CD, labels_B, scale, backend=backend,
                          chunk_size=chunk_size, class_start=class_start,
                          process_group=process_group)
