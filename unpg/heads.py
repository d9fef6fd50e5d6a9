"""Margin heads: target-logit transforms on *unscaled* cosines, applied to the label column only.

A head maps the target cosine ``z_i = x̂_i·ŵ_{y_i}`` of each sample to its margin logit
``psi_i`` (still unscaled: the loss multiplies by ``head.s``) and may add a regulariser on the
embedding norms (MagFace). Heads work on length-B vectors only, so the B×C cosine matrix never
passes through them; the non-target columns are untouched cosines (see ``unpg.losses``).

What the official code (github jung-jun-uk/UNPG, ``recognition/models/head.py``, ``magface.py``) does:
- ArcFace: ``cosine.acos_(); cosine[index] += m_hot; cosine.cos_()`` -- plain
  ``cos(acos z + m)``, with *no* ``th``/``mm`` fallback and *no* easy margin. Our default head is
  therefore plain ``cos(theta + m)``, written ``z·cos m − sqrt(1 − z²)·sin m`` (the same function
  on [-1, 1], so also past theta + m > pi; only within 1e-12 of 1 − z² = 0 does the floor of the
  square root shift it, by at most 1e-6·sin m). The sqrt form is what the Triton path can
  evaluate: the interpreter has no libdevice ``acos``.
- MagFace: ``a = ‖f‖.clamp(l_a, u_a)`` with autograd through the clamp (zero gradient outside
  the range) and through the adaptive margin; ``cos`` clamped to [-1, 1]; sqrt form; easy
  margin ``where(cos > 0, cos_m, cos)``; regulariser ``mean(a/u_a² + 1/a)`` times ``lambda_g``.
- CosFace: ``z − m``.

# B: batch
"""
from __future__ import annotations

import abc
import math
from numbers import Real
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch

__all__ = [
    "ArcFaceHead",
    "CombinedHead",
    "CosFaceHead",
    "HEAD_PARAMS",
    "HeadParamError",
    "MagFaceHead",
    "MarginHead",
    "build_head",
    "check_head_params",
    "head_param_names",
]

# Floor of 1 − z² under the square root: keeps d sin/dz finite at z = ±1 (there the clamp
# cuts the gradient, so dψ/dz = cos m) while leaving every |z| < 1 − 5e-13 exact.
SIN_SQ_EPS = 1e-12
# acos is only used by the combined head (m1 ≠ 1 needs θ itself); its derivative is infinite at
# ±1, so z is clamped to [−1 + eps, 1 − eps] (representable in float32: spacing near 1 is 6e-8).
ACOS_EPS = 1e-7

ARCFACE_GRADS = ("exact", "straight_through")


def _cos_plus_margin(cos_B: torch.Tensor, cos_m, sin_m) -> torch.Tensor:
    """``cos(θ + m)`` from ``cos θ`` without acos: ``cos θ·cos m − sin θ·sin m``."""
    sin_B = torch.sqrt(torch.clamp(1.0 - cos_B * cos_B, min=SIN_SQ_EPS))
    return cos_B * cos_m - sin_B * sin_m


class MarginHead(abc.ABC):
    """Base class: ``target_logit(cos_target_B, emb_norm_B)`` and ``regularizer(emb_norm_B)``."""

    name: str = ""

    def __init__(self, s: float) -> None:
        self.s = float(s)

    @abc.abstractmethod
    def target_logit(self, cos_target_B: torch.Tensor, emb_norm_B: torch.Tensor) -> torch.Tensor:
        """Unscaled margin logit ``psi_B`` of the target column from its cosine ``cos_target_B``
        and the unnormalised embedding norms ``emb_norm_B`` (used by MagFace only)."""

    def regularizer(self, emb_norm_B: torch.Tensor) -> torch.Tensor:
        """Extra loss term on the embedding norms; a 0-dim zero for heads without one."""
        return emb_norm_B.new_zeros(())

    def params(self) -> Dict[str, Any]:
        """The parameters that rebuild this head through ``build_head(self.name, **params)``."""
        return {key: getattr(self, key) for key in _required(self.name) + _optional(self.name)}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({body})"


class ArcFaceHead(MarginHead):
    """ArcFace ``cos(θ + m)``; ``arcface_grad`` picks the exact or insightface's gradient."""

    name = "arcface"

    def __init__(self, s: float, m: float, arcface_grad: str = "exact") -> None:
        super().__init__(s)
        self.m = float(m)
        self.arcface_grad = arcface_grad
        self._cos_m, self._sin_m = math.cos(self.m), math.sin(self.m)

    def target_logit(self, cos_target_B: torch.Tensor, emb_norm_B: torch.Tensor) -> torch.Tensor:
        psi_B = _cos_plus_margin(cos_target_B, self._cos_m, self._sin_m)
        if self.arcface_grad == "straight_through":
            # insightface arcface_torch applies arccos/cos under no_grad: dψ/dz = 1.
            return cos_target_B + (psi_B - cos_target_B).detach()
        return psi_B


class CosFaceHead(MarginHead):
    """CosFace ``z − m``."""

    name = "cosface"

    def __init__(self, s: float, m: float) -> None:
        super().__init__(s)
        self.m = float(m)

    def target_logit(self, cos_target_B: torch.Tensor, emb_norm_B: torch.Tensor) -> torch.Tensor:
        return cos_target_B - self.m


class MagFaceHead(MarginHead):
    """MagFace: ArcFace with a norm-dependent margin ``m(a)``, easy margin, and a norm regulariser."""

    name = "magface"

    def __init__(
        self, s: float, l_margin: float, u_margin: float, l_a: float, u_a: float, lambda_g: float
    ) -> None:
        super().__init__(s)
        self.l_margin, self.u_margin = float(l_margin), float(u_margin)
        self.l_a, self.u_a = float(l_a), float(u_a)
        self.lambda_g = float(lambda_g)

    def magnitude(self, emb_norm_B: torch.Tensor) -> torch.Tensor:
        """``a = clamp(‖f‖, l_a, u_a)``; like the official code, the gradient passes the clamp (0 outside)."""
        return torch.clamp(emb_norm_B, self.l_a, self.u_a)

    def margin(self, a_B: torch.Tensor) -> torch.Tensor:
        """``m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m``."""
        slope = (self.u_margin - self.l_margin) / (self.u_a - self.l_a)
        return slope * (a_B - self.l_a) + self.l_margin

    def target_logit(self, cos_target_B: torch.Tensor, emb_norm_B: torch.Tensor) -> torch.Tensor:
        m_B = self.margin(self.magnitude(emb_norm_B))
        cos_B = torch.clamp(cos_target_B, -1.0, 1.0)  # the official code clamps before the sqrt
        psi_B = _cos_plus_margin(cos_B, torch.cos(m_B), torch.sin(m_B))
        # Easy margin, as the official code (MagLinear easy_margin=True): keep cos where cos <= 0.
        return torch.where(cos_B > 0, psi_B, cos_B)

    def regularizer(self, emb_norm_B: torch.Tensor) -> torch.Tensor:
        a_B = self.magnitude(emb_norm_B)
        return self.lambda_g * torch.mean(a_B / (self.u_a**2) + 1.0 / a_B)


class CombinedHead(MarginHead):
    """insightface's general form ``cos(m1·θ + m2) − m3`` (needs θ itself: acos, clamped)."""

    name = "combined"

    def __init__(self, s: float, m1: float, m2: float, m3: float) -> None:
        super().__init__(s)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def target_logit(self, cos_target_B: torch.Tensor, emb_norm_B: torch.Tensor) -> torch.Tensor:
        # Length-B only, in torch: the Triton path never evaluates this (ψ arrives precomputed).
        theta_B = torch.acos(torch.clamp(cos_target_B, -1.0 + ACOS_EPS, 1.0 - ACOS_EPS))
        return torch.cos(self.m1 * theta_B + self.m2) - self.m3


# name -> (class, required params, optional params with defaults)
HEAD_PARAMS: Dict[str, Tuple[type, Tuple[str, ...], Dict[str, Any]]] = {
    "arcface": (ArcFaceHead, ("s", "m"), {"arcface_grad": "exact"}),
    "cosface": (CosFaceHead, ("s", "m"), {}),
    "magface": (MagFaceHead, ("s", "l_margin", "u_margin", "l_a", "u_a", "lambda_g"), {}),
    "combined": (CombinedHead, ("s", "m1", "m2", "m3"), {}),
}


def _required(name: str) -> Tuple[str, ...]:
    return HEAD_PARAMS[name][1]


def _optional(name: str) -> Tuple[str, ...]:
    return tuple(HEAD_PARAMS[name][2])


class HeadParamError(ValueError):
    """A head parameter out of its rules; ``keys`` names the parameters involved (the config
    reports them as ``head.<key>``)."""

    def __init__(self, head: str, keys: Sequence[str], reason: str) -> None:
        super().__init__(f"head {head!r}: {reason}")
        self.head, self.keys, self.reason = head, tuple(keys), reason


def _check_number(head: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise HeadParamError(head, [key], f"parameter {key!r} must be a finite number, got {value!r}")
    return float(value)


def _require(ok: bool, head: str, keys: Sequence[str], reason: str) -> None:
    if not ok:
        raise HeadParamError(head, keys, reason)


def check_head_params(name: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    """The rules of every head, in one place (``build_head`` and ``HeadConfig`` both use them):
    exactly the head's parameters, finite numbers, and the ranges that keep the margin on the
    decreasing branch of cos. Returns the validated values; raises ``HeadParamError``."""
    if not isinstance(name, str) or name not in HEAD_PARAMS:
        raise HeadParamError(str(name), ["name"],
                             f"unknown head {name!r}; choose one of {sorted(HEAD_PARAMS)}")
    _, required, optional = HEAD_PARAMS[name]
    allowed = set(required) | set(optional)
    unknown = sorted(set(params) - allowed)
    _require(not unknown, name, unknown, f"unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [key for key in required if key not in params]
    _require(not missing, name, missing, f"missing parameter(s) {missing}; required: {list(required)}")
    v = {key: _check_number(name, key, params[key]) for key in required}
    _require(v["s"] > 0, name, ["s"], f"scale 's' must be > 0, got {v['s']}")
    if name == "arcface":
        _require(0 <= v["m"] < math.pi, name, ["m"], f"ArcFace needs 0 <= m < pi, got {v['m']}")
        grad = params.get("arcface_grad", optional["arcface_grad"])
        _require(grad in ARCFACE_GRADS, name, ["arcface_grad"],
                 f"arcface_grad must be one of {list(ARCFACE_GRADS)}, got {grad!r}")
        v["arcface_grad"] = grad
    elif name == "combined":
        _require(v["m1"] > 0, name, ["m1"], f"needs m1 > 0, got {v['m1']}")
        _require(0 <= v["m2"] < math.pi, name, ["m2"], f"needs 0 <= m2 < pi, got {v['m2']}")
    elif name == "magface":
        _require(0 < v["l_a"] < v["u_a"], name, ["l_a", "u_a"],
                 f"need 0 < l_a < u_a, got l_a={v['l_a']} and u_a={v['u_a']}")
        _require(0 <= v["l_margin"] <= v["u_margin"], name, ["l_margin", "u_margin"],
                 f"need 0 <= l_margin <= u_margin, got {v['l_margin']} and {v['u_margin']}")
        # Easy margin: the margin applies only where theta < pi/2, so theta + m stays on the
        # decreasing branch of cos exactly when m <= pi/2.
        _require(v["u_margin"] <= math.pi / 2, name, ["u_margin"],
                 f"MagFace needs u_margin <= pi/2 (1.5708), got {v['u_margin']}")
        _require(v["lambda_g"] >= 0, name, ["lambda_g"], f"lambda_g must be >= 0, got {v['lambda_g']}")
    return v


def head_param_names(name: str) -> Tuple[str, ...]:
    """The parameters ``build_head(name, ...)`` takes, required ones first (from HEAD_PARAMS)."""
    return _required(name) + _optional(name)


def build_head(name: str, **params: Any) -> MarginHead:
    """Build a head by name, validating that exactly its parameters are given.

    ``arcface``: ``s, m`` (+ ``arcface_grad`` in ``'exact'|'straight_through'``, default exact);
    ``cosface``: ``s, m``; ``magface``: ``s, l_margin, u_margin, l_a, u_a, lambda_g``;
    ``combined``: ``s, m1, m2, m3``. The rules are ``check_head_params``.
    """
    values = check_head_params(name, params)
    return HEAD_PARAMS[name][0](**values)
