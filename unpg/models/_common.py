"""Option checks and precision helpers shared by the backbones.

Every backbone takes the same options (``embedding_size``, ``dropout``, ``channels_last``,
``fp16``, ``amp_dtype``) and the same input (aligned 112×112 RGB faces, NCHW float); the
checks here give one error message for each mistake whichever backbone is built.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

INPUT_SIZE = 112  # insightface-aligned faces; both heads assume a 7×7 final feature map

_AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def check_options(model: str, embedding_size: int, dropout: float) -> None:
    """Raise ``ValueError`` for an embedding size or dropout a backbone cannot use."""
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(
            f"{model}: embedding_size must be a positive integer (e.g. 512), got {embedding_size!r}"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{model}: dropout must be a probability in [0, 1), got {dropout!r}")


def resolve_amp_dtype(model: str, amp_dtype: str | torch.dtype) -> torch.dtype:
    """``'float16'``/``'bfloat16'`` (YAML spelling) or a torch dtype → torch dtype."""
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype in (torch.float16, torch.bfloat16):
            return amp_dtype
    elif isinstance(amp_dtype, str) and amp_dtype.lower() in _AMP_DTYPES:
        return _AMP_DTYPES[amp_dtype.lower()]
    raise ValueError(
        f"{model}: amp_dtype must be 'float16' or 'bfloat16' (or the torch dtype), got {amp_dtype!r}"
    )


def check_input(model: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``[N, 3, 112, 112]`` batch.

    Only shapes and dtype are inspected, so this costs no host-device sync.
    """
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(
            f"{model}: expected an NCHW batch of aligned faces [N, 3, {INPUT_SIZE}, {INPUT_SIZE}], "
            f"got shape {tuple(x.shape)}; resize/align faces to {INPUT_SIZE}x{INPUT_SIZE} "
            "(the head expects a 7x7 final feature map)"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{model}: expected a float tensor (normalised images), got dtype {x.dtype}; "
            "convert uint8 images with e.g. (x.float() - 127.5) / 128"
        )


def prepare_input(model: str, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``check_input`` and, for a ``channels_last`` model, the NHWC copy its convs expect."""
    check_input(model, x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def body_autocast(x: torch.Tensor, enabled: bool, dtype: torch.dtype) -> ContextManager:
    """Autocast for the convolutional body when the backbone was built with ``fp16=True``.

    When disabled this is a no-op, so an autocast region opened by the caller still applies.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def float32_head(x: torch.Tensor) -> ContextManager:
    """Region with autocast off: the embedding head (FC + BN1d) always computes in float32.

    The embedding's norm feeds MagFace and the cosine logits; half-precision rounding in the
    last FC would show up directly in the loss, and the FC is a small share of the FLOPs.
    """
    return torch.autocast(device_type=x.device.type, enabled=False)
