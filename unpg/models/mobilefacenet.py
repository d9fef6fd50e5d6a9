"""MobileFaceNet as in insightface's arcface_torch (``backbones/mobilefacenet.py``, "mbf").

Parameter names match arcface_torch's ``get_mbf`` / ``get_mbf_large`` models, so their
checkpoints load with ``load_state_dict(strict=True)``:

    layers.0           stem conv3×3(3→64·scale, s2) → BN → PReLU            112 → 56
    layers.1           grouped conv3×3 (blocks[0] == 1) or residual depthwise blocks
    layers.2 / .3      depthwise s2 block, blocks[1] residual depthwise blocks      → 28
    layers.4 / .5      depthwise s2 block to 128·scale, blocks[2] residual blocks   → 14
    layers.6 / .7      depthwise s2 block, blocks[3] residual blocks                →  7
    conv_sep           conv1×1(128·scale → 512) → BN → PReLU
    features           GDC: depthwise 7×7 conv → BN → flatten → linear (no bias) → BN1d

A depthwise block is conv1×1 → BN → PReLU (expand), depthwise k×k → BN → PReLU, conv1×1 → BN
(linear projection); residual blocks add their input. The expansion widths (128, 256, 512) are
those of insightface by default; ``scale`` widens the block inputs/outputs and ``expansion``
multiplies the expansion widths (``mobilefacenet_s`` uses both < insightface's to be cheap on
CPU).
"""
from __future__ import annotations

from typing import Sequence

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

_GDC_CH = 512


class ConvBlock(nn.Module):
    """conv (no bias) → BN → PReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.PReLU(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) → BN, no activation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted-residual unit: expand 1×1 to ``hidden`` → depthwise 3×3 → project 1×1."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int,
                 residual: bool = False) -> None:
        super().__init__()
        if residual and (in_ch != out_ch or stride != 1):
            raise ValueError("DepthWise: a residual block needs in_ch == out_ch and stride 1")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_ch, hidden, kernel=1),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_ch, kernel=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``count`` residual depthwise units at constant width."""

    def __init__(self, ch: int, count: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(ch, ch, hidden, stride=1, residual=True) for _ in range(count)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: 7×7 depthwise → BN → flatten → linear → BN1d."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(_GDC_CH, _GDC_CH, kernel=7, groups=_GDC_CH),
            nn.Flatten(),
            nn.Linear(_GDC_CH, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet: ``forward(x [N,3,112,112] float) -> emb [N, embedding_size]``.

    Args:
        embedding_size: output dimension.
        blocks: residual units per stage (insightface default ``(1, 4, 6, 2)``).
        scale: width multiplier of block inputs/outputs (64·scale, 128·scale channels).
        expansion: multiplier of the expansion widths 128/256/512 (1.0 = insightface).
        channels_last, fp16, amp_dtype: as for ``IResNet``. ``conv_sep`` and the GDC head
            always compute in float32 with autocast off, as insightface does.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        expansion: float = 1.0,
        channels_last: bool = False,
        fp16: bool = False,
        amp_dtype: str | torch.dtype = "float16",
    ) -> None:
        super().__init__()
        check_options("MobileFaceNet", embedding_size, 0.0)
        if not isinstance(blocks, (list, tuple)) or len(blocks) != 4 or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in blocks):
            raise ValueError(f"MobileFaceNet: blocks must be 4 positive counts, got {blocks!r}")
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"MobileFaceNet: scale must be a positive integer, got {scale!r}")
        if isinstance(expansion, bool) or not isinstance(expansion, (int, float)) or not (
                expansion > 0 and float(128 * expansion).is_integer()):
            raise ValueError(
                f"MobileFaceNet: expansion must be > 0 with 128·expansion an integer (e.g. 1.0, "
                f"0.5), got {expansion!r}"
            )
        self.fp16 = bool(fp16)
        self.amp_dtype = resolve_amp_dtype("MobileFaceNet", amp_dtype)
        self.channels_last = bool(channels_last)
        c1, c2 = 64 * scale, 128 * scale
        h1, h2, h3 = (int(w * expansion) for w in (128, 256, 512))
        if blocks[0] == 1:
            # A single grouped conv (64 groups) stands in for a one-unit first stage.
            stage1: nn.Module = ConvBlock(c1, c1, kernel=3, padding=1, groups=64)
        else:
            stage1 = Residual(c1, blocks[0], hidden=h1)
        self.layers = nn.ModuleList([
            ConvBlock(3, c1, kernel=3, stride=2, padding=1),
            stage1,
            DepthWise(c1, c1, hidden=h1, stride=2),
            Residual(c1, blocks[1], hidden=h1),
            DepthWise(c1, c2, hidden=h2, stride=2),
            Residual(c2, blocks[2], hidden=h2),
            DepthWise(c2, c2, hidden=h3, stride=2),
            Residual(c2, blocks[3], hidden=h2),
        ])
        self.conv_sep = ConvBlock(c2, _GDC_CH, kernel=1)
        self.features = GDC(embedding_size)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = prepare_input(type(self).__name__, x, self.channels_last)
        with body_autocast(x, self.fp16, self.amp_dtype):
            for layer in self.layers:
                x = layer(x)
        with float32_head(x):
            return self.features(self.conv_sep(x.float()))


def _build(name: str, embedding_size: int, dropout: float, channels_last: bool, fp16: bool,
           amp_dtype: str | torch.dtype, blocks: Sequence[int], scale: int,
           expansion: float) -> MobileFaceNet:
    # MobileFaceNet has no dropout layer; silently ignoring a requested rate would hide a
    # config mistake.
    if dropout != 0.0:
        raise ValueError(
            f"{name} has no dropout layer; got dropout={dropout!r}. Set dropout to 0.0 or use "
            "an iresnet backbone"
        )
    return MobileFaceNet(embedding_size=embedding_size, blocks=tuple(blocks), scale=scale,
                         expansion=expansion, channels_last=channels_last, fp16=fp16,
                         amp_dtype=amp_dtype)


@register_model
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, channels_last: bool = False,
                  fp16: bool = False, amp_dtype: str | torch.dtype = "float16",
                  blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2,
                  expansion: float = 1.0) -> MobileFaceNet:
    """insightface "mbf": blocks (1, 4, 6, 2), scale 2 (2.06M parameters, 438M MACs)."""
    return _build("mobilefacenet", embedding_size, dropout, channels_last, fp16, amp_dtype,
                  blocks, scale, expansion)


@register_model
def mobilefacenet_large(embedding_size: int = 512, dropout: float = 0.0,
                        channels_last: bool = False, fp16: bool = False,
                        amp_dtype: str | torch.dtype = "float16",
                        blocks: Sequence[int] = (2, 8, 12, 4), scale: int = 4,
                        expansion: float = 1.0) -> MobileFaceNet:
    """insightface "mbf_large": blocks (2, 8, 12, 4), scale 4 (6.3M parameters, 1.8G MACs)."""
    return _build("mobilefacenet_large", embedding_size, dropout, channels_last, fp16,
                  amp_dtype, blocks, scale, expansion)


@register_model
def mobilefacenet_s(embedding_size: int = 512, dropout: float = 0.0, channels_last: bool = False,
                    fp16: bool = False, amp_dtype: str | torch.dtype = "float16",
                    blocks: Sequence[int] = (1, 2, 3, 1), scale: int = 1,
                    expansion: float = 0.5) -> MobileFaceNet:
    """Small MobileFaceNet for CPU demos: blocks (1, 2, 3, 1), scale 1, half expansion.

    0.62M parameters and 81M MACs per image at 512-d ("mbf": 2.06M, 438M). On 2 CPU cores a
    batch-128 train step took about 1.1 s with ``channels_last=True``; prefer channels_last on
    CPU, where NCHW depthwise convolutions are several times slower.
    """
    return _build("mobilefacenet_s", embedding_size, dropout, channels_last, fp16, amp_dtype,
                  blocks, scale, expansion)
