"""Public API of unpg.kernels: dispatch, argument errors, target_cosine, import hygiene."""
# B: batch, C: classes (local shard), D: embedding dim
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from unpg.kernels import (
    BACKENDS,
    PRECISIONS,
    lse_and_target,
    nontarget_lse_reference,
    resolve_backend,
    target_cosine,
)


@pytest.mark.slow
def test_package_imports_without_triton_or_cuda():
    code = ("import sys, unpg.kernels as k; k.lse_and_target; "
            "assert 'triton' not in sys.modules, 'triton imported at package import'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_backend_resolution_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4)
    assert resolve_backend("auto", x) == "chunked"
    assert resolve_backend("chunked", x) == "chunked"
    assert resolve_backend("torch", x) == "torch"
    assert BACKENDS == ("auto", "torch", "chunked", "triton")
    assert PRECISIONS == ("auto", "bf16", "fp16", "tf32", "ieee")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("triton", x)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", x)


@pytest.mark.parametrize("bad,match", [
    (dict(emb=torch.randn(3, 5)), "dim"),
    (dict(labels=torch.tensor([0, 1])), "labels"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), "integer"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(precision="fp8"), "precision"),
])
def test_argument_errors_name_the_problem(bad, match):
    args = dict(emb=torch.randn(3, 4), weight=torch.randn(6, 4), labels=torch.tensor([0, 1, 2]),
                chunk_size=8, precision="auto")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        lse_and_target(args["emb"], args["weight"], args["labels"], 10.0,
                       chunk_size=args["chunk_size"], precision=args["precision"])


def test_float64_operand_promotes_both():
    x = F.normalize(torch.randn(5, 8), dim=1)
    w = torch.randn(12, 8, dtype=torch.float64)
    labels = torch.randint(0, 12, (5,))
    for backend in ("torch", "chunked"):
        ell, cos_t = lse_and_target(x.half(), w, labels, 30.0, backend=backend)
        assert ell.dtype == cos_t.dtype == torch.float64
        torch.testing.assert_close(ell, nontarget_lse_reference(x.half().double(), w, labels,
                                                                30.0))


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_half_embeddings_keep_fp32_master_weight_and_gradient_dtypes(backend):
    x = F.normalize(torch.randn(6, 8), dim=1).bfloat16().requires_grad_()
    w = torch.randn(11, 8, requires_grad=True)
    ell, cos_t = lse_and_target(x, w, torch.arange(6), 30.0, backend=backend)
    assert ell.dtype == cos_t.dtype == torch.float32
    (ell.sum() + cos_t.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_torch_and_chunked_backends_agree_with_target_and_shard_offset():
    gen = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(7, 16, generator=gen, dtype=torch.float64), dim=1)
    w = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([100, 105, 129, 99, 130, 110, 101])  # shard [100, 130)
    outs = {}
    for backend in ("torch", "chunked"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ell, cos_t = lse_and_target(xr, wr, labels, 40.0, backend=backend, chunk_size=8,
                                    class_start=100)
        (ell.sum() + 3 * cos_t.sum()).backward()
        outs[backend] = (ell, cos_t, xr.grad, wr.grad)
    for a, b in zip(outs["torch"], outs["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs["torch"][1], target_cosine(x, w, labels, class_start=100))


def test_target_cosine_matches_gather_and_masks_other_shards():
    x = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1).requires_grad_()
    w = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([100, 105, 109, 99, 110, 103])  # shard [100, 110)
    cos = target_cosine(x, w, labels, class_start=100)
    inside = (labels >= 100) & (labels < 110)
    full = x @ F.normalize(w, dim=1).t()
    expect = torch.where(inside, full[torch.arange(6), (labels - 100).clamp(0, 9)],
                         torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(cos, expect, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda a, b: target_cosine(a, b, labels, class_start=100), (x, w))
    # Half inputs give float32.
    assert target_cosine(x.detach().half(), w.detach().half(), labels, class_start=100).dtype \
        == torch.float32


def test_layers_call_down_only():
    # api -> sharded -> local -> backends: nothing below imports a layer above it.
    kernels = Path(__file__).resolve().parents[2] / "kernels"
    above = {"local": {"sharded", "api"}, "sharded": {"api"}}
    for backend in ("reference", "chunked", "precision", "target", "triton_function",
                    "triton_launch", "triton_kernels"):
        above[backend] = {"local", "sharded", "api"}
    for module, forbidden in above.items():
        tree = ast.parse((kernels / f"{module}.py").read_text(encoding="utf-8"))
        imported = {node.module.split(".")[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 1}
        imported |= {alias.name for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module
                     for alias in node.names}
        assert not imported & forbidden, f"kernels/{module}.py imports {imported & forbidden}"
        unpg_imports = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and n.level == 0 and (n.module or "").startswith("unpg")]
        assert not unpg_imports, f"kernels/{module}.py imports {unpg_imports}"
