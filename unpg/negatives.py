"""UNPG in-batch negative pairs: box-and-whisker filter and their shared log-sum-exp ``U``.

The official code (github jung-jun-uk/UNPG, ``recognition/models/build.py``) takes the strict upper
triangle of ``S = X̂X̂ᵀ`` where labels differ (``convert_label_to_similarity``), sorts it
ascending, reads ``Q1 = sorted[int(0.25·l)]`` and ``Q3 = sorted[int(0.75·l)]`` (index based, no
interpolation; ``int(0.25·l) == l // 4`` and ``int(0.75·l) == (3·l) // 4`` exactly for integer
``l``), and keeps ``sorted <= Q3 + wisk·IQR`` and ``sorted >= Q1 − wisk·IQR`` (closed interval,
selected with a boolean mask, so no gradient flows through the bounds). The kept set is
concatenated onto every row of the logits; since it is the same for every row, its whole
contribution to each softmax denominator is the scalar ``U = logsumexp(s·kept)``.

Everything here runs without a host sync (no ``.item()``, no data-dependent shapes): fixed-size
upper-triangle values, same-label pairs pushed to +inf so they sort last, tensor indices for the
quartiles and a keep-mask. With nothing kept (batch of one, all labels equal) ``U = −inf`` and all
gradients are exactly zero.

The statistics also carry ``neg_hist``: the in-batch negatives' cosine similarities counted in
``HIST_BINS`` fixed bins over ``[-1, 1]`` (``index_add_`` of a 0/1 weight, so the shape never
depends on the data and no host sync is needed). The training logs sum it over a logging window
and draw it as TensorBoard's histogram (``unpg.logging_utils``).

# B: batch, D: embedding dim, P: B·(B−1)/2 upper-triangle pairs
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Dict, Tuple

import torch

__all__ = ["HIST_BINS", "HIST_RANGE", "check_wisk", "hist_edges", "negative_histogram",
           "unpg_logsumexp"]

HIST_BINS = 64  # bins of width 1/32 over [-1, 1]: fine enough to see the kept interval move
HIST_RANGE = (-1.0, 1.0)


def hist_edges(bins: int = HIST_BINS) -> list:
    """The ``bins + 1`` bin edges of ``neg_hist`` (equal widths over ``HIST_RANGE``)."""
    lo, hi = HIST_RANGE
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def check_wisk(wisk) -> float:
    """Validate the whisker factor: a finite number >= 0 (seed default 1.5; 1.0 for K-FACE)."""
    if isinstance(wisk, bool) or not isinstance(wisk, Real) or not math.isfinite(float(wisk)):
        raise ValueError(f"unpg wisk must be a finite number >= 0, got {wisk!r}")
    if wisk < 0:
        raise ValueError(f"unpg wisk must be >= 0 (it scales the IQR), got {wisk!r}")
    return float(wisk)


def _masked_logsumexp(logits_P: torch.Tensor, keep_P: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits_P[keep_P])`` without indexing; −inf with zero gradient when empty.

    ``torch.logsumexp`` over all −inf returns −inf but its backward evaluates
    ``exp(−inf − (−inf)) = NaN``; here every branch that could see that is behind a
    ``torch.where`` whose other side is finite, so the gradient is exactly 0.
    """
    any_kept = keep_P.any()
    masked_P = torch.where(keep_P, logits_P, torch.full_like(logits_P, -math.inf))
    peak = masked_P.detach().amax() if masked_P.numel() else masked_P.new_full((), -math.inf)
    peak = torch.where(any_kept, peak, torch.zeros_like(peak))
    total = torch.exp(masked_P - peak).sum()
    total = torch.where(any_kept, total, torch.ones_like(total))  # log(1) = 0 on the dead branch
    return torch.where(any_kept, peak + torch.log(total), torch.full_like(total, -math.inf))


def negative_histogram(sim_P: torch.Tensor, neg_P: torch.Tensor, bins: int = HIST_BINS
                       ) -> torch.Tensor:
    """Counts (int64 ``[bins]``) of ``sim_P[neg_P]`` in equal bins over ``[-1, 1]``.

    Bins are half-open ``[a, b)`` except the last, ``[a, 1]``, as ``numpy.histogram``; values a
    rounding error outside ``[-1, 1]`` land in the end bins; NaN similarities (a non-finite
    step, which training skips) are not counted. Sync-free: every pair is added with weight 0
    or 1 instead of selecting the negatives.
    """
    lo, hi = HIST_RANGE
    sim_P = sim_P.detach().to(torch.promote_types(sim_P.dtype, torch.float32))
    # NaN would cast to an out-of-range index: park it in bin 0 with weight 0.
    scaled_P = torch.nan_to_num((sim_P - lo) * (bins / (hi - lo)), nan=0.0)
    bin_P = scaled_P.floor().clamp_(0, bins - 1).to(torch.int64)
    weight_P = (neg_P & ~torch.isnan(sim_P)).to(torch.int64)
    counts = torch.zeros(bins, dtype=torch.int64, device=sim_P.device)
    return counts.index_add_(0, bin_P, weight_P)


def unpg_logsumexp(
    emb_hat_BD: torch.Tensor, labels_B: torch.Tensor, s: float, wisk: float
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """UNPG's shared extra denominator term ``U = logsumexp(s·S')`` and filter statistics.

    Args:
        emb_hat_BD: L2-normalised embeddings (the global batch under DDP), float32/float64.
        labels_B: integer labels.
        s: logit scale of the head.
        wisk: whisker factor of the box-and-whisker filter (>= 0).

    Returns:
        ``(U, stats)``: ``U`` a 0-dim tensor (−inf when no negative is kept), differentiable
        through the kept similarities. ``stats`` holds detached 0-dim tensors:
        ``num_negatives`` (l, int64), ``num_kept`` (int64), ``q1``, ``q3``, ``lower``,
        ``upper`` (NaN when l = 0), ``min``, ``max`` of the kept similarities (NaN when
        nothing is kept), and ``neg_hist`` (int64 ``[HIST_BINS]``, ``negative_histogram`` of
        every negative, kept or not). Reading them for logs is the caller's (one) host sync.
    """
    if emb_hat_BD.dim() != 2:
        raise ValueError(f"emb_hat_BD must be [B, D], got shape {tuple(emb_hat_BD.shape)}")
    if labels_B.shape != emb_hat_BD.shape[:1]:
        raise ValueError(
            f"labels_B must be [B] = [{emb_hat_BD.shape[0]}], got shape {tuple(labels_B.shape)}"
        )
    wisk = check_wisk(wisk)
    batch = emb_hat_BD.shape[0]
    device, dtype = emb_hat_BD.device, emb_hat_BD.dtype

    # Fixed-size strict upper triangle (shape depends on B only, so no sync).
    rows_P, cols_P = torch.triu_indices(batch, batch, offset=1, device=device)
    sim_BB = emb_hat_BD @ emb_hat_BD.transpose(0, 1)
    # index_select rather than advanced indexing: its backward is index_add_ (sync-free on CUDA).
    sim_P = sim_BB.reshape(-1).index_select(0, rows_P * batch + cols_P)
    neg_P = labels_B.index_select(0, rows_P) != labels_B.index_select(0, cols_P)
    num_neg = neg_P.sum()

    # Same-label pairs sort last (+inf); one +inf pad makes index l // 4 valid even for P = 0.
    inf = torch.full((1,), math.inf, dtype=dtype, device=device)
    keyed_P = torch.where(neg_P, sim_P.detach(), inf)
    sorted_P1 = torch.cat([torch.sort(keyed_P).values, inf])
    # index_select with a tensor index: indexing with a 0-dim tensor would unpack it on the host.
    quart_idx = torch.stack([num_neg // 4, (3 * num_neg) // 4])
    q1, q3 = sorted_P1.index_select(0, quart_idx).unbind(0)
    # Same arithmetic as the official code, so the bounds agree bit for bit.
    iqr = q3 - q1
    lower = q1 - wisk * iqr
    upper = q3 + wisk * iqr
    keep_P = neg_P & (sim_P.detach() >= lower) & (sim_P.detach() <= upper)

    u = _masked_logsumexp(s * sim_P, keep_P)

    with torch.no_grad():
        nan = torch.full((), math.nan, dtype=dtype, device=device)
        has_neg = num_neg > 0
        any_kept = keep_P.any()
        kept_vals_P = sim_P.detach()
        kept_min = torch.where(keep_P, kept_vals_P, inf).amin() if sim_P.numel() else nan
        kept_max = torch.where(keep_P, kept_vals_P, -inf).amax() if sim_P.numel() else nan
        stats = {
            "num_negatives": num_neg,
            "num_kept": keep_P.sum(),
            "q1": torch.where(has_neg, q1, nan),
            "q3": torch.where(has_neg, q3, nan),
            "lower": torch.where(has_neg, lower, nan),
            "upper": torch.where(has_neg, upper, nan),
            "min": torch.where(any_kept, kept_min, nan),
            "max": torch.where(any_kept, kept_max, nan),
            "neg_hist": negative_histogram(sim_P, neg_P),
        }
    return u, stats
