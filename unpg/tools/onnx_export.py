"""Export a backbone to ONNX (dynamic batch axis) and check it against torch with ONNX Runtime.

Needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install unpg[onnx]``): the graph
has a dynamic batch axis, and ONNX Runtime's embeddings are compared with torch's (max abs diff
reported; above ``atol`` (default 1e-4) times max(1, largest |embedding|), nothing is written).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Tuple

import numpy as np
import torch
from torch import nn

from unpg.fileio import atomic_write_bytes

__all__ = ["INPUT_SHAPE", "export_onnx"]

INPUT_SHAPE = (3, 112, 112)




def export_onnx(model: nn.Module, path: os.PathLike | str, *, opset: int = 17, batch: int = 2,
                atol: float = 1e-4, seed: int = 0) -> Tuple[float, float]:
    """Export ``model`` to ONNX with a dynamic batch axis (input ``input`` [N, 3, 112, 112],
    output ``embedding`` [N, D]) and compare ONNX Runtime's embeddings with torch's over batches
    of ``batch`` and ``batch + 1`` random faces (checking the dynamic axis).

    Returns (max abs difference, scale = max(1, max |torch embedding|)). The check is
    ``diff <= atol * scale``: absolute for embeddings within [-1, 1], relative beyond (float32
    rounding grows with the values; MagFace-style embeddings reach norms of 100). Above it,
    ``ValueError`` is raised and nothing is written."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional packages 'onnx' and 'onnxruntime' "
                          f"({e}); install them with: pip install 'unpg[onnx]'") from None
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if not atol >= 0:
        raise ValueError(f"--atol must be >= 0, got {atol}")
    model = model.float().eval().cpu()
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, *INPUT_SHAPE, generator=gen) for b in (batch, batch + 1)]
    # Exported and checked in memory (a backbone is far below protobuf's 2 GiB limit for one
    # serialised model); the file is written, atomically, only once the checks passed.
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: needs no onnxscript, and takes dynamic_axes directly. Its
        # deprecation notice and the tracer's note on the backbones' input-shape check (the
        # non-batch dims are fixed by design) are noise here: the ORT comparison below checks.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (xs[0],), buf, input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
        data = buf.getvalue()
        onnx.checker.check_model(data)
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        diff, scale = 0.0, 1.0
        for x in xs:
            ref = model(x).numpy()
            got = sess.run(["embedding"], {"input": x.numpy()})[0]
            if got.shape != ref.shape:
                raise ValueError(f"{path}: ONNX output shape {got.shape} != torch's {ref.shape}")
            diff = max(diff, float(np.abs(got - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    if not diff <= atol * scale:
        raise ValueError(f"{path}: ONNX Runtime embeddings differ from torch's by {diff:.3g} "
                         f"(> --atol {atol:g} x embedding scale {scale:.3g}); nothing written")
    atomic_write_bytes(path, data)
    return diff, scale
