"""Face-verification and identification metrics, vectorised (one sort per curve, no pair loops).

1:1 verification
  * ``kfold_accuracy``: insightface's LFW protocol (10 contiguous folds, squared-L2 thresholds
    ``arange(0, 4, 0.01)``, first best training threshold applied to the held-out fold).
  * ``roc_curve`` / ``tar_at_far``: sklearn's ``roc_curve`` (``drop_intermediate=True``) read the
    way the official code and insightface's IJB scripts read it: flip the curve, take the point whose FPR
    is nearest the target (ties: the last such point, i.e. the largest TPR at that FPR).
  * ``best_threshold_accuracy``: the official code's single best threshold on cosine scores
    (``score >= t``, first best candidate in input order), from one sort instead of O(n^2).
  * ``roc_auc``, ``equal_error_rate``.
1:N identification (open set)
  * ``rank_k_accuracy`` and ``tpir_at_fpir``: probes whose identity is absent from the gallery
    are non-mated; FPIR counts non-mated probes whose best gallery score exceeds the threshold.

Legend: N pairs/probes, G gallery templates, D embedding dim, T thresholds, K folds.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = [
    "DEFAULT_FARS",
    "best_threshold_accuracy",
    "equal_error_rate",
    "far_below_resolution",
    "kfold_accuracy",
    "l2_normalize",
    "rank_k_accuracy",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "tpir_at_fpir",
    "verification_summary",
]

DEFAULT_FARS: Tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def l2_normalize(x_ND: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero, as sklearn's ``normalize``)."""
    x_ND = np.asarray(x_ND, dtype=dtype)
    if x_ND.ndim != 2:
        raise ValueError(f"expected a 2-D [N, D] array of embeddings, got shape {x_ND.shape}")
    norm_N1 = np.linalg.norm(x_ND, axis=1, keepdims=True)
    norm_N1[norm_N1 == 0] = 1.0
    return x_ND / norm_N1


def _labels(labels: Sequence, n: int, what: str = "labels") -> np.ndarray:
    y_N = np.asarray(labels)
    if y_N.ndim != 1 or len(y_N) != n:
        raise ValueError(f"{what} must be a 1-D array of {n} same/different flags, got shape {y_N.shape}")
    if y_N.dtype != bool:
        if not np.isin(y_N, (0, 1)).all():
            bad = np.unique(y_N[~np.isin(y_N, (0, 1))])[:5]
            raise ValueError(f"{what} must be 0/1 or bool, got values such as {bad.tolist()}")
        y_N = y_N.astype(bool)
    return y_N


def _scores(scores: Sequence) -> np.ndarray:
    s_N = np.asarray(scores)
    if s_N.ndim != 1:
        raise ValueError(f"scores must be a 1-D array, got shape {s_N.shape}")
    if not np.issubdtype(s_N.dtype, np.floating):
        s_N = s_N.astype(np.float64)
    if np.isnan(s_N).any():
        raise ValueError(f"scores contain {int(np.isnan(s_N).sum())} NaN values (non-finite embeddings?)")
    return s_N


# ----------------------------------------------------------------------------- 10-fold accuracy
def kfold_accuracy(emb1: np.ndarray, emb2: np.ndarray, issame: Sequence, n_folds: int = 10,
                   thresholds: np.ndarray | None = None) -> Tuple[float, float]:
    """insightface's k-fold verification accuracy: returns (mean, std) over the folds.

    Embeddings are L2-normalised here; the distance is the squared L2 distance; a pair is
    predicted "same" when ``dist < threshold``. Folds are contiguous and unshuffled (sklearn
    ``KFold(n_folds, shuffle=False)``: the first ``n % n_folds`` folds hold one extra pair).
    Per fold, the first threshold with the best accuracy on the other folds is applied to the
    held-out fold. Counts come from one sort per fold plus ``searchsorted`` over all thresholds.
    """
    e1_ND = l2_normalize(emb1)
    e2_ND = l2_normalize(emb2)
    if e1_ND.shape != e2_ND.shape:
        raise ValueError(f"emb1 {e1_ND.shape} and emb2 {e2_ND.shape} must have the same shape")
    n = len(e1_ND)
    same_N = _labels(issame, n, "issame")
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2 or n_folds > n:
        raise ValueError(f"n_folds must be an int in [2, number of pairs = {n}], got {n_folds!r}")
    thr_T = np.arange(0, 4, 0.01) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    dist_N = np.sum(np.square(e1_ND - e2_ND), axis=1)

    fold_sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    fold_sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(fold_sizes)])
    # Per fold: how many positive / negative pairs have dist < t, for every threshold t.
    pos_lt_KT = np.empty((n_folds, len(thr_T)), dtype=np.int64)
    neg_lt_KT = np.empty_like(pos_lt_KT)
    n_pos_K = np.empty(n_folds, dtype=np.int64)
    n_neg_K = np.empty(n_folds, dtype=np.int64)
    for k in range(n_folds):  # a loop over folds (10), not over pairs or thresholds
        d_n = dist_N[bounds[k]: bounds[k + 1]]
        s_n = same_N[bounds[k]: bounds[k + 1]]
        pos_lt_KT[k] = np.searchsorted(np.sort(d_n[s_n]), thr_T, side="left")
        neg_lt_KT[k] = np.searchsorted(np.sort(d_n[~s_n]), thr_T, side="left")
        n_pos_K[k] = s_n.sum()
        n_neg_K[k] = len(s_n) - n_pos_K[k]
    # Correct predictions on the training folds = all folds minus the held-out one.
    train_pos_lt_KT = pos_lt_KT.sum(0, keepdims=True) - pos_lt_KT
    train_neg_lt_KT = neg_lt_KT.sum(0, keepdims=True) - neg_lt_KT
    train_neg_K1 = (n_neg_K.sum() - n_neg_K)[:, None]
    correct_train_KT = train_pos_lt_KT + (train_neg_K1 - train_neg_lt_KT)
    best_K = np.argmax(correct_train_KT, axis=1)  # first best, as np.argmax over accuracies
    rows_K = np.arange(n_folds)
    correct_test_K = pos_lt_KT[rows_K, best_K] + n_neg_K - neg_lt_KT[rows_K, best_K]
    acc_K = correct_test_K / fold_sizes
    return float(np.mean(acc_K)), float(np.std(acc_K))


# ----------------------------------------------------------------------------- ROC family
def _sort_scores(scores: Sequence, labels: Sequence) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, bool labels, ascending argsort of the scores): the one sort every curve needs."""
    s_N = _scores(scores)
    y_N = _labels(labels, len(s_N))
    return s_N, y_N, np.argsort(s_N)


def _roc_from_sorted(s_asc: np.ndarray, y_asc: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_pos = int(y_asc.sum())
    if n_pos == 0 or n_pos == len(y_asc):
        raise ValueError(f"a ROC needs both genuine and impostor pairs; got {n_pos} genuine of "
                         f"{len(y_asc)}")
    s_desc, y_desc = s_asc[::-1], y_asc[::-1]  # views; order inside ties is irrelevant below
    # Last index of each run of equal scores = where the next score differs.
    thr_idx = np.flatnonzero(s_desc[1:] != s_desc[:-1])
    thr_idx = np.append(thr_idx, len(s_desc) - 1)
    tps = np.cumsum(y_desc, dtype=np.int64)[thr_idx]
    fps = 1 + thr_idx - tps
    thresholds = s_desc[thr_idx]
    if len(fps) > 2:
        keep = np.flatnonzero(np.concatenate(
            [[True], np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), [True]]))
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.concatenate([[0], fps])
    tps = np.concatenate([[0], tps])
    thresholds = np.concatenate([[np.inf], thresholds.astype(np.float64)])
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_curve(scores: Sequence, labels: Sequence) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) exactly as ``sklearn.metrics.roc_curve(labels, scores)``.

    One argsort of the scores and one cumulative sum; collinear points are dropped with
    sklearn's rule (``drop_intermediate=True``) and (0, 0) is prepended with threshold +inf.
    Higher scores mean "same". Needs at least one positive and one negative label.
    """
    s_N, y_N, order_N = _sort_scores(scores, labels)
    return _roc_from_sorted(s_N[order_N], y_N[order_N])


def _nearest_fpr_index(fpr: np.ndarray, far: float) -> int:
    """Index of the point nearest ``far``; ties go to the last one (the official code's flipud + min)."""
    flipped = np.abs(fpr[::-1] - far)
    return len(fpr) - 1 - int(np.argmin(flipped))


def tar_at_far(scores: Sequence, labels: Sequence, fars: Sequence[float] = DEFAULT_FARS,
               roc: Tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """TAR (as a fraction) at the ROC point whose FPR is nearest each target FAR.

    Reads the curve as insightface's IJB scripts and the official code do (``roc_curve``, flip,
    ``argmin |fpr - far|``). Pass ``roc`` (from ``roc_curve``) to reuse an existing curve.
    """
    fpr, tpr, _ = roc_curve(scores, labels) if roc is None else roc
    fars = np.atleast_1d(np.asarray(fars, dtype=np.float64))
    return np.array([tpr[_nearest_fpr_index(fpr, far)] for far in fars])


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids, as ``sklearn.metrics.auc``)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The rate where FPR = FNR = 1 - TPR, linearly interpolated between ROC points."""
    gap = fpr - (1.0 - tpr)  # rises from -1 at (0, 0) to +1 at (1, 1)
    i = int(np.searchsorted(gap, 0.0, side="left"))
    if i == 0:
        return float(fpr[0])
    g0, g1 = gap[i - 1], gap[i]
    w = 0.0 if g1 == g0 else -g0 / (g1 - g0)
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def _best_threshold_from_sorted(s_N: np.ndarray, order_N: np.ndarray, s_asc: np.ndarray,
                                y_asc: np.ndarray) -> Tuple[float, float]:
    n = len(s_asc)
    # Candidate s (a score value) predicts "same" for scores >= s: everything from the first
    # sorted position holding s onwards.
    start = np.concatenate([[True], s_asc[1:] != s_asc[:-1]])
    first_asc = np.flatnonzero(start)[np.cumsum(start) - 1]
    pos_before = np.concatenate([[0], np.cumsum(y_asc, dtype=np.int64)])
    n_pos = int(pos_before[-1])
    pos_ge = n_pos - pos_before[first_asc]
    neg_ge = (n - first_asc) - pos_ge
    correct_asc = pos_ge + (n - n_pos - neg_ge)
    best = int(correct_asc.max())
    first_input = int(order_N[correct_asc == best].min())  # the official code keeps the first best
    return best / n, float(s_N[first_input])


def best_threshold_accuracy(scores: Sequence, labels: Sequence) -> Tuple[float, float]:
    """The official code's accuracy at its single best threshold: returns (accuracy, threshold).

    Candidates are the scores themselves; "same" when ``score >= threshold``; the official code keeps the
    first candidate (in input order) that strictly improves, i.e. the first best one. One sort.
    """
    s_N, y_N, order_N = _sort_scores(scores, labels)
    return _best_threshold_from_sorted(s_N, order_N, s_N[order_N], y_N[order_N])


def far_below_resolution(fars: Sequence[float], num_impostor: int) -> List[str]:
    """The FAR keys (``f"{far:g}"``) finer than 1 / ``num_impostor``: not measurable on these pairs."""
    return [f"{far:g}" for far in fars if far * max(num_impostor, 0) < 1]


def verification_summary(scores: Sequence, labels: Sequence, fars: Sequence[float] = DEFAULT_FARS
                         ) -> Tuple[Dict[str, object], Tuple[np.ndarray, np.ndarray]]:
    """Every 1:1 number from one ROC, and the curve itself for plotting.

    Returns ``({"tar_at_far": {"1e-06": tar, ...}, "auc", "eer", "best_threshold_accuracy",
    "best_threshold", "num_pairs", "num_genuine", "num_impostor", "far_below_resolution"},
    (fpr, tpr))``. ``far_below_resolution`` lists the FAR keys finer than 1 / num_impostor: with
    fewer impostor pairs than 1/FAR, no threshold gives that FAR, and the TAR reported there is
    the TAR at the smallest FAR measurable (0 impostors accepted), not at the FAR asked for.
    """
    s_N, y_N, order_N = _sort_scores(scores, labels)
    s_asc, y_asc = s_N[order_N], y_N[order_N]
    roc = _roc_from_sorted(s_asc, y_asc)
    fpr, tpr, _ = roc
    acc, thr = _best_threshold_from_sorted(s_N, order_N, s_asc, y_asc)
    del s_asc, y_asc, order_N
    tars = tar_at_far(None, None, fars, roc=roc)
    summary: Dict[str, object] = {
        "tar_at_far": {f"{far:g}": float(t) for far, t in zip(fars, tars)},
        "auc": roc_auc(fpr, tpr),
        "eer": equal_error_rate(fpr, tpr),
        "best_threshold_accuracy": acc,
        "best_threshold": thr,
        "num_pairs": int(len(y_N)),
        "num_genuine": int(y_N.sum()),
        "num_impostor": int(len(y_N) - y_N.sum()),
        "far_below_resolution": far_below_resolution(fars, int(len(y_N) - y_N.sum())),
    }
    return summary, (fpr, tpr)


# ----------------------------------------------------------------------------- 1:N
def _identification(probe_feats: np.ndarray, gallery_feats: np.ndarray, probe_ids: Sequence,
                    gallery_ids: Sequence, block: int = 4096
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per probe: (mated?, rank of its best mated gallery entry, that score, best score overall).

    Cosine scores on L2-normalised features, computed in probe blocks of ``block`` rows. The
    rank is 1 + the number of non-mated gallery entries scoring strictly higher (ties favour
    the mated entry). Non-mated probes get rank = inf and mated score = -inf.
    """
    p_ND = l2_normalize(probe_feats, np.float32)
    g_GD = l2_normalize(gallery_feats, np.float32)
    if p_ND.shape[1] != g_GD.shape[1]:
        raise ValueError(f"probe features are {p_ND.shape[1]}-d but gallery features are "
                         f"{g_GD.shape[1]}-d")
    pid_N = np.asarray(probe_ids)
    gid_G = np.asarray(gallery_ids)
    if pid_N.shape != (len(p_ND),) or gid_G.shape != (len(g_GD),):
        raise ValueError(f"need one id per probe ({len(p_ND)}) and per gallery entry "
                         f"({len(g_GD)}), got {pid_N.shape} and {gid_G.shape}")
    n = len(p_ND)
    mated_N = np.isin(pid_N, gid_G)
    rank_N = np.full(n, np.inf)
    mated_score_N = np.full(n, -np.inf, dtype=np.float32)
    top_N = np.empty(n, dtype=np.float32)
    for a in range(0, n, block):  # blocks bound the [block, G] score matrix in memory
        b = min(a + block, n)
        sim_BG = p_ND[a:b] @ g_GD.T
        same_BG = pid_N[a:b, None] == gid_G[None, :]
        top_N[a:b] = sim_BG.max(axis=1)
        mated_B = np.where(same_BG, sim_BG, -np.inf).max(axis=1)
        higher_B = ((sim_BG > mated_B[:, None]) & ~same_BG).sum(axis=1)
        has_B = mated_N[a:b]
        rank_N[a:b][has_B] = 1 + higher_B[has_B]
        mated_score_N[a:b] = mated_B
    return mated_N, rank_N, mated_score_N, top_N


def rank_k_accuracy(probe_feats: np.ndarray, gallery_feats: np.ndarray, probe_ids: Sequence,
                    gallery_ids: Sequence, ks: Sequence[int] = (1, 5, 10)) -> Dict[int, float]:
    """Closed-set identification rate at ranks ``ks`` over the mated probes (CMC points)."""
    mated_N, rank_N, _, _ = _identification(probe_feats, gallery_feats, probe_ids, gallery_ids)
    if not mated_N.any():
        raise ValueError("no probe identity appears in the gallery: rank-k accuracy is undefined")
    ranks = rank_N[mated_N]
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def tpir_at_fpir(probe_feats: np.ndarray, gallery_feats: np.ndarray, probe_ids: Sequence,
                 gallery_ids: Sequence, fpirs: Sequence[float] = (1e-2, 1e-1),
                 rank: int = 1) -> np.ndarray:
    """Open-set TPIR at each FPIR: probes whose identity is not in the gallery are non-mated.

    For FPIR f the threshold is the ``ceil(f * N_nonmated)``-th largest best-gallery score of
    the non-mated probes (insightface's top-k reading); a mated probe counts as identified when
    its mated entry is within ``rank`` and scores strictly above the threshold, so at most
    ``ceil(f * N) - 1`` non-mated probes score above it.
    """
    mated_N, rank_N, mated_score_N, top_N = _identification(
        probe_feats, gallery_feats, probe_ids, gallery_ids)
    if not mated_N.any():
        raise ValueError("no probe identity appears in the gallery: TPIR is undefined")
    nonmated_top = np.sort(top_N[~mated_N])[::-1]
    if len(nonmated_top) == 0:
        raise ValueError("every probe identity is in the gallery: open-set FPIR needs "
                         "non-mated probes (identities absent from the gallery)")
    hit_M = rank_N[mated_N] <= rank
    score_M = mated_score_N[mated_N]
    out = []
    for f in fpirs:
        if not 0 < f <= 1:
            raise ValueError(f"FPIR targets must be in (0, 1], got {f}")
        k = max(1, math.ceil(f * len(nonmated_top)))
        thr = nonmated_top[k - 1]
        out.append(float(np.mean(hit_M & (score_M > thr))))
    return np.array(out)
