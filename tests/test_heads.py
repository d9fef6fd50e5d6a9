"""Margin heads against analytic forms and hand computations (float64)."""
import math

import pytest
import torch

from unpg.config import HeadConfig
from unpg.heads import (
    HEAD_PARAMS,
    ArcFaceHead,
    CombinedHead,
    CosFaceHead,
    HeadParamError,
    MagFaceHead,
    MarginHead,
    build_head,
    head_param_names,
)

F64 = torch.float64
MAG = dict(s=64.0, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0, lambda_g=35.0)
ALL_HEADS = {
    "arcface": dict(s=64.0, m=0.5),
    "arcface_st": dict(s=64.0, m=0.5, arcface_grad="straight_through"),
    "cosface": dict(s=64.0, m=0.35),
    "magface": MAG,
    "combined": dict(s=64.0, m1=0.9, m2=0.4, m3=0.15),
}


def _head(key):
    return build_head(key.split("_")[0], **ALL_HEADS[key])


def _grad(fn, z):
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z).sum(), z)
    return g


def test_arcface_value_and_exact_derivative_match_acos_form():
    m = 0.5
    head = build_head("arcface", s=64.0, m=m)
    z = torch.linspace(-0.99, 0.99, 199, dtype=F64)
    ones = torch.ones_like(z)
    psi = head.target_logit(z, ones)
    torch.testing.assert_close(psi, torch.cos(torch.acos(z) + m), rtol=1e-12, atol=1e-14)
    g = _grad(lambda t: head.target_logit(t, ones), z)
    analytic = math.cos(m) + z * math.sin(m) / torch.sqrt(1 - z * z)
    torch.testing.assert_close(g, analytic, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(g, _grad(lambda t: torch.cos(torch.acos(t) + m), z), rtol=1e-10, atol=1e-12)


def test_arcface_is_plain_no_easy_margin_or_fallback():
    # The official code uses plain cos(acos z + m): beyond theta + m > pi the value still is cos(theta + m).
    head = build_head("arcface", s=64.0, m=0.5)
    z = torch.tensor([-0.95, -0.5, 0.0, 0.3], dtype=F64)
    expected = torch.tensor([math.cos(math.acos(v) + 0.5) for v in z.tolist()], dtype=F64)
    torch.testing.assert_close(head.target_logit(z, torch.ones_like(z)), expected)


def test_arcface_straight_through_value_and_unit_derivative():
    exact = build_head("arcface", s=64.0, m=0.5)
    st = build_head("arcface", s=64.0, m=0.5, arcface_grad="straight_through")
    z = torch.linspace(-0.99, 0.99, 51, dtype=F64)
    ones = torch.ones_like(z)
    torch.testing.assert_close(st.target_logit(z, ones), exact.target_logit(z, ones))
    torch.testing.assert_close(_grad(lambda t: st.target_logit(t, ones), z), torch.ones_like(z))


def test_cosface_value_and_derivative():
    head = build_head("cosface", s=30.0, m=0.35)
    z = torch.tensor([-1.0, -0.2, 0.0, 0.6, 1.0], dtype=F64)
    torch.testing.assert_close(head.target_logit(z, torch.ones_like(z)), z - 0.35)
    torch.testing.assert_close(_grad(lambda t: head.target_logit(t, t), z), torch.ones_like(z))
    assert head.regularizer(z).item() == 0.0


def test_magface_margin_easy_margin_and_regularizer_by_hand():
    head = build_head("magface", **MAG)
    norms = torch.tensor([5.0, 10.0, 35.0, 60.0, 110.0, 200.0], dtype=F64)
    z = torch.tensor([0.3, -0.2, 0.7, 0.5, 0.0, 0.9], dtype=F64)
    a = [10.0, 10.0, 35.0, 60.0, 110.0, 110.0]
    m = [0.45 + 0.35 / 100.0 * (ai - 10.0) for ai in a]
    assert m[2] == pytest.approx(0.5375) and m[3] == pytest.approx(0.625)
    torch.testing.assert_close(head.margin(head.magnitude(norms)), torch.tensor(m, dtype=F64))
    expected = [
        math.cos(math.acos(zi) + mi) if zi > 0 else zi for zi, mi in zip(z.tolist(), m)
    ]
    torch.testing.assert_close(head.target_logit(z, norms), torch.tensor(expected, dtype=F64))
    reg = 35.0 * sum(ai / 110.0**2 + 1.0 / ai for ai in a) / len(a)
    assert head.regularizer(norms).item() == pytest.approx(reg, rel=1e-13)


def test_magface_norm_gradient_flows_inside_clamp_only():
    head = build_head("magface", **MAG)
    norms = torch.tensor([5.0, 35.0, 60.0, 200.0], dtype=F64, requires_grad=True)
    z = torch.tensor([0.4, 0.4, 0.4, 0.4], dtype=F64)
    (g_psi,) = torch.autograd.grad(head.target_logit(z, norms).sum(), norms)
    assert g_psi[0] == 0 and g_psi[3] == 0  # clamped: like the official code, no gradient outside
    # d/da cos(theta + m(a)) = -sin(theta + m(a)) * slope
    slope = 0.35 / 100.0
    for i in (1, 2):
        mi = 0.45 + slope * (norms[i].item() - 10.0)
        assert g_psi[i].item() == pytest.approx(-math.sin(math.acos(0.4) + mi) * slope, rel=1e-12)
    (g_reg,) = torch.autograd.grad(head.regularizer(norms), norms)
    for i, n in enumerate(norms.tolist()):
        expected = 0.0 if i in (0, 3) else 35.0 / 4 * (1 / 110.0**2 - 1 / n**2)
        assert g_reg[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_combined_general_value_and_reductions():
    z = torch.linspace(-0.98, 0.98, 99, dtype=F64)
    ones = torch.ones_like(z)
    comb = build_head("combined", s=64.0, m1=0.9, m2=0.4, m3=0.15)
    expected = torch.tensor([math.cos(0.9 * math.acos(v) + 0.4) - 0.15 for v in z.tolist()], dtype=F64)
    torch.testing.assert_close(comb.target_logit(z, ones), expected, rtol=1e-12, atol=1e-14)

    as_arc = build_head("combined", s=64.0, m1=1.0, m2=0.5, m3=0.0)
    arc = build_head("arcface", s=64.0, m=0.5)
    torch.testing.assert_close(as_arc.target_logit(z, ones), arc.target_logit(z, ones))
    torch.testing.assert_close(
        _grad(lambda t: as_arc.target_logit(t, ones), z),
        _grad(lambda t: arc.target_logit(t, ones), z),
        rtol=1e-9,
        atol=1e-12,
    )
    as_cos = build_head("combined", s=64.0, m1=1.0, m2=0.0, m3=0.35)
    cos = build_head("cosface", s=64.0, m=0.35)
    torch.testing.assert_close(as_cos.target_logit(z, ones), cos.target_logit(z, ones))
    torch.testing.assert_close(
        _grad(lambda t: as_cos.target_logit(t, ones), z), torch.ones_like(z), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("key", sorted(ALL_HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_at_plus_minus_one(key, dtype):
    head = _head(key)
    z = torch.tensor([-1.0, 1.0, -1.0 + 1e-7, 1.0 - 1e-7], dtype=dtype, requires_grad=True)
    norms = torch.tensor([5.0, 50.0, 110.0, 200.0], dtype=dtype, requires_grad=True)
    out = head.target_logit(z, norms).sum() + head.regularizer(norms)
    gz, gn = torch.autograd.grad(out, [z, norms], allow_unused=True)
    gn = torch.zeros_like(norms) if gn is None else gn  # only MagFace uses the norms
    assert torch.isfinite(out) and torch.isfinite(gz).all() and torch.isfinite(gn).all()


def test_head_classes_and_params_roundtrip():
    expected_cls = {
        "arcface": ArcFaceHead,
        "cosface": CosFaceHead,
        "magface": MagFaceHead,
        "combined": CombinedHead,
    }
    for key in ALL_HEADS:
        head = _head(key)
        assert isinstance(head, expected_cls[head.name]) and isinstance(head, MarginHead)
        rebuilt = build_head(head.name, **head.params())
        assert rebuilt.params() == head.params() and rebuilt.s == 64.0


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("sphereface", dict(s=64.0, m=0.5), "unknown head 'sphereface'.*arcface"),
        ("arcface", dict(s=64.0), r"missing parameter\(s\) \['m'\]"),
        ("arcface", dict(s=64.0, m=0.5, m2=0.1), r"unknown parameter\(s\) \['m2'\].*allowed"),
        ("magface", dict(s=64.0, l_margin=0.45), "missing.*u_margin"),
        ("arcface", dict(s=64.0, m=0.5, arcface_grad="fast"), "arcface_grad must be one of"),
        ("cosface", dict(s=0.0, m=0.35), "'s' must be > 0"),
        ("cosface", dict(s=64.0, m="0.35"), "'m' must be a finite number"),
        ("cosface", dict(s=64.0, m=math.nan), "'m' must be a finite number"),
        ("magface", dict(MAG, l_a=110.0), "0 < l_a < u_a"),
        ("magface", dict(MAG, lambda_g=-1.0), "lambda_g must be >= 0"),
    ],
)
def test_build_head_rejects_bad_input(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_head(name, **params)


# ----------------------------------------------------------------------------- one table, one rule owner
def test_head_config_params_follow_the_heads_table():
    for name, (cls, required, optional) in HEAD_PARAMS.items():
        params = HeadConfig(name=name).params()
        assert tuple(params) == tuple(required) + tuple(optional)
        assert tuple(params) == head_param_names(name)
        head = build_head(name, **params)
        assert isinstance(head, cls) and head.params() == params


@pytest.mark.parametrize("name, params, keys", [
    ("arcface", dict(s=64.0, m=3.2), ("m",)),
    ("combined", dict(s=64.0, m1=1.0, m2=3.5, m3=0.0), ("m2",)),
    ("magface", dict(s=64.0, l_margin=0.45, u_margin=1.8, l_a=10.0, u_a=110.0, lambda_g=35.0),
     ("u_margin",)),
    ("magface", dict(s=64.0, l_margin=0.9, u_margin=0.8, l_a=10.0, u_a=110.0, lambda_g=35.0),
     ("l_margin", "u_margin")),
])
def test_head_rules_live_in_the_heads(name, params, keys):
    with pytest.raises(HeadParamError) as e:
        build_head(name, **params)
    assert e.value.keys == keys
    # The config reaches the same rule and names the head.* keys.
    with pytest.raises(ValueError) as e2:
        HeadConfig(name=name, **params)
    assert all(f"head.{k}" in str(e2.value) for k in keys)
