"""bench/ablation.py: held-out evaluation data, paired statistics, and a tiny end-to-end table
that is reproducible and cached."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from unpg.data.synthetic import VAL_BIN, ensure_dataset
from unpg.eval.bins import load_bin

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_ablation", REPO / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ablation  # its dataclass looks its module up while being defined
_spec.loader.exec_module(ablation)

TINY = dict(identities=6, images_per_identity=4, val_identities=5, val_pairs=40, nuisance=1.0,
            quality=90, data_seed=0, epochs=1, heads=["arcface"], variants=["base", "unpg"],
            seeds=[0, 1])
TINY_OVERRIDES = ["train.batch_size=8", "model.embedding_size=16", "loader.workers=0",
                  "train.log_every=1"]


def test_heldout_keeps_each_distinct_image_once(tmp_path):
    meta = ensure_dataset(str(tmp_path), 3, 2, val_identities=4, val_pairs=30, seed=1,
                          workers=1, progress=False)
    hs = ablation.load_heldout(tmp_path / VAL_BIN, meta["pairs"])
    keys = {(a, ka) for a, ka, _, _, _ in meta["pairs"]} | {(b, kb) for _, _, b, kb, _ in
                                                            meta["pairs"]}
    assert len(hs.images) == len(keys) < 60
    vs = load_bin(tmp_path / VAL_BIN, use_cache=False)
    np.testing.assert_array_equal(hs.images[hs.idx1_N], vs.images[0::2])
    np.testing.assert_array_equal(hs.images[hs.idx2_N], vs.images[1::2])
    np.testing.assert_array_equal(hs.issame_N, vs.issame)
    same = hs.ident_U[hs.idx1_N] == hs.ident_U[hs.idx2_N]
    np.testing.assert_array_equal(same, vs.issame)


def test_paired_differences_and_pooling():
    seeds = [0, 1, 2]
    rng = np.random.default_rng(0)
    runs = {(h, v, s): {m: float(rng.random()) for m in ablation.METRICS}
            for h in ("arcface", "cosface") for v in ("base", "unpg") for s in seeds}
    res = {r["name"]: r for r in ablation.aggregate(runs, ["arcface", "cosface"],
                                                    ["base", "unpg"], seeds)}
    m = "hard_tar@1e-3"
    diffs = [runs[("cosface", "unpg", s)][m] - runs[("cosface", "base", s)][m] for s in seeds]
    cell = res[f"ablation/cosface/unpg_minus_base/{m}"]
    assert cell["value"] == pytest.approx(np.mean(diffs))
    assert cell["std"] == pytest.approx(np.std(diffs, ddof=1))
    assert cell["wins"] == sum(d > 0 for d in diffs) and cell["n"] == 3
    base = res[f"ablation/arcface/base/{m}"]
    assert base["per_seed"] == [runs[("arcface", "base", s)][m] for s in seeds]
    pooled = res[f"ablation/all/unpg_minus_base/{m}"]
    assert pooled["n"] == 6 and pooled["value"] == pytest.approx(np.mean(
        [runs[(h, "unpg", s)][m] - runs[(h, "base", s)][m]
         for h in ("arcface", "cosface") for s in seeds]))
    text = ablation.format_tables(list(res.values()), ["arcface", "cosface"], ["base", "unpg"])
    assert "unpg − base" in text and "all heads" in text


def test_bad_arguments_exit_2(capsys):
    assert ablation.main(["--heads", "sphereface"]) == 2
    assert capsys.readouterr().err.startswith("error: --heads")
    assert ablation.main(["--seeds", "0,x"]) == 2
    assert "error: --seeds" in capsys.readouterr().err


def _table(tmp_path, *extra):
    out = tmp_path / f"out{len(list(tmp_path.glob('out*.json')))}.json"
    rc = ablation.main(["--work", str(tmp_path / "work"), "--json", str(out), "--workers", "1",
                        *extra, *TINY_OVERRIDES])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_table_is_reproducible_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ablation.PRESETS, "full", TINY)
    first = _table(tmp_path)
    names = {r["name"] for r in first["results"]}
    for m in ablation.METRICS:
        assert {f"ablation/arcface/base/{m}", f"ablation/arcface/unpg/{m}",
                f"ablation/arcface/unpg_minus_base/{m}"} <= names
    for r in first["results"]:
        assert len(r["per_seed"]) == 2
        if "minus" not in r["name"]:
            assert all(0.0 <= v <= 1.0 for v in r["per_seed"])
    assert not any(run["cached"] for run in first["runs"])
    assert [(r["variant"], r["seed"]) for r in first["runs"]] == [
        ("base", 0), ("unpg", 0), ("base", 1), ("unpg", 1)]  # seed-major
    # The UNPG runs logged the negative-pair histogram; the base runs have no UNPG statistics.
    runs = tmp_path / "work" / "runs"
    rows = [json.loads(x) for x in next(runs.glob("*/arcface_unpg_seed0")).joinpath(
        "metrics.jsonl").read_text().splitlines()]
    assert all("unpg/neg_hist" in r for r in rows if r["kind"] == "train")
    cached = _table(tmp_path)
    assert all(run["cached"] for run in cached["runs"])
    assert cached["results"] == first["results"]
    again = _table(tmp_path, "--fresh", "--seeds", "1")  # retrained: the same numbers
    assert not any(run["cached"] for run in again["runs"])
    by_name = {r["name"]: r for r in first["results"]}
    for r in again["results"]:
        assert r["per_seed"] == [by_name[r["name"]]["per_seed"][1]], r["name"]
    assert "unpg − base" in capsys.readouterr().out
