"""unpg.eval.metrics against straightforward loop implementations and sklearn."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

from unpg.eval.metrics import (
    best_threshold_accuracy,
    equal_error_rate,
    kfold_accuracy,
    rank_k_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    tpir_at_fpir,
    verification_summary,
)


def insightface_kfold_reference(emb1, emb2, issame, n_folds=10):
    """insightface's calculate_roc accuracy, written as plain loops over folds and thresholds."""
    e1 = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    e2 = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    dist = np.sum(np.square(e1 - e2), 1)
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(dist))):
        train_acc = []
        for t in thresholds:
            pred = dist[train] < t
            train_acc.append(float(np.sum(pred == issame[train])) / len(train))
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(float(np.sum((dist[test] < best) == issame[test])) / len(test))
    return np.mean(accs), np.std(accs)


def seed_tar_reference(labels, scores, fars):
    """The official code's / insightface's reading: sklearn roc_curve, flipud, min over (|fpr-far|, i)."""
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = []
    for far in fars:
        _, i = min(zip(abs(fpr - far), range(len(fpr))))
        out.append(tpr[i])
    return np.array(out)


def _pairs(rng, n, dim=32, noise=1.0):
    same = rng.random(n) < 0.5
    e1 = rng.standard_normal((n, dim))
    e2 = np.where(same[:, None], e1 + noise * rng.standard_normal((n, dim)),
                  rng.standard_normal((n, dim)))
    return e1, e2, same


@pytest.mark.parametrize("n,noise,seed", [(600, 1.0, 0), (1237, 1.5, 1), (95, 0.7, 2)])
def test_kfold_matches_insightface_loops(n, noise, seed):
    e1, e2, same = _pairs(np.random.default_rng(seed), n, noise=noise)
    got = kfold_accuracy(e1, e2, same)
    want = insightface_kfold_reference(e1, e2, same)
    assert got[0] == pytest.approx(want[0], abs=1e-12)
    assert got[1] == pytest.approx(want[1], abs=1e-12)


def test_kfold_normalises_inside_and_other_fold_counts():
    e1, e2, same = _pairs(np.random.default_rng(3), 301, noise=1.2)
    scaled = kfold_accuracy(e1 * 7.0, e2 * 0.1, same, n_folds=5)
    assert scaled == pytest.approx(insightface_kfold_reference(e1, e2, same, n_folds=5), abs=1e-12)


def test_kfold_rejects_bad_input():
    e1, e2, same = _pairs(np.random.default_rng(5), 20)
    with pytest.raises(ValueError, match="n_folds"):
        kfold_accuracy(e1, e2, same, n_folds=50)
    with pytest.raises(ValueError, match="issame"):
        kfold_accuracy(e1, e2, same[:-1])
    with pytest.raises(ValueError, match="same shape"):
        kfold_accuracy(e1, e2[:, :5], same)


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_roc_curve_equals_sklearn(decimals):
    rng = np.random.default_rng(6)
    y = rng.random(4000) < 0.2
    s = rng.standard_normal(4000) + 1.3 * y
    if decimals is not None:  # many tied scores
        s = np.round(s, decimals)
    fpr, tpr, thr = roc_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert roc_auc(fpr, tpr) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_tar_at_far_reads_the_curve_like_the_seed(seed):
    rng = np.random.default_rng(seed)
    n = 20000
    y = rng.random(n) < 0.05
    s = np.round(rng.standard_normal(n) + 2.0 * y, 3).astype(np.float32)
    fars = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.5]
    np.testing.assert_array_equal(tar_at_far(s, y, fars), seed_tar_reference(y, s, fars))


def test_best_threshold_accuracy_matches_the_seed_loop():
    rng = np.random.default_rng(8)
    y = rng.random(700) < 0.5
    s = np.round(rng.standard_normal(700) + y, 2)
    best_acc, best_th = 0.0, 0.0
    for th in s:  # the official code's torch_cal_accuracy, in numpy
        acc = np.mean((s >= th) == y)
        if acc > best_acc:
            best_acc, best_th = acc, th
    assert best_threshold_accuracy(s, y) == (best_acc, best_th)


def test_eer_and_summary_on_a_hand_case():
    # genuine 4, 3, 1 and impostor 2, 0, -1: at threshold 2, FPR = 1/3 and FNR = 1/3.
    s = np.array([4, 3, 1, 2, 0, -1], dtype=float)
    y = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    fpr, tpr, _ = roc_curve(s, y)
    assert equal_error_rate(fpr, tpr) == pytest.approx(1 / 3)
    summary, (sfpr, stpr) = verification_summary(s, y, fars=[0.34])
    # Two ROC points sit at FPR 1/3, (1/3, 2/3) and (1/3, 1): the official code's reading takes the
    # larger TPR.
    assert summary["tar_at_far"] == {"0.34": 1.0}
    assert seed_tar_reference(y, s, [0.34])[0] == 1.0
    assert summary["auc"] == pytest.approx(roc_auc_score(y, s))
    assert summary["best_threshold_accuracy"] == pytest.approx(5 / 6)
    assert (summary["num_pairs"], summary["num_genuine"]) == (6, 3)
    np.testing.assert_array_equal(sfpr, fpr)


def test_roc_needs_both_classes_and_finite_scores():
    with pytest.raises(ValueError, match="genuine"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_curve([0.1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        roc_curve([0.1, 0.2], [1, 2])


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def test_identification_hand_case():
    gallery = np.eye(3)  # subjects 10, 20, 30
    g_ids = [10, 20, 30]
    probes = np.array([
        [0.9, 0.1, 0.0],   # 10: rank 1, score 0.994
        [0.2, 0.5, 0.8],   # 20: subject 30 scores higher → rank 2
        [0.1, 0.3, 0.95],  # 30: rank 1, score 0.9488
        [0.3, 0.0, 0.99],  # 40 (non-mated): best score 0.957
        [0.0, 0.2, 0.3],   # 50 (non-mated): best score 0.832
    ])
    p_ids = [10, 20, 30, 40, 50]
    ranks = rank_k_accuracy(probes, gallery, p_ids, g_ids, ks=(1, 2, 5))
    assert ranks == {1: pytest.approx(2 / 3), 2: 1.0, 5: 1.0}
    # FPIR 0.5 → 1st largest non-mated score (0.957): only the first probe passes.
    # FPIR 1.0 → 2nd largest (0.832): the first and third probes pass.
    tpir = tpir_at_fpir(probes, gallery, p_ids, g_ids, fpirs=(0.5, 1.0))
    np.testing.assert_allclose(tpir, [1 / 3, 2 / 3])
    assert _unit(probes[2])[2] < _unit(probes[3])[2]  # the case is what the comments say


def test_identification_against_brute_force():
    rng = np.random.default_rng(9)
    g = rng.standard_normal((12, 8))
    g_ids = np.arange(12) + 100
    p_ids = rng.integers(100, 118, 60)  # ids 112..117 are not in the gallery
    p = np.where((p_ids < 112)[:, None], g[np.minimum(p_ids - 100, 11)], 0) \
        + 1.3 * rng.standard_normal((60, 8))
    gn, pn = g / np.linalg.norm(g, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
    ranks, top, mated_score = [], [], []
    for i in range(60):
        sims = gn @ pn[i]
        top.append(sims.max())
        if p_ids[i] in g_ids:
            j = list(g_ids).index(p_ids[i])
            ranks.append(1 + sum(sims[k] > sims[j] for k in range(12) if k != j))
            mated_score.append(sims[j])
    ranks = np.array(ranks)
    got = rank_k_accuracy(p, g, p_ids, g_ids, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(np.mean(ranks <= k))
    nonmated = sorted((top[i] for i in range(60) if p_ids[i] not in g_ids), reverse=True)
    for f in (0.1, 0.3):
        thr = nonmated[math.ceil(f * len(nonmated)) - 1]
        want = np.mean([(r == 1) and (s > thr) for r, s in zip(ranks, mated_score)])
        assert tpir_at_fpir(p, g, p_ids, g_ids, fpirs=(f,))[0] == pytest.approx(want, abs=1e-6)


def test_identification_errors():
    g = np.eye(2)
    with pytest.raises(ValueError, match="non-mated"):
        tpir_at_fpir(g, g, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="no probe identity"):
        rank_k_accuracy(g, g, [3, 4], [1, 2])
