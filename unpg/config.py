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
import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from unpg.fileio import atomic_write_text

Normalize = Literal["insightface", "imagenet"]
Flip = Literal["sum", "concat", "none"]

# Per-channel (mean, std) in 0..255 pixel units, RGB order: normalised = (pixel - mean) / std.
NORMALIZE_MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "insightface": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    # The seed (torchvision Normalize on [0, 1] tensors) with ImageNet statistics.
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}


class ConfigError(ValueError):
    """A configuration problem; ``keys`` are the dotted keys involved (used to find the file)."""

    def __init__(self, message: str, keys: Sequence[str] = (), located: bool = False) -> None:
        super().__init__(message)
        self.keys = tuple(keys)
        self.located = located  # True when the message already names its file / override


def _field(default: Any = dataclasses.MISSING, *, factory: Any = None, **limits: Any) -> Any:
    """A dataclass field with range limits (``ge gt le lt`` per number or list item, ``length``)."""
    unknown = set(limits) - {"ge", "gt", "le", "lt", "length"}
    assert not unknown, f"unknown field limits {unknown}"
    if factory is not None:
        return field(default_factory=factory, metadata=limits)
    return field(default=default, metadata=limits)


# ----------------------------------------------------------------------------- generic checks
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    return "nothing (empty value)" if value is None else f"{type(value).__name__} {_short(value)}"


def _type_name(hint: Any) -> str:
    if get_origin(hint) is list:
        return f"list of {_type_name(get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _did_you_mean(given: Any, allowed: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(given), list(allowed), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _type_advice(value: Any, hint: Any) -> str:
    if isinstance(value, bool) and hint in (int, float):
        return " (true/false is not a number)"
    if isinstance(value, str) and hint in (int, float):
        try:
            float(value)
        except ValueError:
            return ""
        return (" (a number in quotes is a string; note that YAML reads exponent floats without "
                "a '.', e.g. 1e-8, as strings: write 1.0e-8)")
    if hint is str and value is not None:
        return " (put the value in quotes)"
    return ""


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to ``hint`` (int -> float, tuple -> list) or raise ConfigError."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if any(type(value) is type(c) and value == c for c in choices):
            return value
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key}: {_short(value)} is not an allowed value"
                          f"{_did_you_mean(value, [str(c) for c in choices])}; allowed values: "
                          f"{allowed}", [key])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a {_type_name(hint)}, got {_describe(value)} "
                              f"(write a YAML list such as [a, b])", [key])
        return [_check_type(f"{key}[{i}]", v, get_args(hint)[0]) for i, v in enumerate(value)]
    ok = False
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {value!r} is not a finite number", [key])
            return float(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {key} has an unsupported type {hint!r}")
    if ok:
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {_describe(value)}"
                      f"{_type_advice(value, hint)}", [key])


def _range_text(key: str, limits: Mapping[str, Any]) -> str:
    low = f"{limits['ge']} <= " if "ge" in limits else f"{limits['gt']} < " if "gt" in limits else ""
    high = f" <= {limits['le']}" if "le" in limits else f" < {limits['lt']}" if "lt" in limits else ""
    return f"{low}{key}{high}"


def _check_range(key: str, value: Any, limits: Mapping[str, Any]) -> None:
    if "length" in limits and len(value) != limits["length"]:
        raise ConfigError(f"{key}: expected {limits['length']} values, got {len(value)}: "
                          f"{_short(value)}", [key])
    bounds = {k: v for k, v in limits.items() if k != "length"}
    if not bounds:
        return
    items = enumerate(value) if isinstance(value, list) else [(None, value)]
    for i, item in items:
        ok = (item >= bounds.get("ge", item) and item <= bounds.get("le", item)
              and ("gt" not in bounds or item > bounds["gt"])
              and ("lt" not in bounds or item < bounds["lt"]))
        if not ok:
            name = key if i is None else f"{key}[{i}]"
            raise ConfigError(f"{name}: {item!r} is out of range; allowed range: "
                              f"{_range_text(name, bounds)}", [key])


class _Section:
    """Base of the leaf dataclasses: checks types and ranges of every field on construction."""

    _section = ""  # dotted prefix used in messages ("" for a flat, top-level config)

    def __post_init__(self) -> None:
        self.validate()

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def validate(self) -> _Section:
        """Re-check every field (call after mutating); returns self."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = self._key(f.name)
            value = _check_type(key, getattr(self, f.name), hints[f.name])
            _check_range(key, value, f.metadata)
            setattr(self, f.name, value)
        self._check()
        return self

    def _check(self) -> None:
        """Rules between fields of this section; overridden where needed."""

    def _require(self, ok: bool, names: Sequence[str], message: str) -> None:
        if not ok:
            keys = [self._key(n) for n in names]
            raise ConfigError(f"{', '.join(keys)}: {message}", keys)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- training config
@dataclass
class DataConfig(_Section):
    """Training data. ``rec`` is the folder with train.rec / train.idx / property."""

    _section = "data"
    rec: str = ""
    num_classes: int = _field(0, ge=0)  # 0: read from the data; otherwise must match it
    image_size: int = _field(112, ge=1)
    normalize: Normalize = "insightface"  # see NORMALIZE_MEAN_STD
    ffcv_file: str = ""
    dali_dir: str = ""
    val_bins: list[str] = _field(factory=list)  # verification .bin files shipped with the data


@dataclass
class LoaderConfig(_Section):
    _section = "loader"
    name: Literal["torch", "ffcv", "dali"] = "torch"
    workers: int = _field(4, ge=0)
    batches_ahead: int = _field(2, ge=1)
    order: Literal["random", "quasi_random"] = "random"
    decoder: Literal["cv2", "simplejpeg", "nvjpeg"] = "cv2"
    on_corrupt: Literal["skip", "error"] = "skip"
    pin_memory: bool = True


@dataclass
class ModelConfig(_Section):
    _section = "model"
    name: str = "iresnet100"  # checked against the model registry when the model is built
    embedding_size: int = _field(512, ge=1)
    dropout: float = _field(0.0, ge=0.0, lt=1.0)
    channels_last: bool = False
    weights: str = ""  # initial backbone weights


@dataclass
class HeadConfig(_Section):
    """Margin head. arcface/cosface use ``s, m``; combined ``cos(m1*theta + m2) - m3``;
    magface ``m(a)`` linear from l_margin to u_margin for feature norm a in [l_a, u_a]."""

    _section = "head"
    name: Literal["arcface", "cosface", "magface", "combined"] = "arcface"
    s: float = _field(64.0, gt=0.0)
    m: float = _field(0.5, ge=0.0)
    m1: float = _field(1.0, gt=0.0)
    m2: float = _field(0.5, ge=0.0)
    m3: float = _field(0.0, ge=0.0)
    arcface_grad: Literal["exact", "straight_through"] = "exact"
    l_margin: float = _field(0.45, ge=0.0)
    u_margin: float = _field(0.8, ge=0.0)
    l_a: float = _field(10.0, gt=0.0)  # > 0: the regulariser has 1/a
    u_a: float = _field(110.0, gt=0.0)
    lambda_g: float = _field(35.0, ge=0.0)

    def _check(self) -> None:
        self._require(self.l_a < self.u_a, ["l_a", "u_a"],
                      f"need l_a < u_a, got l_a={self.l_a} and u_a={self.u_a}")
        self._require(self.l_margin <= self.u_margin, ["l_margin", "u_margin"],
                      f"need l_margin <= u_margin, got {self.l_margin} > {self.u_margin}")
        if self.name == "arcface":
            self._require(self.m < math.pi, ["m"], f"ArcFace needs 0 <= m < pi, got {self.m}")
        if self.name == "combined":
            self._require(self.m2 < math.pi, ["m2"], f"needs 0 <= m2 < pi, got {self.m2}")
        if self.name == "magface":
            # Easy margin: the margin applies only where theta < pi/2, so theta + m stays on
            # the decreasing branch of cos exactly when m <= pi/2.
            self._require(self.u_margin <= math.pi / 2, ["u_margin"],
                          f"MagFace needs u_margin <= pi/2 (1.5708), got {self.u_margin}")

    def params(self) -> dict[str, Any]:
        """Keyword arguments the margin-softmax loss takes for this head."""
        if self.name == "arcface":
            return {"s": self.s, "m": self.m, "arcface_grad": self.arcface_grad}
        if self.name == "cosface":
            return {"s": self.s, "m": self.m}
        if self.name == "magface":
            return {"s": self.s, "l_margin": self.l_margin, "u_margin": self.u_margin,
                    "l_a": self.l_a, "u_a": self.u_a, "lambda_g": self.lambda_g}
        return {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3}


@dataclass
class UnpgConfig(_Section):
    _section = "unpg"
    enabled: bool = False
    wisk: float = _field(1.5, ge=0.0)  # box-and-whisker multiplier of the IQR

    @property
    def unpg_wisk(self) -> Union[float, None]:
        """The loss's ``unpg_wisk`` argument: the whisker when enabled, else None."""
        return self.wisk if self.enabled else None


@dataclass
class FcConfig(_Section):
    _section = "fc"
    mode: Literal["replicated", "sharded"] = "replicated"
    sample_rate: float = _field(1.0, gt=0.0, le=1.0)  # partial FC: fraction of classes per step
    backend: Literal["auto", "torch", "chunked", "triton"] = "auto"
    chunk_size: int = _field(8192, ge=1)


@dataclass
class OptimConfig(_Section):
    _section = "optim"
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = _field(0.1, gt=0.0)
    momentum: float = _field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _field(5e-4, ge=0.0)
    betas: list[float] = _field(factory=lambda: [0.9, 0.999], ge=0.0, lt=1.0, length=2)
    eps: float = _field(1e-8, gt=0.0)
    grad_clip: float = _field(0.0, ge=0.0)  # max global grad norm; 0 = off
    accum_steps: int = _field(1, ge=1)


@dataclass
class ScheduleConfig(_Section):
    _section = "schedule"
    name: Literal["cosine", "poly"] = "cosine"
    epochs: int = _field(20, ge=1)
    warmup_epochs: float = _field(3.0, ge=0.0)  # linear warm-up, fractions allowed
    min_lr: float = _field(0.0, ge=0.0)
    poly_power: float = _field(2.0, gt=0.0)

    def _check(self) -> None:
        self._require(self.warmup_epochs < self.epochs, ["warmup_epochs", "epochs"],
                      f"need warmup_epochs < epochs, got {self.warmup_epochs} >= {self.epochs}")


@dataclass
class TrainConfig(_Section):
    _section = "train"
    batch_size: int = _field(512, ge=1)  # GLOBAL batch over all ranks
    seed: int = _field(42, ge=0, lt=2**32)
    amp: Literal["bf16", "fp16", "none", "auto"] = "auto"  # auto: bf16 on CUDA, none on CPU
    compile: bool = False
    output_dir: str = "runs"
    name: str = "default"  # the run folder is output_dir/name
    resume: str = ""  # "" = fresh, "auto" = latest checkpoint of this run, or a checkpoint path
    save_every: int = _field(1000, ge=0)  # steps; 0 = no step checkpoints
    keep_last: int = _field(3, ge=1)
    log_every: int = _field(50, ge=1)
    max_nonfinite: int = _field(10, ge=0)  # non-finite losses tolerated before stopping
    max_steps: int = _field(0, ge=0)  # 0 = no limit
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EvalConfig(_Section):
    """Verification during training; ``bins`` empty means ``data.val_bins``."""

    _section = "eval"
    bins: list[str] = _field(factory=list)
    every: int = _field(2000, ge=0)  # steps; 0 = off
    batch_size: int = _field(256, ge=1)
    flip: Flip = "sum"
    n_folds: int = _field(10, ge=2)


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
        hints = _hints(Config)
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if not isinstance(section, hints[f.name]):
                raise ConfigError(f"{f.name}: expected {hints[f.name].__name__}, got "
                                  f"{_describe(section)}", [f.name])
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
        return _load_tree(cls, copy.deepcopy(dict(data)), {}, "config")


# ----------------------------------------------------------------------------- evaluation data
@dataclass
class EvalDataConfig(_Section):
    """An evaluation benchmark for ``python -m unpg.evaluate --data FILE``."""

    benchmark: Literal["bins", "ijbb", "ijbc", "kface"]
    root: str  # dataset folder
    names: list[str] = _field(factory=list)  # bins: .bin file stems (lfw, cfp_fp, ...)
    image_size: int = _field(112, ge=1)
    batch_size: int = _field(256, ge=1)
    flip: Flip = "sum"
    normalize: Normalize = "insightface"  # must match the training config's data.normalize
    score_weighting: bool = False  # IJB: weight by detector score
    variant: Literal["insightface", "seed"] = "insightface"  # IJB: seed = its pre-aligned list
    pairs: list[str] = _field(factory=list)  # kface: Q1..Q4 pair files
    fars: list[float] = _field(factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], gt=0.0, le=1.0)
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
                      "the seed's pre-aligned list has no detector scores: "
                      "set score_weighting: false or variant: insightface")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalDataConfig:
        return _load_tree(cls, copy.deepcopy(dict(data)), {}, "config")


# ----------------------------------------------------------------------------- loading
def _checked_tree(cls: type, tree: Any, prefix: str, where: str) -> dict[str, Any]:
    """Reject unknown keys (naming ``where``); return a copy with empty sections as {}."""
    if not isinstance(tree, Mapping):
        what = f"section '{prefix[:-1]}'" if prefix else "the top level"
        raise ConfigError(f"{where}: {what} must be a mapping of keys, got {_describe(tree)}",
                          located=True)
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kind = "section" if all(_is_section(hints[n]) for n in names) else "key"
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            scope = f" in '{prefix[:-1]}'" if prefix else ""
            raise ConfigError(f"{where}: unknown {kind} '{dotted}' (given: {_short(value)})"
                              f"{_did_you_mean(key, names, prefix)}; allowed {kind}s{scope}: "
                              f"{', '.join(names)}", [dotted], located=True)
        if _is_section(hints[key]):
            value = _checked_tree(hints[key], {} if value is None else value, dotted + ".", where)
        out[key] = value
    return out


def _leaves(cls: type, tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    hints = _hints(cls)
    out: list[str] = []
    for key, value in tree.items():
        if _is_section(hints[key]):
            out += _leaves(hints[key], value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), Mapping):
            dst[key] = _deep_merge(dict(dst[key]), value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


def _read_file(cls: type, path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged tree of ``path`` and its ``base:`` chain, and the file each leaf came from."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise ConfigError(f"{chain[-1]}: 'base:' cycle: {cycle}", located=True)
    if not path.is_file():
        hint = f" (named by 'base:' in {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file not found: {path}{hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}", located=True) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got "
                          f"{_describe(raw)}", located=True)
    raw = dict(raw)
    base = raw.pop("base", None)
    own = _checked_tree(cls, raw, "", str(path))
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: 'base' must be a file path relative to this file, got "
                              f"{_describe(base)}", located=True)
        tree, sources = _read_file(cls, path.parent / base, chain + (resolved,))
    _deep_merge(tree, own)
    sources.update({leaf: str(path) for leaf in _leaves(cls, own)})
    return tree, sources


def _apply_override(cls: type, tree: dict[str, Any], sources: dict[str, str], text: str) -> None:
    if not isinstance(text, str) or "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"malformed override {text!r}: expected key=value, e.g. optim.lr=0.05",
                          located=True)
    key, raw = (part.strip() for part in text.split("=", 1))
    parts = key.split(".")
    node, owner = tree, cls
    for i, part in enumerate(parts):
        hints = _hints(owner)
        names = [f.name for f in dataclasses.fields(owner)]
        dotted = ".".join(parts[: i + 1])
        prefix = ".".join(parts[:i]) + "." if i else ""
        if part not in names:
            kind = "section" if all(_is_section(hints[n]) for n in names) else "key"
            raise ConfigError(f"override {text!r}: unknown {kind} '{dotted}'"
                              f"{_did_you_mean(part, names, prefix)}; allowed {kind}s"
                              f"{f' in {prefix[:-1]!r}' if i else ''}: {', '.join(names)}",
                              [dotted], located=True)
        hint, last = hints[part], i == len(parts) - 1
        if _is_section(hint) and last:
            first = dataclasses.fields(hint)[0].name
            raise ConfigError(f"override {text!r}: '{dotted}' is a section; set its keys one by "
                              f"one, e.g. {dotted}.{first}=VALUE", [dotted], located=True)
        if not _is_section(hint) and not last:
            raise ConfigError(f"override {text!r}: '{dotted}' is a value, not a section",
                              [dotted], located=True)
        if not last:
            node, owner = node.setdefault(part, {}), hint
            continue
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {text!r}: the value is not valid YAML: {exc}",
                              [dotted], located=True) from None
        if hint is str and not isinstance(value, str):
            value = raw  # train.name=2024 or data.rec= mean the text itself
        node[part] = value
        sources[dotted] = f"override {text!r}"


def _load_tree(cls: type, tree: dict[str, Any], sources: dict[str, str], where: str) -> Any:
    """Check keys, build the (self-validating) dataclass; locate validation errors."""
    try:
        tree = _checked_tree(cls, tree, "", where)
        return _build(cls, tree, "")
    except ConfigError as exc:
        if exc.located:
            raise
        keys = [k.split("[")[0] for k in exc.keys]  # optim.betas[1] was set as optim.betas
        origins = list(dict.fromkeys(sources[k] for k in keys if k in sources)) or [where]
        tail = f" [loading {where}]" if where not in origins and where != "config" else ""
        raise ConfigError(f"{' and '.join(origins)}: {exc}{tail}", exc.keys, located=True) from None


def _build(cls: type, tree: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in tree:
            value = tree[f.name]
            kwargs[f.name] = _build(hints[f.name], value, f"{prefix}{f.name}.") if _is_section(
                hints[f.name]) else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            hint = hints[f.name]
            wanted = (", ".join(map(repr, get_args(hint))) if get_origin(hint) is Literal
                      else _type_name(hint))
            raise ConfigError(f"{prefix}{f.name}: missing required key (give {wanted})",
                              [f"{prefix}{f.name}"])
    return cls(**kwargs)


def _load(cls: type, path: Union[str, Path, None], overrides: Sequence[str]) -> Any:
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got one string "
                          f"{overrides!r}")
    where = str(path) if path is not None else "config"
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        tree, sources = _read_file(cls, Path(path), ())
    for text in overrides:
        _apply_override(cls, tree, sources, text)
    return _load_tree(cls, tree, sources, where)


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Load a training config: defaults < ``base:`` chain < file < ``key=value`` overrides."""
    return _load(Config, path, overrides)


def load_eval_data_config(path: Union[str, Path, None] = None,
                          overrides: Sequence[str] = ()) -> EvalDataConfig:
    """Load an evaluation-data config (``configs/data/*.yaml``) with the same rules."""
    return _load(EvalDataConfig, path, overrides)


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
