"""Backbones: registry behaviour, insightface-compatible IResNets, MobileFaceNet, precision.

The insightface expectations (key layout, parameter counts) are built here from the published
layer counts and layout rules, independently of ``unpg.models``.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unpg.models import build_backbone, list_models, register_model
from unpg.models import registry as registry_mod
from unpg.models.iresnet import IRESNET_ARGS
from unpg.tools.weights_import import infer_backbone

EMB = 64  # small embedding for speed; insightface checks use the released 512
SIZE = 112

IRESNET_LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
# Parameter counts of insightface's arcface_torch IResNets with a 512-d embedding (frozen
# ``features.weight`` included).
IRESNET_PARAMS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
}


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g)


def _randomise_and_calibrate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN/PReLU non-trivial values, set running stats from one batch, switch to eval.

    With insightface's N(0, 0.1) conv init and default running stats (0, 1) eval-mode
    activations grow by orders of magnitude per block; calibrated stats keep outputs O(1) so
    absolute tolerances mean something, and random affine values make the checks sensitive
    to every BN/PReLU parameter.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch sets the stats exactly
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.5 * torch.rand(m.weight.shape, generator=g))
        model.train()
        model(_images(4, seed + 100))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _calibrated_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _randomise_and_calibrate(build_backbone(name, embedding_size=EMB)).state_dict()


def _calibrated(name: str, **kwargs) -> nn.Module:
    """A fresh ``EMB``-d model (built with ``kwargs``) holding the cached calibrated weights."""
    model = build_backbone(name, embedding_size=EMB, **kwargs)
    model.load_state_dict(_calibrated_state(name), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- whole registry

# Same IResNet code as iresnet18/34/50, which get the full gradient check;
# on 2 CPU cores their forward+backward would take most of this file's time budget.
FORWARD_ONLY = {"iresnet100", "iresnet200"}


@pytest.mark.parametrize("name", list_models())
def test_every_backbone_trains(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=EMB).train()
    if name in FORWARD_ONLY:
        with torch.no_grad():
            out = model(_images(2, seed=1))
        assert out.shape == (2, EMB) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        return
    # Batch 3, not 2: a train-mode BN1d over 2 samples outputs ±1 whatever its input, so no
    # gradient would reach the body. The loss is a fixed random projection rather than
    # out.square().sum(): with BN1d last, the per-column sum of squares is constant (= N·w²+N·b²),
    # which would zero every gradient except the BN shift's.
    out = model(_images(3, seed=1))
    assert out.shape == (3, EMB)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * proj).sum().backward()

    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads, "no trainable parameters"
    for pname, grad in grads.items():
        assert grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient in {pname}"
    # A bias feeding straight into a train-mode BN has an exactly zero gradient (BN removes
    # the batch mean); that is iresnet's fc.bias. Everything else must learn.
    zero_by_construction = {"fc.bias"} if name.startswith("iresnet") else set()
    for pname, grad in grads.items():
        scale = grad.abs().max().item()
        if pname in zero_by_construction:
            ref = grads["fc.weight"].abs().max().item()
            assert scale <= 1e-4 * ref, f"{name}: {pname} should get ~0 gradient through BN"
        else:
            assert scale > 1e-10, f"{name}: {pname} has an all-zero gradient"


# --------------------------------------------------------------------------- insightface layout

def _insightface_iresnet_layout(layers: tuple[int, ...], emb: int) -> dict[str, tuple[int, ...]]:
    """State-dict key → shape of arcface_torch's IResNet, from its layout rules."""
    exp: dict[str, tuple[int, ...]] = {}

    def conv(key: str, out_ch: int, in_ch: int, k: int) -> None:
        exp[f"{key}.weight"] = (out_ch, in_ch, k, k)

    def bn(key: str, c: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            exp[f"{key}.{suffix}"] = (c,)
        exp[f"{key}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 3)
    bn("bn1", 64)
    exp["prelu.weight"] = (64,)
    in_ch = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(count):
            key = f"layer{stage}.{b}"
            cin = in_ch if b == 0 else width
            bn(f"{key}.bn1", cin)
            conv(f"{key}.conv1", width, cin, 3)
            bn(f"{key}.bn2", width)
            exp[f"{key}.prelu.weight"] = (width,)
            conv(f"{key}.conv2", width, width, 3)
            bn(f"{key}.bn3", width)
            if b == 0:  # every stage opens with stride 2, hence a projection shortcut
                conv(f"{key}.downsample.0", width, cin, 1)
                bn(f"{key}.downsample.1", width)
        in_ch = width
    bn("bn2", 512)
    exp["fc.weight"] = (emb, 512 * 7 * 7)
    exp["fc.bias"] = (emb,)
    bn("features", emb)
    return exp


def _is_buffer_key(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.parametrize("name", sorted(IRESNET_LAYERS))
def test_iresnet_matches_insightface_layout(name: str) -> None:
    model = build_backbone(name)  # 512-d, as released
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == IRESNET_PARAMS[name]

    expected = _insightface_iresnet_layout(IRESNET_LAYERS[name], 512)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), (
        f"missing {sorted(set(expected) - set(got))[:5]}, extra {sorted(set(got) - set(expected))[:5]}"
    )
    mismatched = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not mismatched, mismatched
    # The layout's own parameter total agrees with the published count.
    layout_params = sum(
        torch.Size(s).numel() for k, s in expected.items() if not _is_buffer_key(k)
    )
    assert layout_params == IRESNET_PARAMS[name]

    # insightface freezes the embedding BN's scale at 1.
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


def test_iresnet_init_follows_insightface() -> None:
    torch.manual_seed(0)
    model = build_backbone("iresnet18")
    w = model.layer3[1].conv1.weight  # 256·256·9 samples of N(0, 0.1)
    assert abs(w.std().item() - 0.1) < 2e-3 and abs(w.mean().item()) < 2e-3
    assert torch.equal(model.layer2[0].bn2.weight, torch.ones(128))
    assert torch.equal(model.layer2[0].bn2.bias, torch.zeros(128))


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet_s"])
def test_state_dict_round_trip_through_file(name: str, tmp_path) -> None:
    src = _calibrated(name)
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = build_backbone(name, embedding_size=EMB)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    dst.load_state_dict(loaded, strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    dst.eval()
    x = _images(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    if name.startswith("iresnet"):
        assert not dst.features.weight.requires_grad  # loading keeps the scale frozen


# --------------------------------------------------------------------------- forward semantics

def _functional_iresnet(sd: dict[str, torch.Tensor], layers: tuple[int, ...],
                        x: torch.Tensor) -> torch.Tensor:
    """arcface_torch's IResNet forward in eval mode, written with torch.nn.functional."""

    def bn(t: torch.Tensor, key: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{key}.running_mean"], sd[f"{key}.running_var"],
                            sd[f"{key}.weight"], sd[f"{key}.bias"], training=False, eps=1e-5)

    x = F.prelu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"), sd["prelu.weight"])
    for stage, count in enumerate(layers, start=1):
        for b in range(count):
            key = f"layer{stage}.{b}"
            stride = 2 if b == 0 else 1
            y = F.conv2d(bn(x, f"{key}.bn1"), sd[f"{key}.conv1.weight"], padding=1)
            y = F.prelu(bn(y, f"{key}.bn2"), sd[f"{key}.prelu.weight"])
            y = bn(F.conv2d(y, sd[f"{key}.conv2.weight"], stride=stride, padding=1), f"{key}.bn3")
            if b == 0:
                x = bn(F.conv2d(x, sd[f"{key}.downsample.0.weight"], stride=stride),
                       f"{key}.downsample.1")
            x = y + x
    x = bn(x, "bn2").flatten(1)
    return bn(F.linear(x, sd["fc.weight"], sd["fc.bias"]), "features")


def test_iresnet18_forward_matches_functional_reference() -> None:
    model = _calibrated("iresnet18")
    x = _images(3, seed=7)
    with torch.no_grad():
        out = model(x)
        sd = {k: v.double() for k, v in model.state_dict().items() if not k.endswith("tracked")}
        ref = _functional_iresnet(sd, IRESNET_LAYERS["iresnet18"], x.double()).float()
    assert ref.abs().max() > 0.1  # calibrated: the comparison is not between tiny numbers
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet_s"])
def test_channels_last_matches_nchw(name: str) -> None:
    ref_model = _calibrated(name)
    cl_model = _calibrated(name, channels_last=True)
    convs = [m for m in cl_model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = _images(2, seed=3)  # plain NCHW input: the model converts it
    with torch.no_grad():
        torch.testing.assert_close(cl_model(x), ref_model(x), rtol=0, atol=1e-4)


def _last_body_module(model: nn.Module) -> nn.Module:
    return model.layer4 if hasattr(model, "layer4") else model.layers[-1]


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet_s"])
def test_outer_autocast_keeps_head_float32(name: str) -> None:
    model = _calibrated(name)
    seen = []
    _last_body_module(model).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = _images(2, seed=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert seen == [torch.bfloat16]  # the body did run under the caller's autocast
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet_s"])
def test_fp16_flag_runs_body_in_amp_dtype(name: str) -> None:
    ref = _calibrated(name)
    amp = _calibrated(name, fp16=True, amp_dtype="bfloat16")
    seen = []
    _last_body_module(amp).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = _images(2, seed=6)
    with torch.no_grad():
        out, want = amp(x), ref(x)
    assert seen == [torch.bfloat16]
    assert out.dtype == torch.float32
    # bf16 keeps ~3 significant digits; the embeddings must still point the same way.
    cos = F.cosine_similarity(out, want, dim=1)
    assert (cos > 0.98).all(), cos


def test_dropout_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = build_backbone("iresnet18", embedding_size=EMB, dropout=0.5).train()
    x = _images(3, seed=8)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_zero_init_residual_makes_blocks_identity() -> None:
    model = build_backbone("iresnet18", embedding_size=EMB, zero_init_residual=True).eval()
    block = model.layer2[1]  # no downsample: the block must return its input
    x = torch.randn(2, 128, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)


# --------------------------------------------------------------------------- registry and errors

@pytest.mark.parametrize("alias", ["iresnet-34", "IResNet_34", "iresnet34", "r34"])
def test_aliases_build_iresnet34(alias: str) -> None:
    model = build_backbone(alias)
    assert sum(p.numel() for p in model.parameters()) == IRESNET_PARAMS["iresnet34"]


def test_seed_hyphenated_iresnet100_alias() -> None:
    assert registry_mod.resolve_name("iresnet-100") == "iresnet100"
    assert registry_mod.resolve_name("MBF") == "mobilefacenet"


def test_unknown_name_lists_known_models_and_suggests() -> None:
    with pytest.raises(ValueError) as info:
        build_backbone("iresnet101")
    msg = str(info.value)
    assert "iresnet101" in msg
    assert ", ".join(sorted(list_models())) in msg
    assert "Did you mean 'iresnet100'" in msg


def test_registry_lists_expected_models() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(IRESNET_LAYERS) | {"mobilefacenet", "mobilefacenet_s"} <= set(names)


def test_register_model_adds_builder_and_rejects_spelling_collisions(monkeypatch) -> None:
    monkeypatch.setattr(registry_mod, "_MODELS", dict(registry_mod._MODELS))

    @register_model
    def tiny_net(embedding_size: int = 4) -> nn.Module:
        return nn.Linear(2, embedding_size)

    assert "tiny_net" in list_models()
    assert build_backbone("Tiny-Net", embedding_size=3).out_features == 3

    def tinynet() -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="collides"):
        register_model(tinynet)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("mobilefacenet", {"dropout": 0.1}, "no dropout layer"),
        ("iresnet18", {"embedding_dim": 128}, "embedding_dim.*accepted options"),
        ("iresnet18", {"embedding_size": 0}, "embedding_size"),
        ("iresnet18", {"dropout": 1.5}, "dropout"),
        ("iresnet18", {"amp_dtype": "int8"}, "amp_dtype"),
        ("mobilefacenet", {"scale": 0}, "scale"),
        ("mobilefacenet", {"expansion": 0.3}, "expansion"),
        ("mobilefacenet_s", {"blocks": (1, 2, 3)}, "blocks"),
    ],
)
def test_bad_options_raise_value_error(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(name, **kwargs)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet_s"])
@pytest.mark.parametrize("shape", [(2, 3, 96, 96), (2, 3, 112), (2, 1, 112, 112)])
def test_wrong_input_shape_raises(name: str, shape: tuple[int, ...]) -> None:
    model = build_backbone(name, embedding_size=EMB).eval()
    with pytest.raises(ValueError, match="112"):
        model(torch.zeros(shape))


def test_integer_images_rejected() -> None:
    model = build_backbone("mobilefacenet_s", embedding_size=EMB).eval()
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))


def test_one_iresnet_table_drives_builders_and_weight_inference() -> None:
    assert {n: tuple(a["layers"]) for n, a in IRESNET_ARGS.items()} == IRESNET_LAYERS
    for name, args in IRESNET_ARGS.items():
        with torch.device("meta"):  # no memory: only the key layout is needed
            sd = build_backbone(name, embedding_size=EMB).state_dict()
        assert infer_backbone(sd) == (name, EMB)
        assert str(args["layers"]) in registry_mod._MODELS[name].__doc__
