"""K-FACE pair parsing and evaluation on a miniature aligned tree."""
import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc_curve

from unpg.config import EvalDataConfig
from unpg.eval.kface import evaluate_kface, parse_pair_file


def test_parse_pair_file(tmp_path):
    p = tmp_path / "kface.Q1.txt"
    p.write_text("19082641/S001/L1/E01/C4.jpg 19082641/S001/L1/E01/C10.jpg 1\n\n"
                 "19082641/S001/L1/E01/C4.jpg 19090641/S001/L1/E01/C5.jpg 0\n")
    left, right, labels = parse_pair_file(p)
    assert left == ["19082641/S001/L1/E01/C4.jpg", "19082641/S001/L1/E01/C4.jpg"]
    assert right == ["19082641/S001/L1/E01/C10.jpg", "19090641/S001/L1/E01/C5.jpg"]
    assert labels.tolist() == [True, False]


@pytest.mark.parametrize("line,match", [
    ("a.jpg b.jpg 2", ":1: expected"),
    ("a.jpg b.jpg", ":1: expected"),
    ("/abs/a.jpg b.jpg 1", "relative"),
    ("../a.jpg b.jpg 1", "relative"),
])
def test_parse_pair_file_errors(tmp_path, line, match):
    p = tmp_path / "q.txt"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        parse_pair_file(p)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        parse_pair_file(tmp_path / "missing.txt")


def test_evaluate_kface_matches_manual(tmp_path, tiny_model, embed_manually):
    rng = np.random.default_rng(3)
    root = tmp_path / "kface"
    ids = ["19062421", "19070541", "19082641"]
    paths = []
    for k, pid in enumerate(ids):
        base = cv2.resize(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8), (112, 112))
        for cam in (4, 5, 6):
            rel = f"{pid}/S001/L1/E01/C{cam}.jpg"
            img = np.clip(base.astype(int) + rng.integers(-30, 31, base.shape) * (k + 1), 0, 255)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / rel), img.astype(np.uint8))
            paths.append(rel)
    pairs = {
        "kface.Q1.txt": [(paths[0], paths[1], 1), (paths[3], paths[4], 1), (paths[0], paths[3], 0),
                         (paths[1], paths[7], 0), (paths[6], paths[8], 1)],
        "kface.Q2.txt": [(paths[2], paths[5], 0), (paths[4], paths[5], 1), (paths[7], paths[8], 1),
                         (paths[0], paths[8], 0)],
    }
    for name, rows in pairs.items():
        (root / name).write_text("".join(f"{a} {b} {lab}\n" for a, b, lab in rows))
    cfg = EvalDataConfig.from_dict(dict(benchmark="kface", root=str(root), pairs=list(pairs),
                                        batch_size=4, flip="concat", normalize="imagenet",
                                        fars=[0.1, 0.5], output_dir=str(tmp_path / "out")))
    res, curves = evaluate_kface(tiny_model, cfg, device="cpu", progress=False)
    assert res["num_images"] == 9 and list(curves) == ["kface.Q1", "kface.Q2"]
    for name, rows in pairs.items():
        imgs = {p: cv2.cvtColor(cv2.imread(str(root / p)), cv2.COLOR_BGR2RGB) for p in paths}
        f = {p: v / np.linalg.norm(v) for p, v in
             zip(paths, embed_manually(tiny_model, [imgs[p] for p in paths], "concat", "imagenet"))}
        scores = np.array([np.dot(f[a], f[b]) for a, b, _ in rows])
        labels = np.array([lab for _, _, lab in rows])
        fpr, tpr, _ = sk_roc_curve(labels, scores)
        fpr, tpr = np.flipud(fpr), np.flipud(tpr)
        want = [tpr[min(zip(abs(fpr - far), range(len(fpr))))[1]] for far in cfg.fars]
        got = res["pair_files"][name[:-4]]
        np.testing.assert_allclose(list(got["tar_at_far"].values()), want)
        assert got["num_pairs"] == len(rows)


def test_evaluate_kface_missing_image(tmp_path, tiny_model):
    root = tmp_path / "kface"
    root.mkdir()
    (root / "q.txt").write_text("1/S001/L1/E01/C4.jpg 1/S001/L1/E01/C5.jpg 1\n")
    cfg = EvalDataConfig.from_dict(dict(benchmark="kface", root=str(root), pairs=["q.txt"]))
    with pytest.raises(FileNotFoundError, match="C4.jpg"):
        evaluate_kface(tiny_model, cfg, device="cpu", progress=False)


def test_kface_table_prints_four_decimals():
    from unpg.evaluate import format_results

    summary = {"tar_at_far": {"0.001": 0.123456, "0.1": 0.5}, "auc": 0.9, "eer": 0.1,
               "best_threshold_accuracy": 0.8}
    (table,) = format_results({"benchmark": "kface", "pair_files": {"kface.Q1": summary}},
                              [1e-3, 1e-1])
    assert "12.3456" in table and "50.0000" in table and "kface.Q1" in table
