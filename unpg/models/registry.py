"""Name → builder registry for backbones (timm style).

Builders register themselves with ``@register_model`` under their function ``__name__``;
``build_backbone(name, **kwargs)`` looks a name up and calls the builder. Lookup is forgiving
about spelling the way configs in the wild spell names: case, ``-``, ``_`` and spaces are
ignored (the official code's ``iresnet-34`` is ``iresnet34``), and insightface's arcface_torch short
names (``r100``, ``mbf``) are accepted as aliases.
"""
from __future__ import annotations

import difflib
import inspect
import re
from typing import Callable, TypeVar

from torch import nn

_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Short names used by insightface's arcface_torch configs (``network = "r100"``).
_ALIASES: dict[str, str] = {
    "r18": "iresnet18",
    "r34": "iresnet34",
    "r50": "iresnet50",
    "r100": "iresnet100",
    "r200": "iresnet200",
    "mbf": "mobilefacenet",
    "mbflarge": "mobilefacenet_large",
}


def _normalise(name: str) -> str:
    """Spelling-insensitive key: ``'IResNet-34'``, ``'iresnet_34'`` → ``'iresnet34'``."""
    return re.sub(r"[\s_\-]", "", name.strip().lower())


def register_model(fn: _Builder) -> _Builder:
    """Decorator: register ``fn`` as a backbone builder under ``fn.__name__``."""
    name = fn.__name__
    key = _normalise(name)
    for known, other in _MODELS.items():
        same_origin = (other.__module__, other.__qualname__) == (fn.__module__, fn.__qualname__)
        if _normalise(known) == key and not same_origin:
            # Two builders whose names differ only in spelling would make lookup ambiguous.
            raise ValueError(
                f"register_model: {name!r} collides with already registered {known!r} "
                f"(from {other.__module__}); pick a distinct builder name"
            )
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Canonical names of every registered backbone, sorted."""
    return sorted(_MODELS)


def resolve_name(name: str) -> str:
    """Map a user-given spelling or alias to the canonical registered name.

    Raises ``ValueError`` listing the known names and the closest match for unknown names.
    """
    if not isinstance(name, str):
        raise ValueError(f"backbone name must be a string, got {type(name).__name__}: {name!r}")
    key = _normalise(name)
    by_key = {_normalise(n): n for n in _MODELS}
    if key in by_key:
        return by_key[key]
    alias = _ALIASES.get(key)
    if alias is not None and alias in _MODELS:
        return alias
    known = list_models()
    close = difflib.get_close_matches(key, list(by_key) + list(_ALIASES), n=1, cutoff=0.5)
    hint = ""
    if close:
        suggestion = by_key.get(close[0]) or _ALIASES[close[0]]
        hint = f" Did you mean {suggestion!r}?"
    raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(known)}.{hint}")


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` (any accepted spelling) with ``kwargs``.

    Unknown keyword arguments raise ``ValueError`` naming the options the builder accepts.
    """
    canonical = resolve_name(name)
    builder = _MODELS[canonical]
    accepted = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"backbone {canonical!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted options: {', '.join(accepted)}"
        )
    return builder(**kwargs)
