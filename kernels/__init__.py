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
from .sampling import check_sample_rate, sample_classes
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


# Deprecated names (not in __all__), kept until every caller uses ``lse_and_target``.
def nontarget_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale, *, backend="auto",
                             chunk_size=8192, class_start=0, process_group=None):
    """Deprecated: ``lse_and_target``."""
    return lse_and_target(emb_hat_BD, weight_CD, labels_B, scale, backend=backend,
                          chunk_size=chunk_size, class_start=class_start,
                          process_group=process_group)


def nontarget_lse(emb_hat_BD, weight_CD, labels_B, scale, **kwargs):
    """Deprecated: ``lse_and_target(...)[0]``."""
    return nontarget_lse_and_target(emb_hat_BD, weight_CD, labels_B, scale, **kwargs)[0]


def sharded_nontarget_lse_and_target(emb_hat_global_BD, weight_local_CD, labels_global_B, scale,
                                     *, process_group, backend="auto", chunk_size=8192,
                                     sample_rate=1.0, generator=None, class_start=None):
    """Deprecated: ``lse_and_target(..., class_start=..., process_group=...)`` (with
    ``sample_classes`` first for ``sample_rate < 1``)."""
    rate = check_sample_rate(sample_rate)
    if class_start is None:
        class_start = shard_start(weight_local_CD.shape[0], process_group,
                                  weight_local_CD.device)
    if rate < 1.0:
        index_S, local_labels_B = sample_classes(labels_global_B, class_start,
                                                 weight_local_CD.shape[0], rate, generator)
        weight_local_CD, labels_global_B, class_start = (
            weight_local_CD[index_S], local_labels_B, 0)
    return lse_and_target(emb_hat_global_BD, weight_local_CD, labels_global_B, scale,
                          backend=backend, chunk_size=chunk_size, class_start=class_start,
                          process_group=process_group)
