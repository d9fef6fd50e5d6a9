"""Triton kernels under the interpreter (``TRITON_INTERPRET=1``) against the float64 truth.

Not collected on its own (the name does not match ``test_*.py``): ``test_triton_interp.py``
runs it in a subprocess with the variable set *before* triton is imported there, since any
other test module may already have imported triton in the main pytest process.
"""
# B: batch, C: classes (local shard), D: embedding dim
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("_interp_cases.py needs TRITON_INTERPRET=1 before triton is imported; "
                       "run it through tests/kernels/test_triton_interp.py")

import pytest  # noqa: E402
import torch  # noqa: E402
from unpg.kernels import nontarget_lse  # noqa: E402
from unpg.kernels import triton_kernels as tk  # noqa: E402
from unpg.kernels.function import TritonNonTargetLSE  # noqa: E402
from unpg.kernels.reference import nontarget_lse_reference  # noqa: E402

SCALE = 64.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _triton(class_start=0, fwd=None, bwd=None, with_target=False):
    def fn(x, w, labels):
        out = TritonNonTargetLSE.apply(x, w, labels, SCALE, class_start, fwd, bwd)
        return out if with_target else out[0]
    return fn


def _plans(dtype, *, fwd=None, bwd=None):
    return (tk.with_overrides(tk.default_plan(dtype, backward=False), **(fwd or {})),
            tk.with_overrides(tk.default_plan(dtype, backward=True), **(bwd or {})))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_default_plan(kcheck, dtype):
    # C = 200 is not a multiple of the 128-class tile; labels partly outside the shard.
    x, w, labels = kcheck.inputs(13, 200, 40, dtype, seed=11, class_start=5, label_span=(0, 215))

    def fn(x, w, labels):
        return nontarget_lse(x, w, labels, SCALE, backend="triton", class_start=5)

    kcheck.rule(fn, x, w, labels, SCALE, class_start=5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_splits_and_fused_backward_over_row_blocks(kcheck, dtype):
    # 3 class splits of 2 tiles; backward: one row split (program owns its dW rows) looping
    # over 2 row blocks, dX spread over 3 atomic replicas.
    fwd, bwd = _plans(dtype, fwd=dict(splits=3, block_c=32, block_d=16),
                      bwd=dict(row_splits=1, block_c=32, block_d=16, dx_copies=3))
    x, w, labels = kcheck.inputs(20, 170, 24, dtype, seed=12, class_start=30,
                                 label_span=(25, 210))
    kcheck.rule(_triton(30, fwd, bwd, with_target=True), x, w, labels, SCALE, class_start=30,
                with_target=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_backward_with_atomics(kcheck, dtype):
    # Two row splits: dW and t go through atomics and torch applies the normalisation epilogue.
    fwd, bwd = _plans(dtype, bwd=dict(row_splits=2, block_c=32, block_d=32))
    x, w, labels = kcheck.inputs(20, 70, 40, dtype, seed=13, label_span=(0, 75))
    kcheck.rule(_triton(0, fwd, bwd, with_target=True), x, w, labels, SCALE, with_target=True)


@pytest.mark.parametrize("case", ["batch_of_one", "classes_below_one_tile", "exact_tiles",
                                  "all_labels_equal", "all_outside_shard"])
def test_odd_shapes_and_labels(kcheck, case):
    B, C, D = {"batch_of_one": (1, 50, 16), "classes_below_one_tile": (7, 50, 16),
               "exact_tiles": (16, 128, 64)}.get(case, (9, 60, 16))
    labels = {"all_labels_equal": torch.full((B,), 7), "all_outside_shard": torch.arange(B) + 60}
    x, w, labels = kcheck.inputs(B, C, D, torch.float32, seed=14, labels=labels.get(case))
    kcheck.rule(_triton(), x, w, labels, SCALE)


def test_row_without_any_class():
    x = torch.nn.functional.normalize(torch.randn(3, 16), dim=1).requires_grad_()
    w = torch.randn(1, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 3])  # rows 0, 1 mask the only class
    ell = _triton()(x, w, labels)
    ref = nontarget_lse_reference(x.detach(), w.detach(), labels, SCALE)
    assert torch.isneginf(ell[:2]).all()
    torch.testing.assert_close(ell[2], ref[2])
    ell[2].backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    assert torch.equal(x.grad[:2], torch.zeros_like(x.grad[:2]))


@pytest.mark.parametrize("frozen", ["weight", "embedding"])
def test_gradient_of_one_input_only(frozen):
    x0 = torch.nn.functional.normalize(torch.randn(8, 32, dtype=torch.float64), dim=1)
    w0 = torch.randn(40, 32, dtype=torch.float64)
    labels = torch.randint(0, 40, (8,))
    x_ref, w_ref = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    nontarget_lse_reference(x_ref, w_ref, labels, SCALE).sum().backward()
    x = x0.float().requires_grad_(frozen != "embedding")
    w = w0.float().requires_grad_(frozen != "weight")
    _triton()(x, w, labels).sum().backward()
    live, ref, dead = (x, x_ref, w) if frozen == "weight" else (w, w_ref, x)
    assert dead.grad is None
    torch.testing.assert_close(live.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


def test_matches_chunked_backend():
    x, w = torch.randn(10, 48), torch.randn(90, 48)
    x = torch.nn.functional.normalize(x, dim=1)
    labels = torch.randint(0, 90, (10,))
    a = nontarget_lse(x, w, labels, SCALE, backend="triton")
    b = nontarget_lse(x, w, labels, SCALE, backend="chunked", chunk_size=16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_rejects_float64():
    x = torch.nn.functional.normalize(torch.randn(2, 8, dtype=torch.float64), dim=1)
    with pytest.raises(ValueError, match="chunked"):
        nontarget_lse(x, torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1]), SCALE,
                      backend="triton")


@pytest.mark.parametrize("head,params", [("arcface", dict(s=64.0, m=0.5)),
                                         ("magface", dict(s=64.0, l_margin=0.45, u_margin=0.8,
                                                          l_a=10.0, u_a=110.0, lambda_g=35.0))])
def test_margin_softmax_loss_triton_backend_matches_reference(head, params):
    # The public loss with backend='triton' (fp32, odd C) against the plain torch reference.
    from unpg.losses import margin_softmax_loss

    gen = torch.Generator().manual_seed(21)
    emb = (torch.randn(9, 24, generator=gen) * 20).requires_grad_()
    weight = torch.randn(77, 24, generator=gen).requires_grad_()
    labels = torch.randint(0, 77, (9,), generator=gen)
    labels[3] = labels[0]
    out = {}
    for backend in ("torch", "triton"):
        emb.grad = weight.grad = None
        loss = margin_softmax_loss(emb, labels, weight, head, unpg_wisk=1.5, backend=backend,
                                   **params)
        loss.backward()
        out[backend] = (loss.detach(), emb.grad.clone(), weight.grad.clone())
    for ref, got in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-5)
