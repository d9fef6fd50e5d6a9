"""Typed configuration machinery: dataclass sections that check their own fields, YAML files
with ``base:`` inheritance, dotted ``key=value`` overrides and errors that name their source.

The schema (which sections and keys exist) lives in ``unpg.config``; this module knows nothing
about training. A section is a dataclass deriving from ``Section``: types come from its
annotations, ranges from ``field_(default, ge=..., lt=..., length=...)``, rules between its
fields from ``_check``. ``load(cls, path, overrides)`` reads a file (and its ``base:`` chain),
applies the overrides and builds ``cls``; every problem is a ``ConfigError`` naming the file or
override, the dotted key, what was given and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "Section", "describe", "field_", "hints", "load", "load_tree"]


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


class Section:
    """Base of the leaf dataclasses: checks types and ranges of every field on construction."""

    _section = ""  # dotted prefix used in messages ("" for a flat, top-level config)

    def __post_init__(self) -> None:
        self.validate()

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def validate(self) -> Section:
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


# ----------------------------------------------------------------------------- loading
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



# Public names for the schema module.
field_ = _field
hints = _hints
describe = _describe
load = _load
load_tree = _load_tree
