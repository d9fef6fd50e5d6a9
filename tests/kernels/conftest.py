"""Shared checks for the kernel tests: inputs and the tolerance rule against float64 truth.

Rule: with truth = the plain reference in float64 on the kernel's (already rounded) inputs and
``torch_dtype`` = the same reference run in the kernel's input dtype,
``max|truth - kernel| <= max|truth - torch_dtype| + tol`` for ell (and the target cosine when
the fused output is checked), dX_hat and dW.
"""
# B: batch, C: classes (local shard), D: embedding dim
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from unpg.kernels.precision import round_tf32
from unpg.kernels.reference import nontarget_lse_reference

# tol relative to the largest |truth| of each compared tensor.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2,
           "tf32": 1e-3}


def make_inputs(B, C, D, dtype, *, seed=0, class_start=0, labels=None, label_span=None):
    """Normalised embeddings, raw weights (varied norms) and labels, rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x_BD = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1)
    # Pull embeddings toward some classes so a few logits dominate (like a trained model).
    w_CD = torch.randn(C, D, generator=gen, dtype=torch.float64)
    w_CD = w_CD * (0.5 + torch.rand(C, 1, generator=gen, dtype=torch.float64))
    if labels is None:
        lo, hi = label_span if label_span is not None else (class_start, class_start + C)
        labels = torch.randint(lo, hi, (B,), generator=gen)
    local = (labels - class_start).clamp(0, C - 1)
    x_BD = F.normalize(x_BD + 0.6 * F.normalize(w_CD[local], dim=1), dim=1)
    return x_BD.to(dtype), w_CD.to(dtype), labels.long()


def _grads(fn, x_BD, w_CD, labels_B, g_B, h_B):
    """Values and input gradients of ``sum(g * ell) [+ sum(h * cos_t)]``."""
    x = x_BD.detach().clone().requires_grad_()
    w = w_CD.detach().clone().requires_grad_()
    out = fn(x, w, labels_B)
    outs = out if isinstance(out, tuple) else (out,)
    objective = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, (g_B, h_B)))
    objective.backward()
    return tuple(o.detach().double() for o in outs) + (x.grad.double(), w.grad.double())


def reference_target(x_BD, w_CD, labels_B, class_start):
    """Plain target cosine in the input dtype (0 outside the shard)."""
    local_B = labels_B - class_start
    inside_B = (local_B >= 0) & (local_B < w_CD.shape[0])
    w_hat_BD = F.normalize(w_CD, dim=1)[local_B.clamp(0, w_CD.shape[0] - 1)]
    return torch.where(inside_B, (x_BD * w_hat_BD).sum(dim=1), torch.zeros_like(x_BD[:, 0]))


def check_rule(kernel_fn, x_BD, w_CD, labels_B, scale, *, class_start=0, seed=1, extra_tol=0.0,
               with_target=False, same_dtype=None):
    """Assert the tolerance rule for ell (, cos_t), dX_hat, dW; returns the kernel errors.

    With ``with_target`` the kernel returns ``(ell, cos_t)`` and both feed the objective.
    ``same_dtype`` (default: the inputs' dtype) is the dtype of the "same-dtype torch" run and
    of the tolerance: a kernel run with bf16 tiles on fp32 inputs is held to torch in bf16;
    ``"tf32"`` stands for torch's TF32 matmul, emulated as fp32 on TF32-rounded inputs (what
    the tensor cores multiply), so the rule is checkable on a CPU.
    """
    dtype = same_dtype or x_BD.dtype
    # The cotangents live on the inputs' device (CUDA runs of this rule need them there).
    gen = torch.Generator().manual_seed(seed)
    g_B = torch.randn(x_BD.shape[0], generator=gen, dtype=torch.float64).to(x_BD.device)
    h_B = torch.randn(x_BD.shape[0], generator=gen, dtype=torch.float64).to(x_BD.device)

    def ref(x, w, lab):
        ell = nontarget_lse_reference(x, w, lab, scale, class_start=class_start)
        return (ell, reference_target(x, w, lab, class_start)) if with_target else ell

    truth = _grads(ref, x_BD.double(), w_CD.double(), labels_B, g_B, h_B)
    if dtype == "tf32":
        same = _grads(ref, round_tf32(x_BD.float()), round_tf32(w_CD.float()), labels_B, g_B, h_B)
    else:
        same = _grads(ref, x_BD.to(dtype), w_CD.to(dtype), labels_B, g_B, h_B)
    got = _grads(kernel_fn, x_BD, w_CD, labels_B, g_B, h_B)
    names = ("ell", "cos_t", "dX_hat", "dW") if with_target else ("ell", "dX_hat", "dW")
    assert len(got) == len(names), f"kernel returned {len(got) - 2} outputs"
    errors = []
    for name, t, s, k in zip(names, truth, same, got):
        assert not torch.isnan(k).any(), f"{name}: kernel gave NaN"
        finite = torch.isfinite(t)
        assert torch.equal(finite, torch.isfinite(k)), f"{name}: -inf pattern differs"
        t, s, k = t[finite], s[finite], k[finite]
        if t.numel() == 0:
            errors.append(0.0)
            continue
        err_k = (t - k).abs().max().item()
        err_s = (t - s).abs().max().item()
        tol = REL_TOL[dtype] * max(t.abs().max().item(), 1.0) + extra_tol
        assert err_k <= err_s + tol, (
            f"{name} ({dtype}): kernel error {err_k:.3g} > torch-{dtype} error {err_s:.3g} "
            f"+ tol {tol:.3g}")
        errors.append(err_k)
    return errors


@pytest.fixture
def kcheck():
    """``kcheck.inputs(...)`` and ``kcheck.rule(kernel_fn, x, w, labels, scale, ...)``."""
    return SimpleNamespace(inputs=make_inputs, rule=check_rule)
