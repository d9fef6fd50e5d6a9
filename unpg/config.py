"""Typed, self-validating configuration for training (``Config``) and evaluation data
(``EvalDataConfig``), loaded from YAML with ``base:`` inheritance and ``key=value`` overrides.

Each concern is a dataclass that checks itself (types from its annotations, ranges from field
metadata, in-section rules in ``_check``); ``Config.validate`` adds the rules that span sections.
A YAML file mirrors the dataclasses::

    base: ms1mv2_r100_arcface.yaml     # optional, relative to this file; merged under it
    optim: {lr: 0.05}
    unpg: {enabled: true, wisk: 1.5}

Overrides use dotted keys and YAML values: ``optim.lr=0.05 unpg.enabled=true
eval.bins=[a.bin,b.bin]``. Every error is a ``ValueError`` (``ConfigError``) that names the file
or override the bad value came from, the dotted key, what was given and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from unpg.fileio import atomic_write_text
from unpg.heads import HeadParamError, check_head_params, head_param_names
from unpg.typed_config import ConfigError, Section, describe, field_, hints, load, load_tree

Normalize = Literal["insightface", "imagenet"]
Flip = Literal["sum", "concat", "none"]

# Per-channel (mean, std) in 0..255 pixel units, RGB order: normalised = (pixel - mean) / std.
NORMALIZE_MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "insightface": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    # The official code (torchvision Normalize on [0, 1] tensors) with ImageNet statistics.
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}



@dataclass
class DataConfig(Section):
    """Training data. ``rec`` is the folder with train.rec / train.idx / property."""

    _section = "data"
    rec: str = ""
    num_classes: int = field_(0, ge=0)  # 0: read from the data; otherwise must match it
    image_size: int = field_(112, ge=1)
    normalize: Normalize = "insightface"  # see NORMALIZE_MEAN_STD
    ffcv_file: str = ""
    dali_dir: str = ""
    val_bins: list[str] = field_(factory=list)  # verification .bin files shipped with the data


@dataclass
class LoaderConfig(Section):
    _section = "loader"
    name: Literal["torch", "ffcv", "dali"] = "torch"
    workers: int = field_(4, ge=0)  # decode processes (torch, ffcv), DALI threads; 0: inline
    # ffcv: ready batches beyond the `workers` being decoded; torch: per worker; dali: queue depth
    batches_ahead: int = field_(2, ge=1)
    order: Literal["random", "quasi_random"] = "random"
    # simplejpeg: strict (damaged entropy data counts as corrupt); cv2: lenient; nvjpeg: GPU batches
    decoder: Literal["cv2", "simplejpeg", "nvjpeg"] = "simplejpeg"
    on_corrupt: Literal["skip", "error"] = "skip"
    pin_memory: bool = True


@dataclass
class ModelConfig(Section):
    _section = "model"
    name: str = "iresnet100"  # checked against the model registry when the model is built
    embedding_size: int = field_(512, ge=1)
    dropout: float = field_(0.0, ge=0.0, lt=1.0)
    channels_last: bool = False
    weights: str = ""  # initial backbone weights


@dataclass
class HeadConfig(Section):
    """Margin head. arcface/cosface use ``s, m``; combined ``cos(m1*theta + m2) - m3``;
    magface ``m(a)`` linear from l_margin to u_margin for feature norm a in [l_a, u_a]."""

    _section = "head"
    name: Literal["arcface", "cosface", "magface", "combined"] = "arcface"
    s: float = field_(64.0, gt=0.0)
    m: float = field_(0.5, ge=0.0)
    m1: float = field_(1.0, gt=0.0)
    m2: float = field_(0.5, ge=0.0)
    m3: float = field_(0.0, ge=0.0)
    arcface_grad: Literal["exact", "straight_through"] = "exact"
    l_margin: float = field_(0.45, ge=0.0)
    u_margin: float = field_(0.8, ge=0.0)
    l_a: float = field_(10.0, gt=0.0)  # > 0: the regulariser has 1/a
    u_a: float = field_(110.0, gt=0.0)
    lambda_g: float = field_(35.0, ge=0.0)

    def _check(self) -> None:
        # The heads own their rules (unpg.heads.check_head_params); errors name head.<key>.
        try:
            check_head_params(self.name, self.params())
        except HeadParamError as e:
            self._require(False, list(e.keys), e.reason)

    def params(self) -> dict[str, Any]:
        """Keyword arguments the margin-softmax loss takes for this head (from HEAD_PARAMS)."""
        return {key: getattr(self, key) for key in head_param_names(self.name)}


@dataclass
class UnpgConfig(Section):
    _section = "unpg"
    enabled: bool = False
    wisk: float = field_(1.5, ge=0.0)  # box-and-whisker multiplier of the IQR

    @property
    def unpg_wisk(self) -> Union[float, None]:
        """The loss's ``unpg_wisk`` argument: the whisker when enabled, else None."""
        return self.wisk if self.enabled else None


@dataclass
class FcConfig(Section):
    _section = "fc"
    mode: Literal["replicated", "sharded"] = "replicated"
    sample_rate: float = field_(1.0, gt=0.0, le=1.0)  # partial FC: fraction of classes per step
    backend: Literal["auto", "torch", "chunked", "triton"] = "auto"
    # Tiles of the B x C work; auto: bf16/fp16 under train.amp=bf16/fp16, else the kernel's own
    precision: Literal["auto", "bf16", "fp16", "tf32", "ieee"] = "auto"
    chunk_size: int = field_(8192, ge=1)


@dataclass
class OptimConfig(Section):
    _section = "optim"
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = field_(0.1, gt=0.0)
    momentum: float = field_(0.9, ge=0.0, lt=1.0)
    weight_decay: float = field_(5e-4, ge=0.0)
    betas: list[float] = field_(factory=lambda: [0.9, 0.999], ge=0.0, lt=1.0, length=2)
    eps: float = field_(1e-8, gt=0.0)
    grad_clip: float = field_(0.0, ge=0.0)  # max global grad norm; 0 = off
    accum_steps: int = field_(1, ge=1)


@dataclass
class ScheduleConfig(Section):
    _section = "schedule"
    name: Literal["cosine", "poly"] = "cosine"
    epochs: int = field_(20, ge=1)
    warmup_epochs: float = field_(3.0, ge=0.0)  # linear warm-up, fractions allowed
    min_lr: float = field_(0.0, ge=0.0)
    poly_power: float = field_(2.0, gt=0.0)

    def _check(self) -> None:
        self._require(self.warmup_epochs < self.epochs, ["warmup_epochs", "epochs"],
                      f"need warmup_epochs < epochs, got {self.warmup_epochs} >= {self.epochs}")


@dataclass
class TrainConfig(Section):
    _section = "train"
    batch_size: int = field_(512, ge=1)  # GLOBAL batch over all ranks
    seed: int = field_(42, ge=0, lt=2**32)
    amp: Literal["bf16", "fp16", "none", "auto"] = "auto"  # auto: bf16 on CUDA, none on CPU
    compile: bool = False
    output_dir: str = "runs"
    name: str = "default"  # the run folder is output_dir/name
    resume: str = ""  # "" = fresh, "auto" = latest checkpoint of this run, or a checkpoint path
    overwrite: bool = False  # a fresh run may delete an earlier run's files in its run folder
    save_every: int = field_(1000, ge=0)  # steps; 0 = no step checkpoints
    keep_last: int = field_(3, ge=1)
    log_every: int = field_(50, ge=1)
    max_nonfinite: int = field_(10, ge=0)  # non-finite losses tolerated before stopping
    max_steps: int = field_(0, ge=0)  # 0 = no limit
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EvalConfig(Section):
    """Verification during training; ``bins`` empty means ``data.val_bins``."""

    _section = "eval"
    bins: list[str] = field_(factory=list)
    every: int = field_(2000, ge=0)  # steps; 0 = off
    batch_size: int = field_(256, ge=1)
    flip: Flip = "sum"
    n_folds: int = field_(10, ge=2)


@dataclass
class Config:
    """The whole training configuration; validates itself on construction."""

    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    unpg: UnpgConfig = field(default_factory=UnpgConfig)
    fc: FcConfig = field(default_factory=FcConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Config:
        """Check every section, then the rules that span sections; returns self."""
        types = hints(Config)
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if not isinstance(section, types[f.name]):
                raise ConfigError(f"{f.name}: expected {types[f.name].__name__}, got "
                                  f"{describe(section)}", [f.name])
            section.validate()
        if self.fc.sample_rate < 1.0 and self.fc.mode != "sharded":
            raise ConfigError(f"fc.sample_rate={self.fc.sample_rate} < 1 (partial FC) needs "
                              f"fc.mode: sharded, got fc.mode: {self.fc.mode}",
                              ["fc.sample_rate", "fc.mode"])
        if self.train.batch_size % self.optim.accum_steps:
            raise ConfigError(f"train.batch_size={self.train.batch_size} must be divisible by "
                              f"optim.accum_steps={self.optim.accum_steps}",
                              ["train.batch_size", "optim.accum_steps"])
        if self.schedule.min_lr > self.optim.lr:
            raise ConfigError(f"schedule.min_lr={self.schedule.min_lr} must not exceed "
                              f"optim.lr={self.optim.lr}", ["schedule.min_lr", "optim.lr"])
        return self

    @property
    def verification_bins(self) -> list[str]:
        """The .bin files evaluated during training: ``eval.bins``, else ``data.val_bins``."""
        return list(self.eval.bins or self.data.val_bins)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build and validate from a nested mapping (e.g. a config stored in a checkpoint)."""
        return load_tree(cls, copy.deepcopy(dict(data)), {}, "config")


# ----------------------------------------------------------------------------- evaluation data
@dataclass
class EvalDataConfig(Section):
    """An evaluation benchmark for ``python -m unpg.evaluate --data FILE``."""

    benchmark: Literal["bins", "ijbb", "ijbc", "kface"]
    root: str  # dataset folder
    names: list[str] = field_(factory=list)  # bins: .bin file stems (lfw, cfp_fp, ...)
    image_size: int = field_(112, ge=1)
    batch_size: int = field_(256, ge=1)
    flip: Flip = "sum"
    normalize: Normalize = "insightface"  # must match the training config's data.normalize
    score_weighting: bool = False  # IJB: weight by detector score
    variant: Literal["insightface", "seed"] = "insightface"  # IJB: seed = its pre-aligned list
    pairs: list[str] = field_(factory=list)  # kface: Q1..Q4 pair files
    fars: list[float] = field_(factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], gt=0.0, le=1.0)
    output_dir: str = "eval_out"

    def _check(self) -> None:
        self._require(self.root != "", ["root"], "give the dataset folder")
        if self.benchmark == "bins":
            self._require(bool(self.names), ["names"],
                          "benchmark 'bins' needs the .bin stems, e.g. [lfw, cfp_fp, agedb_30]")
        if self.benchmark == "kface":
            self._require(bool(self.pairs), ["pairs"],
                          "benchmark 'kface' needs the pair files, e.g. [kface.Q1.txt]")
        ijb = self.benchmark in ("ijbb", "ijbc")
        self._require(ijb or self.variant == "insightface", ["variant"],
                      f"variant 'seed' applies to ijbb/ijbc only, not {self.benchmark!r}")
        self._require(ijb or not self.score_weighting, ["score_weighting"],
                      f"score weighting applies to ijbb/ijbc only, not {self.benchmark!r}")
        self._require(not (self.variant == "seed" and self.score_weighting),
                      ["variant", "score_weighting"],
                      "the official code's pre-aligned list has no detector scores: "
                      "set score_weighting: false or variant: insightface")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalDataConfig:
        return load_tree(cls, copy.deepcopy(dict(data)), {}, "config")




def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Load a training config: defaults < ``base:`` chain < file < ``key=value`` overrides."""
    return load(Config, path, overrides)


def load_eval_data_config(path: Union[str, Path, None] = None,
                          overrides: Sequence[str] = ()) -> EvalDataConfig:
    """Load an evaluation-data config (``configs/data/*.yaml``) with the same rules."""
    return load(EvalDataConfig, path, overrides)


def save_config(cfg: Union[Config, EvalDataConfig], path: Union[str, Path]) -> Path:
    """Write the resolved config as YAML, atomically; loading it gives an equal config."""
    loader = "load_config" if isinstance(cfg, Config) else "load_eval_data_config"
    text = (f"# Resolved {type(cfg).__name__}, written by unpg.config.save_config; "
            f"read it with unpg.config.{loader}.\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None))
    return atomic_write_text(path, text)


__all__ = [
    "NORMALIZE_MEAN_STD", "ConfigError", "Config", "DataConfig", "LoaderConfig", "ModelConfig",
    "HeadConfig", "UnpgConfig", "FcConfig", "OptimConfig", "ScheduleConfig", "TrainConfig",
    "EvalConfig", "EvalDataConfig", "load_config", "load_eval_data_config", "save_config",
]
