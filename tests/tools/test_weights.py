"""unpg.tools.weights: insightface state dicts, the official UNPG code's whole-module pickles (through the
restricted unpickler), refusal of malicious pickles, and ONNX export (skipped without onnx)."""
from __future__ import annotations

import copy
import os
import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

from unpg.models import build_backbone
from unpg.tools import weights as W

# A package laid out like the official code written into tmp_path: the same module paths and state-dict layout as the
# paper code's recognition/models (IResNet with avgpool + in-place dropout attributes, ArcFace,
# MagFace with MagLinear [D, C] and a numpy scalar in MagLoss, HeadAndLoss, UNPG). Its forward is
# an independent implementation of IResNet that our imported backbone must reproduce.
SEED_FILES = {
    "models/__init__.py": "",
    "models/iresnet.py": """
        import torch
        from torch import nn

        class IBasicBlock(nn.Module):
            expansion = 1

            def __init__(self, inplanes, planes, stride=1, downsample=None):
                super().__init__()
                self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
                self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
                self.prelu = nn.PReLU(planes)
                self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
                self.downsample = downsample
                self.stride = stride

            def forward(self, x):
                out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
                return out + (x if self.downsample is None else self.downsample(x))

        class IResNet(nn.Module):
            fc_scale = 7 * 7

            def __init__(self, block, layers, num_features=512, drop_lastfc=True):
                super().__init__()
                self.inplanes, self.dilation, self.drop_lastfc = 64, 1, drop_lastfc
                self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
                self.prelu = nn.PReLU(64)
                self.layer1 = self._make_layer(block, 64, layers[0])
                self.layer2 = self._make_layer(block, 128, layers[1])
                self.layer3 = self._make_layer(block, 256, layers[2])
                self.layer4 = self._make_layer(block, 512, layers[3])
                self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
                self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
                if drop_lastfc:
                    self.dropout = nn.Dropout(p=0.4, inplace=True)
                self.fc = nn.Linear(512 * self.fc_scale, num_features)
                self.features = nn.BatchNorm1d(num_features, eps=1e-05)

            def _make_layer(self, block, planes, blocks):
                down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                     nn.BatchNorm2d(planes, eps=1e-05))
                layers = [block(self.inplanes, planes, 2, down)]
                self.inplanes = planes
                layers += [block(planes, planes) for _ in range(1, blocks)]
                return nn.Sequential(*layers)

            def forward(self, x):
                x = self.prelu(self.bn1(self.conv1(x)))
                x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
                x = torch.flatten(self.bn2(x), 1)
                if self.drop_lastfc:
                    x = self.dropout(x)
                return self.features(self.fc(x))
        """,
    "models/head.py": """
        import torch
        from torch import nn

        class ArcFace(nn.Module):
            def __init__(self, in_feature, out_feature, s=64.0, m=0.5):
                super().__init__()
                self.in_feature, self.out_feature, self.s, self.m = in_feature, out_feature, s, m
                self.weight = nn.Parameter(torch.randn(out_feature, in_feature))

        class UNPG(nn.Module):
            def __init__(self, s, wisk=1.0):
                super().__init__()
                self.s, self.wisk = s, wisk
                self.cross_entropy = nn.CrossEntropyLoss()
        """,
    "models/magface.py": """
        import numpy as np
        import torch
        from torch import nn

        class MagLinear(nn.Module):
            def __init__(self, in_features, out_features, s=64.0):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(in_features, out_features))
                self.s, self.easy_margin = s, True

        class MagLoss(nn.Module):
            def __init__(self, l_a, u_a, l_margin, u_margin, scale=64.0):
                super().__init__()
                self.l_a, self.u_a, self.scale = l_a, u_a, scale
                self.cut_off = np.cos(np.pi / 2 - l_margin)
                self.large_value = 1 << 10

        class MagFace(nn.Module):
            def __init__(self, in_feature, out_feature, s=64, l_margin=0.45, u_margin=0.8,
                         l_a=10, u_a=110, lambda_g=35):
                super().__init__()
                self.fc = MagLinear(in_feature, out_feature, s)
                self.l_margin, self.u_margin, self.l_a, self.u_a = l_margin, u_margin, l_a, u_a
                self.lambda_g, self.s = lambda_g, s
                self.mag_loss = MagLoss(l_a, u_a, l_margin, u_margin, s)
        """,
    "models/build.py": """
        from torch import nn
        from .head import ArcFace, UNPG
        from .magface import MagFace

        class HeadAndLoss(nn.Module):
            def __init__(self, in_feature, num_classes, head_name, wisk=None):
                super().__init__()
                self.criterion = nn.CrossEntropyLoss()
                self.head_name, self.head_cfg = head_name, {head_name: {'s': 64.0}}
                if head_name == 'arcface':
                    # the official code wraps the head in DataParallel on multi-GPU runs and saves it so
                    self.head = nn.DataParallel(ArcFace(in_feature, num_classes, s=64.0, m=0.5))
                else:
                    self.head = MagFace(in_feature, num_classes)
                if wisk is not None:
                    self.aux, self.wisk = UNPG(s=64.0, wisk=wisk), wisk
                self.num_gpu = 0
        """,
}


def _sane_init(model: nn.Module, seed: int) -> nn.Module:
    """Random weights/BN statistics that keep activations O(1), so equality checks bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1),
                                  (m.running_mean, -0.1, 0.1), (m.running_var, 0.5, 1.5)):
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 * torch.rand(m.weight.shape, generator=gen))
    return model.eval()


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def seed_checkpoint(tmp_path):
    """Build and torch.save a checkpoint like the official code's from the fake `models` package, then make
    that package unimportable again. Returns a factory (head_name) -> (path, info)."""
    pkg = tmp_path / "seedpkg"
    for rel, text in SEED_FILES.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(text))
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "models" or k.startswith("models.")}

    def make(head_name, forward=True):
        sys.path.insert(0, str(pkg))
        try:
            from models.build import HeadAndLoss
            from models.iresnet import IBasicBlock, IResNet

            model = _sane_init(IResNet(IBasicBlock, [2, 2, 2, 2], num_features=64), seed=1)
            x = _faces(2)
            ref = None
            if forward:
                with torch.no_grad():
                    ref = model(x)
            hl = HeadAndLoss(64, 10, head_name, wisk=1.5 if head_name == "arcface" else None)
            # An optimizer state with momentum buffers, as in the official code's last.pt (lr 0 keeps the
            # weights; a few parameters keep the file small; setting .grad skips a backward).
            small = [model.features.bias, model.layer1[0].prelu.weight]
            opt = torch.optim.SGD(small, lr=0.0, momentum=0.9)
            for p in small:
                p.grad = torch.full_like(p, 1e-3)
            opt.step()
            model.zero_grad()
            path = tmp_path / f"{head_name}_last.pt"
            torch.save({"epoch": 3, "best_acc": 0.75, "backbone": copy.deepcopy(model).eval(),
                        "optimizer": opt.state_dict(), "scheduler": {"niters": 10, "learning_rate": 0.1},
                        "headandloss": copy.deepcopy(hl).eval()}, path)
            head = hl.head.module if head_name == "arcface" else hl.head
            centres = (head.weight if head_name == "arcface" else head.fc.weight.t()).detach().clone()
            state = {k: v.clone() for k, v in model.state_dict().items()}
            return path, {"x": x, "ref": ref, "centres": centres, "state": state}
        finally:
            sys.path.remove(str(pkg))
            for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
                del sys.modules[k]

    yield make
    sys.modules.update(saved)


@pytest.mark.parametrize("head_name", ["arcface", "magface"])
def test_import_seed_checkpoint(seed_checkpoint, tmp_path, head_name):
    # One backbone forward comparison is enough: the MagFace case checks the head and weights.
    path, info = seed_checkpoint(head_name, forward=head_name == "arcface")
    # The official code's classes are gone: plain torch.load cannot even find them, ours needs none.
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)
    w = W.import_weights(path)
    assert (w.model, w.embedding_size, w.source_format) == ("iresnet18", 64, "seed")
    assert w.meta == {"epoch": 3, "best_acc": 0.75}
    assert list(w.state_dict) == list(info["state"])
    assert all(torch.equal(w.state_dict[k], v) for k, v in info["state"].items())
    if info["ref"] is not None:  # our IResNet computes what the official code's computes
        with torch.no_grad():
            emb = w.build()(info["x"])
        torch.testing.assert_close(emb, info["ref"], rtol=1e-5, atol=1e-5)
    assert w.head["head"] == head_name
    torch.testing.assert_close(w.head["weight"], info["centres"], rtol=0, atol=0)
    if head_name == "arcface":
        assert (w.head["s"], w.head["m"], w.head["unpg_wisk"]) == (64.0, 0.5, 1.5)
    else:
        assert (w.head["l_margin"], w.head["u_a"], w.head["lambda_g"]) == (0.45, 110.0, 35.0)

    # CLI: plain state dict + head file, both readable with weights_only=True.
    out = tmp_path / "out" / "r18.pth"
    assert W.main(["import", str(path), "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    build_backbone("iresnet18", embedding_size=64).load_state_dict(sd, strict=True)
    assert list(sd) == list(w.state_dict) and all(torch.equal(sd[k], w.state_dict[k]) for k in sd)
    head = torch.load(out.with_name("r18.head.pth"), weights_only=True)
    assert head["weight"].shape == (10, 64) and head["head"] == head_name
    assert sorted(p.name for p in out.parent.iterdir()) == ["r18.head.pth", "r18.pth"]  # no temporaries


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Eval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_malicious_checkpoints_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"backbone": _System(f"touch {marker}"), "epoch": 1}, bad)
    for fmt in ("auto", "seed"):
        with pytest.raises(W.UnsafeCheckpointError) as e:
            W.import_weights(bad, fmt=fmt)
        assert f"'{os.system.__module__}.system'" in str(e.value) and str(bad) in str(e.value)
    assert not marker.exists()
    # A plain (non-zip) pickle goes through torch's legacy reader, which must be restricted too.
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"backbone": _Eval()}, protocol=4))
    with pytest.raises(W.UnsafeCheckpointError, match="'builtins.eval'"):
        W.load_restricted(raw)
    assert W.main(["import", str(bad), "--out", str(tmp_path / "o.pth")]) == 2
    assert "refusing to unpickle global" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o.pth").exists()


def test_insightface_state_dict_round_trip(tmp_path):
    model = _sane_init(build_backbone("iresnet18", embedding_size=96), seed=2)
    x = _faces(2, seed=3)
    with torch.no_grad():
        ref = model(x)
    plain, ddp = tmp_path / "backbone.pth", tmp_path / "ddp.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict_backbone": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": 7}, ddp)
    w = W.import_weights(plain)
    assert (w.model, w.embedding_size, w.source_format, w.head) == ("iresnet18", 96, "state_dict", None)
    with torch.no_grad():
        torch.testing.assert_close(w.build()(x), ref, rtol=0, atol=0)
    # arcface_torch's checkpoint_gpu_*.pt with DDP "module." keys, through the CLI.
    out = tmp_path / "imported.pth"
    assert W.main(["import", str(ddp), "--out", str(out), "--model", "r18"]) == 0
    sd = torch.load(out, weights_only=True)
    assert list(sd) == list(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_name_inference_and_mismatches(tmp_path):
    mbf = build_backbone("mobilefacenet", embedding_size=128)  # matched by keys and shapes
    assert W.infer_backbone(mbf.state_dict()) == ("mobilefacenet", 128)
    with torch.device("meta"):
        for name in ("iresnet34", "iresnet50", "iresnet100", "iresnet200"):  # by blocks per stage
            assert W.infer_backbone(build_backbone(name, embedding_size=256).state_dict()) == (name, 256)
    sd = build_backbone("iresnet18", embedding_size=32).state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="strict=True"):
        W.import_weights(tmp_path / "r18.pth", model="iresnet34")
    del sd["layer2.1.conv1.weight"]
    torch.save(sd, tmp_path / "r18_broken.pth")
    with pytest.raises(ValueError, match=r"(?s)iresnet18 .*strict=True.*layer2\.1\.conv1\.weight"):
        W.import_weights(tmp_path / "r18_broken.pth")
    sd3 = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    sd3.update({k.replace("layer3.1.", "layer3.2."): v for k, v in sd.items() if k.startswith("layer3.1.")})
    with pytest.raises(ValueError, match=r"blocks per stage \(2, 2, 3, 1\)"):
        W.infer_backbone(sd3)


def test_state_dict_format_refuses_seed_pickles(seed_checkpoint):
    path, _ = seed_checkpoint("arcface", forward=False)
    with pytest.raises(ValueError, match="--format seed"):
        W.import_weights(path, fmt="state_dict")


def test_onnx_missing_packages_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ImportError, match=r"'onnx' and 'onnxruntime'.*unpg\[onnx\]"):
        W.export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_export_matches_torch(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _sane_init(build_backbone("iresnet18", embedding_size=64), seed=4)
    diff, scale = W.export_onnx(model, tmp_path / "r18.onnx")
    assert scale > 1 and diff <= 1e-4 * scale
    sess = ort.InferenceSession(str(tmp_path / "r18.onnx"), providers=["CPUExecutionProvider"])
    x = _faces(5, seed=5)  # a batch size the export never saw: the batch axis is dynamic
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(["embedding"], {"input": x.numpy()})[0]
    assert got.shape == (5, 64) and abs(got - ref).max() <= 1e-4 * abs(ref).max()
    # A tolerance it cannot meet: an error, and no file.
    # An ONNX graph that computes something else (here: ORT's output shifted by 1e-3): an error,
    # and no file.
    class Shifted(ort.InferenceSession):
        def run(self, *args, **kwargs):
            return [y + 1e-3 for y in super().run(*args, **kwargs)]

    monkeypatch.setattr(ort, "InferenceSession", Shifted)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 28 * 28, 8))
    with pytest.raises(ValueError, match="differ from torch's"):
        W.export_onnx(_sane_init(tiny, seed=6), tmp_path / "strict.onnx")
    assert not (tmp_path / "strict.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
