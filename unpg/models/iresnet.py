"""Improved ResNets (IResNet-18/34/50/100/200) as released by insightface's arcface_torch.

State-dict keys, shapes, initialisation and forward match arcface_torch ``backbones/iresnet.py``,
so its released ``backbone.pth`` files load with ``load_state_dict(strict=True)``:

    conv1, bn1, prelu                       stem: conv3×3(3→64, s1) → BN → PReLU
    layer{1..4}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3}[, downsample.{0,1}]
    bn2, dropout, fc, features              head: BN2d(512) → flatten → dropout → FC → BN1d

Each IBasicBlock computes BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, plus the shortcut
(identity, or conv1×1(stride) → BN on the first block of each stage; every stage starts with
stride 2, so 112×112 input ends as a 512×7×7 map).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import nn

from ._common import (
    body_autocast,
    check_options,
    float32_head,
    prepare_input,
    resolve_amp_dtype,
)
from .registry import register_model

_BN_EPS = 1e-5
_STAGE_WIDTHS = (64, 128, 256, 512)
_FINAL_HW = 7  # 112 / 2**4


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet (no expansion)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        # In place is safe: bn3's backward needs its input, not its output.
        out += identity
        return out


class IResNet(nn.Module):
    """IResNet backbone: ``forward(x [N,3,112,112] float) -> emb [N, embedding_size]``.

    Args:
        layers: blocks per stage, e.g. ``(3, 13, 30, 3)`` for IResNet-100.
        embedding_size: output dimension (insightface ``num_features``).
        dropout: dropout on the flattened 512·7·7 features before the FC.
        zero_init_residual: zero the last BN (``bn3``) of every block so each block starts as
            its shortcut (Goyal et al.). insightface's flag zeroes ``bn2`` instead, which also
            silences the branch; the state-dict layout is the same either way.
        channels_last: keep conv weights and activations in NHWC (faster with cuDNN/AMP).
        fp16: run the convolutional body under autocast with ``amp_dtype``.
        amp_dtype: ``'float16'`` (insightface) or ``'bfloat16'``.

    The FC + ``features`` head always computes in float32 with autocast disabled, as
    insightface does for ``fp16``; the output is float32 whatever the caller's autocast.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        channels_last: bool = False,
        fp16: bool = False,
        amp_dtype: str | torch.dtype = "float16",
    ) -> None:
        super().__init__()
        name = f"IResNet{tuple(layers)}"
        check_options(name, embedding_size, dropout)
        if not isinstance(layers, (list, tuple)) or len(layers) != 4 or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"IResNet: layers must be 4 positive block counts, got {layers!r}")
        self.fp16 = bool(fp16)
        self.amp_dtype = resolve_amp_dtype(name, amp_dtype)
        self.channels_last = bool(channels_last)

        self.conv1 = _conv3x3(3, _STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(_STAGE_WIDTHS[0])
        in_ch = _STAGE_WIDTHS[0]
        for stage, (width, count) in enumerate(zip(_STAGE_WIDTHS, layers), start=1):
            blocks = [IBasicBlock(in_ch, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(count - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            in_ch = width
        self.bn2 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(in_ch * _FINAL_HW * _FINAL_HW, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)
        # insightface fixes the embedding BN's scale at 1: only its shift is learned.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = prepare_input(type(self).__name__, x, self.channels_last)
        with body_autocast(x, self.fp16, self.amp_dtype):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.bn2(x)
            # flatten is by logical (C, H, W) index, so NHWC storage gives the same vector.
            x = self.dropout(torch.flatten(x, 1))
        with float32_head(x):
            return self.features(self.fc(x.float()))


# The one table of IResNet depths (timm's model_args style): builders, the registry and weight
# import (which names an IResNet by its blocks per stage) all read it.
IRESNET_ARGS: Dict[str, Dict[str, Any]] = {
    "iresnet18": dict(layers=(2, 2, 2, 2), params="24.0M"),
    "iresnet34": dict(layers=(3, 4, 6, 3), params="34.1M"),
    "iresnet50": dict(layers=(3, 4, 14, 3), params="43.6M"),
    "iresnet100": dict(layers=(3, 13, 30, 3), params="65.2M"),  # the official code's backbone
    "iresnet200": dict(layers=(6, 26, 60, 6), params="118.8M"),
}


def _iresnet_builder(name: str):
    """A registered builder ``name(embedding_size=512, ...)`` for the depth in IRESNET_ARGS."""
    layers = IRESNET_ARGS[name]["layers"]

    def builder(embedding_size: int = 512, dropout: float = 0.0, channels_last: bool = False,
                fp16: bool = False, amp_dtype: str | torch.dtype = "float16",
                zero_init_residual: bool = False) -> IResNet:
        return IResNet(layers, embedding_size=embedding_size, dropout=dropout,
                       channels_last=channels_last, fp16=fp16, amp_dtype=amp_dtype,
                       zero_init_residual=zero_init_residual)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"IResNet-{name[len('iresnet'):]}, blocks {layers}: "
                       f"{IRESNET_ARGS[name]['params']} parameters at 512-d.")
    return register_model(builder)


iresnet18 = _iresnet_builder("iresnet18")
iresnet34 = _iresnet_builder("iresnet34")
iresnet50 = _iresnet_builder("iresnet50")
iresnet100 = _iresnet_builder("iresnet100")
iresnet200 = _iresnet_builder("iresnet200")
