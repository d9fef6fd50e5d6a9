"""The negative-pair view: UNPG's histogram of in-batch negative similarities, its logging
(metrics.jsonl + TensorBoard) and ``python -m unpg.tools.plot_negatives``."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unpg.config import load_config
from unpg.data.synthetic import ensure_dataset
from unpg.distributed import teardown_distributed
from unpg.logging_utils import HIST_KEY, HIST_TAG, MetricsSink, WindowMeter
from unpg.losses import margin_softmax_loss
from unpg.negatives import HIST_BINS, hist_edges, unpg_logsumexp
from unpg.tools import plot_negatives
from unpg.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def numpy_negative_hist(emb, labels, bins=HIST_BINS):
    """Independent: cosines of every i < j pair with different labels, numpy.histogram."""
    x = np.asarray(emb, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.asarray(labels)
    i, j = np.triu_indices(len(x), k=1)
    neg = y[i] != y[j]
    sims = np.sum(x[i[neg]] * x[j[neg]], axis=1)
    return np.histogram(sims, bins=bins, range=(-1.0, 1.0))[0]


def batch(B=40, D=12, classes=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (B,), generator=g)
    centres = torch.randn(classes, D, generator=g, dtype=dtype)
    emb = centres[labels] + 0.8 * torch.randn(B, D, generator=g, dtype=dtype)
    return emb, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_histogram_matches_numpy(dtype):
    emb, labels = batch(dtype=dtype, seed=3)
    _, stats = unpg_logsumexp(F.normalize(emb), labels, 32.0, 1.5)
    ref = numpy_negative_hist(emb.double(), labels)
    assert stats["neg_hist"].dtype == torch.int64 and stats["neg_hist"].shape == (HIST_BINS,)
    np.testing.assert_array_equal(stats["neg_hist"].numpy(), ref)
    assert int(stats["neg_hist"].sum()) == int(stats["num_negatives"]) == ref.sum() > 0


def test_histogram_counts_every_negative_kept_or_not_and_edges():
    # Exact cosines: -1 (first bin), 0 (the edge between bins 31 and 32: numpy's [a, b) puts
    # it in 32), +1 (the last bin, closed at 1); the same-label pair (0, 1) is not counted.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                       dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 3])
    _, stats = unpg_logsumexp(emb, labels, 16.0, 0.0)
    ref = numpy_negative_hist(emb, labels)
    np.testing.assert_array_equal(stats["neg_hist"].numpy(), ref)
    hist = stats["neg_hist"].tolist()
    assert (hist[0], hist[HIST_BINS // 2], hist[-1]) == (3, 4, 2) and sum(hist) == 9
    assert stats["num_kept"] < 9  # wisk 0 drops some negatives; the histogram counts them all
    assert len(hist_edges()) == HIST_BINS + 1 and hist_edges()[0] == -1.0


def test_histogram_of_a_non_finite_batch_counts_only_finite_pairs():
    emb, labels = batch(B=12, seed=2)
    emb[3] = float("nan")  # a diverged sample: its pairs are NaN, the rest still counted
    _, stats = unpg_logsumexp(F.normalize(emb), labels, 32.0, 1.5)
    keep = torch.arange(12) != 3
    ref = numpy_negative_hist(emb[keep], labels[keep])
    np.testing.assert_array_equal(stats["neg_hist"].numpy(), ref)


def test_meter_sums_histogram_over_window_and_sink_logs_it(tmp_path):
    """A known batch through the loss, the window meter and the sink: metrics.jsonl and the
    TensorBoard histogram hold the independent counts (two steps: twice the counts)."""
    emb, labels = batch(seed=5)
    weight = torch.randn(9, 12, dtype=torch.float64)
    _, stats = margin_softmax_loss(emb, labels, weight, "arcface", unpg_wisk=1.5, s=32.0, m=0.3,
                                   return_stats=True)
    ref = numpy_negative_hist(emb, labels)
    meter = WindowMeter()
    for _ in range(2):
        meter.add(torch.tensor(1.0), torch.tensor(True), stats)
    rec = meter.read()
    assert rec[HIST_KEY] == (2 * ref).tolist()
    assert rec["unpg/kept_fraction"] == pytest.approx(
        int(stats["num_kept"]) / int(stats["num_negatives"]))
    sink = MetricsSink(tmp_path)
    sink.write(7, rec)
    sink.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row[HIST_KEY] == (2 * ref).tolist()
    histo = _tb_histograms(tmp_path / "tb", f"train/{HIST_TAG}")
    assert [h.step for h in histo] == [7]
    assert _bucket_counts(histo[0]) == (2 * ref).tolist()
    assert histo[0].histogram_value.num == 2 * ref.sum()


def _tb_histograms(tb_dir, tag):
    acc = EventAccumulator(str(tb_dir), size_guidance={"histograms": 0})
    acc.Reload()
    assert tag in acc.Tags()["histograms"], acc.Tags()
    return acc.Histograms(tag)


def _bucket_counts(event):
    """TensorBoard bucket counts mapped back onto the fixed bins (via the right edges)."""
    hv = event.histogram_value
    edges = hist_edges()
    assert list(hv.bucket_limit) == pytest.approx(edges[1:])
    return [int(c) for c in hv.bucket]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo-like run: procedural faces, the demo's MobileFaceNet, ArcFace + UNPG, 3 steps
    logged one by one (so each histogram is exactly one step's negatives)."""
    tmp = tmp_path_factory.mktemp("negview")
    data = tmp / "data"
    ensure_dataset(str(data), identities=8, images_per_identity=4, val_identities=4,
                   val_pairs=8, seed=0, workers=1, progress=False)
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"data.rec={data}", f"train.output_dir={tmp}", "train.name=run", "train.batch_size=16",
        "train.max_steps=3", "train.log_every=1", "loader.workers=0", "schedule.epochs=2"])
    try:
        Trainer(cfg).setup().train()
    finally:
        teardown_distributed()
    return tmp / "run"


def test_demo_run_writes_tensorboard_histogram(demo_run):
    rows = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    histo = _tb_histograms(demo_run / "tb", f"train/{HIST_TAG}")
    assert [h.step for h in histo] == [1, 2, 3]
    for row, event in zip(rows, histo):
        counts = row[HIST_KEY]
        assert _bucket_counts(event) == counts
        assert sum(counts) == row["unpg/num_negatives"] > 0  # one step per window
        assert row["unpg/kept_fraction"] == row["unpg/num_kept"] / row["unpg/num_negatives"]
        assert row["unpg/lower"] <= row["unpg/q1"] <= row["unpg/q3"] <= row["unpg/upper"]
    acc = EventAccumulator(str(demo_run / "tb"))
    acc.Reload()
    for key in ("q1", "q3", "lower", "upper", "kept_fraction"):
        assert [e.step for e in acc.Scalars(f"train/unpg/{key}")] == [1, 2, 3]


def test_plot_tool_writes_png(demo_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "neg.png"
    assert plot_negatives.main([str(demo_run), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "3 logging steps" in capsys.readouterr().out
    rec = plot_negatives.read_negative_records(demo_run)
    assert rec["hist"].shape == (3, HIST_BINS) and rec["step"].tolist() == [1, 2, 3]


def test_plot_tool_errors(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    assert plot_negatives.main([str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "kind": "train",
                                                        "loss": 1.0}) + "\n")
    assert plot_negatives.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unpg.enabled=true" in err
    assert not (tmp_path / "negatives.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert plot_negatives.main([str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
