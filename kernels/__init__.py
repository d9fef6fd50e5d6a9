"""Margin-softmax compute: the non-target log-sum-exp ``ell_B`` and the target cosine.

``ell_i = log sum_{j != y_i} exp(s * x_hat_i . w_j / |w_j|)`` is margin-agnostic: the caller
adds the target logit ``s * psi_i``, the UNPG scalar ``U`` and takes ``logsumexp`` on
length-B vectors. One entry, ``lse_and_target``; two layers below it: ``local.py`` (one shard,
no collectives; backends torch / chunked / triton) and ``sharded.py`` (class-sharded weight,
collectives around the local call). Nothing here imports triton until the Triton backend runs.
"""
from .api import lse_and_target
from .local import BACKENDS, resolve_backend, triton_available
from .partial_fc import PartialFC
from .precision import PRECISIONS, resolve_precision
from .reference import nontarget_lse_reference, reference_lse_and_target
from .sampling import sample_classes
from .sharded import (
    all_gather_rows,
    copy_to_shards,
    group_rank_size,
    lse_across_shards,
    shard_range,
    shard_start,
    sum_across_shards,
)
from .target import target_cosine

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "PartialFC",
    "all_gather_rows",
    "copy_to_shards",
    "group_rank_size",
    "lse_across_shards",
    "lse_and_target",
    "nontarget_lse_reference",
    "reference_lse_and_target",
    "resolve_backend",
    "resolve_precision",
    "sample_classes",
    "shard_range",
    "shard_start",
    "sum_across_shards",
    "target_cosine",
    "triton_available",
]

