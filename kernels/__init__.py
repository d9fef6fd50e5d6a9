"""Margin-softmax compute kernels: the non-target log-sum-exp ``ell_i`` and class sharding.

``ell_i = log sum_{j != y_i} exp(s * x_hat_i . w_j / |w_j|)`` is margin-agnostic: the caller
adds the target logit ``s * psi_i``, the UNPG scalar ``U`` and takes ``logsumexp`` on
length-B vectors. Backends: Triton (CUDA; CPU under ``TRITON_INTERPRET=1``) and a chunked
pure-torch path. Nothing here imports triton until the Triton backend runs.
"""
from .distributed import (
    all_gather_rows,
    copy_to_shards,
    group_rank_size,
    lse_across_shards,
    shard_lse_and_target,
    shard_range,
    sharded_nontarget_lse_and_target,
    sum_across_shards,
)
from .function import nontarget_lse, nontarget_lse_and_target, resolve_backend, triton_available
from .partial_fc import PartialFC
from .reference import nontarget_lse_reference
from .sampling import sample_classes
from .target import target_cosine

__all__ = [
    "PartialFC",
    "all_gather_rows",
    "copy_to_shards",
    "group_rank_size",
    "lse_across_shards",
    "nontarget_lse",
    "nontarget_lse_and_target",
    "nontarget_lse_reference",
    "resolve_backend",
    "sample_classes",
    "shard_lse_and_target",
    "shard_range",
    "sharded_nontarget_lse_and_target",
    "sum_across_shards",
    "target_cosine",
    "triton_available",
]
