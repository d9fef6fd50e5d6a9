"""IJB pipeline on a miniature IJB-C tree against explicit loop implementations."""
import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

import unpg.eval.ijb as ijb
from unpg.config import EvalDataConfig
from unpg.data.align import align_face
from unpg.eval.ijb import (
    aggregate_templates,
    evaluate_ijb,
    identification_1n,
    pair_scores,
    template_rows,
)
from unpg.eval.ijb_meta import read_ijb_meta, read_template_subjects


def loop_templates(feats, templates, medias):
    """insightface's image2template_feature: per template, mean per media, sum, normalise."""
    out = {}
    for t in np.unique(templates):
        idx = np.where(templates == t)[0]
        media_feats = [feats[idx][medias[idx] == m].mean(0) for m in np.unique(medias[idx])]
        v = np.sum(media_feats, 0)
        out[t] = v / np.linalg.norm(v)
    return out


def seed_reading(labels, scores, fars):
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [tpr[min(zip(abs(fpr - f), range(len(fpr))))[1]] for f in fars]


def _cfg(tree, **kw):
    base = dict(benchmark="ijbc", root=str(tree.root), batch_size=8, flip="sum",
                normalize="insightface", score_weighting=True, variant="insightface",
                fars=[1e-3, 1e-2, 1e-1, 0.3], output_dir=str(tree.out))
    base.update(kw)
    return EvalDataConfig.from_dict(base)


def _read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_alignment_uses_the_shared_function_and_recovers_faces(ijb_tree):
    lmk = np.loadtxt(ijb_tree.root / "meta" / "ijbc_name_5pts_score.txt", dtype=str)
    names = [n for n, _, _ in ijb_tree.rows]
    for name in names[:6]:
        loose = _read_rgb(ijb_tree.root / "loose_crop" / name)
        row = lmk[lmk[:, 0] == name][0]
        crop = align_face(loose, row[1:11].astype(float).reshape(5, 2))

        def diff(other, crop=crop):
            return np.abs(crop[16:96, 16:96].astype(int) - other[16:96, 16:96]).mean()

        # Warping back with the file's landmarks recovers the face the loose crop came from
        # (up to two bilinear resamplings of its pixel noise), and not another subject's.
        assert diff(ijb_tree.canonical[name]) < 9.0
        assert diff(ijb_tree.canonical[names[-1]]) > 3 * diff(ijb_tree.canonical[name])


def test_image_features_are_aligned_crops(ijb_tree, tiny_model, embed_manually):
    meta = read_ijb_meta(ijb_tree.root, "ijbc")
    got = ijb.image_features(tiny_model, meta, variant="insightface", image_size=112,
                             batch_size=5, flip="sum", normalize="insightface", device="cpu",
                             progress=False)
    crops = [align_face(_read_rgb(ijb_tree.root / "loose_crop" / n), ijb_tree.landmarks[n])
             for n, _, _ in ijb_tree.rows]
    want = embed_manually(tiny_model, crops, flip="sum")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(meta.det_scores, [ijb_tree.det_scores[n] for n, _, _ in ijb_tree.rows],
                               rtol=1e-6)


def test_aggregation_matches_loops():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((400, 12)).astype(np.float32)
    templates = rng.integers(0, 30, 400) * 11 + 5
    medias = rng.integers(0, 25, 400)  # media ids shared across templates on purpose
    weights = rng.uniform(0.2, 1.0, 400)
    uniq, tf = aggregate_templates(feats, templates, medias, weights)
    want = loop_templates(feats.astype(np.float64) * weights[:, None], templates, medias)
    np.testing.assert_array_equal(uniq, sorted(want))
    np.testing.assert_allclose(tf, np.array([want[t] for t in uniq]), atol=2e-6)


@pytest.mark.parametrize("tile_rows,gemm_ratio", [(4, 1e9), (4, 1e-9), (512, 32.0)])
def test_pair_scores_both_paths_match_loop(tile_rows, gemm_ratio):
    rng = np.random.default_rng(1)
    f = rng.standard_normal((60, 8)).astype(np.float32)
    i1 = np.concatenate([rng.integers(0, 6, 300), rng.integers(0, 60, 40)])
    i2 = rng.integers(0, 60, 340)
    got = pair_scores(f, i1, i2, tile_rows=tile_rows, gemm_ratio=gemm_ratio, chunk=7)
    want = [float(np.dot(f[a].astype(np.float64), f[b])) for a, b in zip(i1, i2)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_template_rows_reports_unknown_ids():
    uniq = np.array([3, 8, 20])
    np.testing.assert_array_equal(template_rows(uniq, [20, 3, 8], "x"), [2, 0, 1])
    with pytest.raises(ValueError, match=r"pairs\.txt.*\[9\]"):
        template_rows(uniq, [3, 9], "pairs.txt")


def _expected_1v1(tree, model, embed_manually, weighting=True):
    crops = [align_face(_read_rgb(tree.root / "loose_crop" / n), tree.landmarks[n])
             for n, _, _ in tree.rows]
    feats = embed_manually(model, crops, flip="sum")
    if weighting:
        feats = feats * np.array([tree.det_scores[n] for n, _, _ in tree.rows])[:, None]
    templates = np.array([t for _, t, _ in tree.rows])
    medias = np.array([m for _, _, m in tree.rows])
    tfeat = loop_templates(feats, templates, medias)
    scores = np.array([np.dot(tfeat[a], tfeat[b]) for a, b, _ in tree.pairs])
    labels = np.array([lab for _, _, lab in tree.pairs])
    return tfeat, scores, labels


def test_evaluate_ijb_end_to_end_and_feature_cache(ijb_tree, tiny_model, embed_manually,
                                                   monkeypatch):
    cfg = _cfg(ijb_tree)
    res, curves = evaluate_ijb(tiny_model, cfg, device="cpu", weights_hash="0123abcd",
                               progress=False)
    tfeat, scores, labels = _expected_1v1(ijb_tree, tiny_model, embed_manually)
    v = res["verification_1v1"]
    np.testing.assert_allclose(list(v["tar_at_far"].values()), seed_reading(labels, scores, cfg.fars))
    assert v["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert (v["num_pairs"], v["num_genuine"]) == (len(labels), int(labels.sum()))
    assert res["num_templates"] == len(tfeat) and res["num_images"] == len(ijb_tree.rows)
    assert list(curves) == ["ijbc (insightface)"]

    cached = list((ijb_tree.out / "features").glob("*.npy"))
    assert [p.name for p in cached] == ["ijbc_insightface_sum_insightface_0123abcd.npy"]
    assert np.load(cached[0]).shape == (len(ijb_tree.rows), 16)

    def no_extraction(*a, **k):
        raise AssertionError("features extracted again despite the cache")

    monkeypatch.setattr(ijb, "image_features", no_extraction)
    again, _ = evaluate_ijb(tiny_model, cfg, device="cpu", weights_hash="0123abcd", progress=False)
    assert again["verification_1v1"] == v


def test_identification_1n_against_brute_force(ijb_tree, tiny_model, embed_manually):
    cfg = _cfg(ijb_tree, score_weighting=False)
    res, _ = evaluate_ijb(tiny_model, cfg, device="cpu", progress=False)
    tfeat, _, _ = _expected_1v1(ijb_tree, tiny_model, embed_manually, weighting=False)
    one_n = res["identification_1n"]
    assert set(one_n) == {"G1", "G2", "mean"}
    sub = {t: s + 1000 for t, s in ijb_tree.subject_of_template.items()}
    probes = sorted(set(sub) - set(ijb_tree.first.values()))
    for name, subjects in (("G1", (0, 1)), ("G2", (2, 3))):
        gallery = [ijb_tree.first[s] for s in subjects]
        ranks, top, mated_scores = [], [], []
        for p in probes:
            sims = {g: float(np.dot(tfeat[p], tfeat[g])) for g in gallery}
            top.append(max(sims.values()))
            mated = [g for g in gallery if sub[g] == sub[p]]
            if mated:
                ms = sims[mated[0]]
                ranks.append(1 + sum(s > ms for g, s in sims.items() if g != mated[0]))
                mated_scores.append(ms)
        nonmated_top = sorted((t for p, t in zip(probes, top)
                               if sub[p] not in {sub[g] for g in gallery}), reverse=True)
        assert one_n[name]["rank_1"] == pytest.approx(np.mean(np.array(ranks) <= 1))
        assert one_n[name]["rank_5"] == pytest.approx(np.mean(np.array(ranks) <= 5))
        for f in ("0.01", "0.1"):
            thr = nonmated_top[int(np.ceil(float(f) * len(nonmated_top))) - 1]
            want = np.mean([(r == 1) and (s > thr) for r, s in zip(ranks, mated_scores)])
            assert one_n[name]["tpir_at_fpir"][f] == pytest.approx(want)
        assert one_n[name]["num_mated_probes"] == len(ranks)
    assert one_n["mean"]["rank_1"] == pytest.approx((one_n["G1"]["rank_1"] + one_n["G2"]["rank_1"]) / 2)


def test_seed_variant_reads_the_prealigned_list_without_flip(ijb_tree, tiny_model, embed_manually):
    cfg = _cfg(ijb_tree, variant="seed", score_weighting=False, normalize="imagenet")
    res, _ = evaluate_ijb(tiny_model, cfg, device="cpu", progress=False)
    assert res["flip"] == "none" and res["variant"] == "seed"
    aligned = [_read_rgb(ijb_tree.root / "aligned" / n) for n, _, _ in ijb_tree.rows]
    feats = embed_manually(tiny_model, aligned, flip="none", normalize="imagenet")
    tfeat = loop_templates(feats, np.array([t for _, t, _ in ijb_tree.rows]),
                           np.array([m for _, _, m in ijb_tree.rows]))
    scores = [np.dot(tfeat[a], tfeat[b]) for a, b, _ in ijb_tree.pairs]
    labels = [lab for _, _, lab in ijb_tree.pairs]
    assert res["verification_1v1"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)


def test_identification_1n_requires_known_templates():
    uniq = np.array([1, 2])
    f = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="gallery G1"):
        identification_1n(uniq, f, [("G1", np.array([7]), np.array([1]))],
                          (np.array([1]), np.array([1])))


def test_meta_errors_name_the_file(ijb_tree):
    meta = ijb_tree.root / "meta"
    lines = (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="same images in the same order"):
        read_ijb_meta(ijb_tree.root, "ijbc")
    (meta / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(FileNotFoundError, match="ijbc_template_pair_label.txt"):
        read_ijb_meta(ijb_tree.root, "ijbc", with_landmarks=False)
    with pytest.raises(FileNotFoundError, match="IJB root"):
        read_ijb_meta(ijb_tree.root / "nope", "ijbc")


def test_1n_csv_reader(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n5,50,a.jpg,1\n5,50,b.jpg,2\n"
                 "3,30,c.jpg,3\n")
    tids, sids = read_template_subjects(p)
    assert tids.tolist() == [3, 5] and sids.tolist() == [30, 50]
    p.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,50,a.jpg\n5,51,b.jpg\n")
    with pytest.raises(ValueError, match="several subjects"):
        read_template_subjects(p)
