"""Tests for unpg.config: defaults, every shipped YAML, base: merging, overrides, each kind of
error message, the save/load round trip, head.params() and the official code values of the paper configs."""
import math
import os
from pathlib import Path

import pytest
import yaml

from unpg.config import (
    NORMALIZE_MEAN_STD,
    Config,
    ConfigError,
    EvalDataConfig,
    HeadConfig,
    OptimConfig,
    load_config,
    load_eval_data_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_YAMLS = sorted(CONFIGS.glob("*.yaml"))
DATA_YAMLS = sorted((CONFIGS / "data").glob("*.yaml"))
MS1MV2 = [f"ms1mv2_r100_{h}{u}.yaml" for h in ("arcface", "cosface", "magface") for u in ("", "_unpg")]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    assert isinstance(info.value, ConfigError)
    return str(info.value)


# ----------------------------------------------------------------------------- shipped files
def test_defaults_validate():
    cfg = Config()
    assert load_config(None) == cfg
    assert list(cfg.to_dict()) == ["data", "loader", "model", "head", "unpg", "fc", "optim",
                                   "schedule", "train", "eval"]
    assert cfg.head.params() == {"s": 64.0, "m": 0.5, "arcface_grad": "exact"}
    assert cfg.unpg.unpg_wisk is None
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.schedule.warmup_epochs, float)


def test_required_files_exist():
    names = {p.name for p in TRAIN_YAMLS}
    assert set(MS1MV2) | {"kface_r34_arcface_unpg.yaml", "demo.yaml"} <= names
    assert {p.name for p in DATA_YAMLS} >= {"bins.yaml", "ijbb.yaml", "ijbc.yaml", "kface.yaml"}


@pytest.mark.parametrize("path", TRAIN_YAMLS + DATA_YAMLS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_yaml_loads_and_validates(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), f"{path} must start with a comment saying what it is"
    if path.parent == CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, Config) and cfg.validate() is cfg
    else:
        cfg = load_eval_data_config(path)
        assert isinstance(cfg, EvalDataConfig) and cfg.root


@pytest.mark.parametrize("name", MS1MV2)
def test_ms1mv2_seed_values(name):
    cfg = load_config(CONFIGS / name)
    assert (cfg.model.name, cfg.model.embedding_size) == ("iresnet100", 512)
    assert cfg.data.rec == "data/faces_emore" and cfg.data.num_classes == 85742
    assert "data/faces_emore/lfw.bin" in cfg.verification_bins
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == \
        ("sgd", 0.1, 0.9, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == ("cosine", 20, 3.0)
    assert cfg.train.batch_size == 512 and cfg.head.s == 64.0
    head = name[: -len(".yaml")].split("_")[2]
    assert cfg.head.name == head
    if head == "magface":
        p = cfg.head.params()
        assert (p["l_margin"], p["u_margin"], p["l_a"], p["u_a"], p["lambda_g"]) == (0.45, 0.8, 10, 110, 35)
    else:
        assert cfg.head.params()["m"] == 0.5
    assert cfg.unpg.unpg_wisk == (1.5 if name.endswith("_unpg.yaml") else None)
    assert cfg.train.name == name[: -len(".yaml")]


@pytest.mark.parametrize("head", ["arcface", "cosface", "magface"])
def test_unpg_file_differs_from_its_base_only_in_unpg_and_name(head):
    plain = load_config(CONFIGS / f"ms1mv2_r100_{head}.yaml").to_dict()
    unpg = load_config(CONFIGS / f"ms1mv2_r100_{head}_unpg.yaml").to_dict()
    assert unpg["unpg"] == {"enabled": True, "wisk": 1.5} and plain["unpg"]["enabled"] is False
    for d in (plain, unpg):
        d.pop("unpg")
        d["train"].pop("name")
    assert plain == unpg


def test_kface_config():
    cfg = load_config(CONFIGS / "kface_r34_arcface_unpg.yaml")
    assert cfg.model.name == "iresnet34" and cfg.unpg.unpg_wisk == 1.0 and cfg.head.name == "arcface"
    assert cfg.data.rec.startswith("data/kface")
    data = load_eval_data_config(CONFIGS / "data" / "kface.yaml")
    assert data.benchmark == "kface" and len(data.pairs) == 4


# ----------------------------------------------------------------------------- base: merging
def test_base_chain_deep_merges_relative_paths(tmp_path):
    write(tmp_path / "root.yaml", "optim: {lr: 0.2, momentum: 0.8}\nhead: {name: cosface, m: 0.35}\n")
    write(tmp_path / "mid" / "mid.yaml", "base: ../root.yaml\noptim: {weight_decay: 1.0e-4}\n")
    leaf = write(tmp_path / "mid" / "sub" / "leaf.yaml",
                 "base: ../mid.yaml\noptim: {lr: 0.05}\nunpg: {enabled: true}\n")
    cfg = load_config(leaf)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.05, 0.8, 1e-4)
    assert (cfg.head.name, cfg.head.m, cfg.unpg.unpg_wisk) == ("cosface", 0.35, 1.5)
    assert cfg.train.batch_size == 512  # untouched keys keep the defaults


def test_empty_section_in_child_keeps_base_values(tmp_path):
    write(tmp_path / "b.yaml", "optim: {lr: 0.3}\n")
    cfg = load_config(write(tmp_path / "c.yaml", "base: b.yaml\noptim:\n"))
    assert cfg.optim.lr == 0.3


def test_base_cycle_detected(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\noptim: {lr: 0.2}\n")
    msg = error_of(load_config, tmp_path / "a.yaml")
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg
    msg = error_of(load_config, write(tmp_path / "self.yaml", "base: self.yaml\n"))
    assert "cycle" in msg


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml.*child.yaml"):
        load_config(child)


def test_error_names_the_base_file_that_set_the_value(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: -1}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain: {name: x}\n")
    msg = error_of(load_config, child)
    assert str(tmp_path / "base.yaml") in msg and str(child) in msg and "optim.lr" in msg


# ----------------------------------------------------------------------------- overrides
def test_overrides_parse_types(tmp_path):
    cfg = load_config(CONFIGS / "ms1mv2_r100_arcface.yaml", [
        "optim.lr=0.05", "unpg.enabled=true", "eval.bins=[a.bin, b.bin]", "train.name=2024",
        "data.rec=", "optim.eps=1.0e-6", "schedule.warmup_epochs=1", "head.name=cosface"])
    assert cfg.optim.lr == 0.05 and cfg.unpg.enabled is True
    assert cfg.eval.bins == ["a.bin", "b.bin"] and cfg.verification_bins == ["a.bin", "b.bin"]
    assert cfg.train.name == "2024" and cfg.data.rec == ""  # str fields keep the text
    assert cfg.optim.eps == 1e-6 and cfg.schedule.warmup_epochs == 1.0
    assert cfg.head.params() == {"s": 64.0, "m": 0.5}
    assert cfg.optim.momentum == 0.9  # from the file


def test_override_unknown_key_suggests():
    msg = error_of(load_config, None, ["optim.lrr=0.1"])
    assert "optim.lrr" in msg and "did you mean 'optim.lr'" in msg and "momentum" in msg
    msg = error_of(load_config, None, ["optm.lr=0.1"])
    assert "'optm'" in msg and "did you mean 'optim'" in msg and "schedule" in msg


@pytest.mark.parametrize("bad", ["optim.lr", "=0.1", "head=arcface", "optim.lr.x=1", "optim.lr=[1"])
def test_malformed_override(bad):
    msg = error_of(load_config, None, [bad])
    assert repr(bad) in msg


def test_overrides_must_be_a_list():
    assert "one string" in error_of(load_config, None, "optim.lr=0.1")


# ----------------------------------------------------------------------------- error kinds
def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path / "x.yaml", "optim:\n  lrr: 0.25\n")
    msg = error_of(load_config, path)
    assert str(path) in msg and "optim.lrr" in msg and "0.25" in msg
    assert "did you mean 'optim.lr'" in msg and "weight_decay" in msg and "accum_steps" in msg
    msg = error_of(load_config, write(tmp_path / "y.yaml", "optimiser: {lr: 0.1}\n"))
    assert "unknown section 'optimiser'" in msg and "optim" in msg and "eval" in msg


@pytest.mark.parametrize("text, key, words", [
    ("train: {batch_size: true}", "train.batch_size", ["expected int", "bool"]),
    ("optim: {lr: true}", "optim.lr", ["expected float", "bool"]),
    ("optim: {lr: fast}", "optim.lr", ["expected float", "str 'fast'"]),
    ("optim: {eps: 1e-8}", "optim.eps", ["expected float", "1.0e-8"]),
    ("train: {batch_size: 2.5}", "train.batch_size", ["expected int", "float"]),
    ("unpg: {enabled: 1}", "unpg.enabled", ["expected bool", "int"]),
    ("eval: {bins: lfw.bin}", "eval.bins", ["expected a list of str"]),
    ("model: {name: 5}", "model.name", ["expected str", "int"]),
    ("data: {rec: }", "data.rec", ["expected str", "empty"]),
    ("optim: {betas: [0.9, x]}", "optim.betas[1]", ["expected float"]),
    ("optim: {lr: .nan}", "optim.lr", ["finite"]),
    ("optim: 3", "optim", ["mapping"]),
])
def test_wrong_type(tmp_path, text, key, words):
    path = write(tmp_path / "c.yaml", text + "\n")
    msg = error_of(load_config, path)
    assert str(path) in msg and key in msg
    for word in words:
        assert word in msg


def test_int_accepted_for_float():
    cfg = load_config(None, ["optim.lr=1", "head.s=30"])
    assert type(cfg.optim.lr) is float and type(cfg.head.s) is float
    assert OptimConfig(lr=2).lr == 2.0 and type(OptimConfig(lr=2).lr) is float


def test_value_outside_choices(tmp_path):
    path = write(tmp_path / "c.yaml", "head: {name: arcfce}\n")
    msg = error_of(load_config, path)
    assert str(path) in msg and "head.name" in msg and "'arcfce'" in msg
    for allowed in ("arcface", "cosface", "magface", "combined"):
        assert allowed in msg
    assert "did you mean 'arcface'" in msg
    msg = error_of(load_config, None, ["train.amp=fp8"])
    assert "train.amp" in msg and "'bf16', 'fp16', 'none'" in msg


@pytest.mark.parametrize("override, key, allowed", [
    ("fc.sample_rate=0", "fc.sample_rate", "0.0 < fc.sample_rate <= 1.0"),
    ("optim.lr=0", "optim.lr", "0.0 < optim.lr"),
    ("optim.accum_steps=0", "optim.accum_steps", "1 <= optim.accum_steps"),
    ("model.dropout=1", "model.dropout", "0.0 <= model.dropout < 1.0"),
    ("loader.workers=-1", "loader.workers", "0 <= loader.workers"),
    ("eval.n_folds=1", "eval.n_folds", "2 <= eval.n_folds"),
    ("optim.betas=[0.9, 1.5]", "optim.betas[1]", "0.0 <= optim.betas[1] < 1.0"),
    ("unpg.wisk=-0.5", "unpg.wisk", "0.0 <= unpg.wisk"),
])
def test_range_violation(override, key, allowed):
    msg = error_of(load_config, None, [override])
    assert key in msg and "out of range" in msg and allowed in msg and repr(override) in msg


@pytest.mark.parametrize("overrides, keys", [
    (["schedule.warmup_epochs=20"], ["schedule.warmup_epochs", "schedule.epochs"]),
    (["head.name=magface", "head.l_a=120"], ["head.l_a", "head.u_a"]),
    (["head.name=magface", "head.l_margin=0.9"], ["head.l_margin", "head.u_margin"]),
    (["head.m=3.2"], ["head.m", "pi"]),
    (["head.name=combined", "head.m2=3.5"], ["head.m2"]),
    (["head.name=magface", "head.u_margin=2.0"], ["head.u_margin"]),
    (["fc.sample_rate=0.5"], ["fc.sample_rate", "fc.mode"]),
    (["optim.accum_steps=3"], ["train.batch_size", "optim.accum_steps"]),
    (["schedule.min_lr=0.5"], ["schedule.min_lr", "optim.lr"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
])
def test_cross_field_rules(overrides, keys):
    msg = error_of(load_config, None, overrides)
    for key in keys:
        assert key in msg


def test_cross_field_rules_pass_when_consistent():
    cfg = load_config(None, ["fc.sample_rate=0.5", "fc.mode=sharded", "optim.accum_steps=4",
                             "head.name=magface", "head.u_margin=1.5"])
    assert cfg.fc.sample_rate == 0.5 and cfg.optim.accum_steps == 4


def test_direct_construction_and_mutation_validate():
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ValueError, match="head.s"):
        HeadConfig(s=0)
    cfg = Config()
    cfg.train.batch_size = 500
    cfg.optim.accum_steps = 3
    with pytest.raises(ValueError, match="divisible"):
        cfg.validate()


def test_from_dict_checks_keys():
    assert Config.from_dict({"optim": {"lr": 0.02}}).optim.lr == 0.02
    assert "did you mean 'train.seed'" in error_of(Config.from_dict, {"train": {"sed": 1}})


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "ms1mv2_r100_magface_unpg.yaml",
                      ["train.name=2024", "eval.bins=[x.bin]", "optim.eps=1.0e-7", "data.rec="])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.read_text(encoding="utf-8").startswith("#")
    again = load_config(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert sorted(os.listdir(path.parent)) == ["config.yaml"]  # no temporary left behind


def test_save_eval_data_round_trip(tmp_path):
    cfg = load_eval_data_config(CONFIGS / "data" / "ijbc.yaml", ["variant=seed", "score_weighting=false"])
    assert load_eval_data_config(save_config(cfg, tmp_path / "d.yaml")) == cfg


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_config(Config(), target)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["config.yaml"]


def test_saved_yaml_is_plain(tmp_path):
    path = save_config(Config(), tmp_path / "c.yaml")
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.9, 0.999]


# ----------------------------------------------------------------------------- heads, unpg
@pytest.mark.parametrize("name, overrides, expected", [
    ("arcface", ["head.s=30", "head.m=0.4", "head.arcface_grad=straight_through"],
     {"s": 30.0, "m": 0.4, "arcface_grad": "straight_through"}),
    ("cosface", ["head.s=30", "head.m=0.35"], {"s": 30.0, "m": 0.35}),
    ("magface", ["head.l_margin=0.4", "head.u_margin=0.7", "head.l_a=12", "head.u_a=100",
                 "head.lambda_g=20"],
     {"s": 64.0, "l_margin": 0.4, "u_margin": 0.7, "l_a": 12.0, "u_a": 100.0, "lambda_g": 20.0}),
    ("combined", ["head.m1=0.9", "head.m2=0.4", "head.m3=0.15"],
     {"s": 64.0, "m1": 0.9, "m2": 0.4, "m3": 0.15}),
])
def test_head_params(name, overrides, expected):
    assert load_config(None, [f"head.name={name}"] + overrides).head.params() == expected


def test_unpg_wisk():
    assert load_config(None, ["unpg.wisk=0.7"]).unpg.unpg_wisk is None
    assert load_config(None, ["unpg.enabled=true", "unpg.wisk=0.7"]).unpg.unpg_wisk == 0.7


def test_normalize_constants_map_pixel_range():
    mean, std = NORMALIZE_MEAN_STD["insightface"]
    assert [(0 - m) / s for m, s in zip(mean, std)] == [-1.0] * 3
    assert [(255 - m) / s for m, s in zip(mean, std)] == [1.0] * 3
    mean, std = NORMALIZE_MEAN_STD["imagenet"]
    # torchvision's Normalize on [0, 1] tensors: (x/255 - 0.485) / 0.229 for red.
    assert math.isclose((200 - mean[0]) / std[0], (200 / 255 - 0.485) / 0.229)


# ----------------------------------------------------------------------------- eval data config
@pytest.mark.parametrize("overrides, words", [
    (["benchmark=bins"], ["root", "missing required key"]),
    (["root=x"], ["benchmark", "'bins', 'ijbb', 'ijbc', 'kface'"]),
    (["benchmark=bins", "root=x"], ["names"]),
    (["benchmark=kface", "root=x"], ["pairs"]),
    (["benchmark=bins", "root=x", "names=[lfw]", "variant=seed"], ["variant", "ijbb"]),
    (["benchmark=ijbb", "root=x", "variant=seed", "score_weighting=true"], ["score_weighting"]),
    (["benchmark=ijbb", "root=x", "fars=[0.0]"], ["fars[0]", "out of range"]),
    (["benchmark=ijbbb", "root=x"], ["benchmark", "did you mean 'ijbb'"]),
    (["benchmark=ijbb", "root=x", "nmes=[a]"], ["did you mean 'names'"]),
])
def test_eval_data_errors(overrides, words):
    msg = error_of(load_eval_data_config, None, overrides)
    for word in words:
        assert word in msg


def test_eval_data_file_errors_name_the_file(tmp_path):
    path = write(tmp_path / "e.yaml", "benchmark: bins\nroot: x\nnames: [lfw]\nflip: both\n")
    msg = error_of(load_eval_data_config, path)
    assert str(path) in msg and "flip" in msg and "'sum', 'concat', 'none'" in msg
