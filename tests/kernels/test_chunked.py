"""Chunked pure-torch backend of lse_and_target against the plain full-tile reference."""
# B: batch, C: classes (local shard), D: embedding dim
import pytest
import torch
from unpg.kernels import lse_and_target
from unpg.kernels.reference import nontarget_lse_reference

SCALE = 64.0


def chunked_lse(x, w, labels, scale, *, class_start=0, chunk_size=8192):
    return lse_and_target(x, w, labels, scale, backend="chunked", class_start=class_start,
                          chunk_size=chunk_size)[0]


def _chunked(chunk_size, class_start=0):
    def fn(x, w, labels):
        return chunked_lse(x, w, labels, SCALE, class_start=class_start, chunk_size=chunk_size)
    return fn


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_float64_equals_reference(kcheck, chunk_size):
    x, w, labels = kcheck.inputs(11, 37, 16, torch.float64, seed=3)
    errors = kcheck.rule(_chunked(chunk_size), x, w, labels, SCALE)
    assert max(errors) < 1e-10, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_lower_precision_within_rule(kcheck, dtype, chunk_size):
    # class_start != 0 and labels partly outside the shard (those rows mask nothing).
    x, w, labels = kcheck.inputs(16, 150, 32, dtype, seed=5, class_start=40,
                                 label_span=(30, 200))
    kcheck.rule(_chunked(chunk_size, class_start=40), x, w, labels, SCALE, class_start=40)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_target_cosine_within_rule(kcheck, dtype):
    # (ell, cos_t) from one node; repeated labels exercise index_add_ into the same dW row.
    labels = torch.tensor([45, 45, 12, 80, 45, 3, 99, 12, 60, 61, 11, 45])
    x, w, labels = kcheck.inputs(12, 90, 24, dtype, seed=9, class_start=10, labels=labels)

    def fn(x, w, labels):
        return lse_and_target(x, w, labels, SCALE, backend="chunked", chunk_size=16,
                              class_start=10)

    errors = kcheck.rule(fn, x, w, labels, SCALE, class_start=10, with_target=True)
    if dtype == torch.float64:
        assert max(errors) < 1e-10, errors


@pytest.mark.parametrize("case", ["batch_of_one", "all_labels_equal", "all_outside_shard"])
def test_odd_shapes_and_labels(kcheck, case):
    B, C, D = {"batch_of_one": (1, 23, 8)}.get(case, (9, 23, 8))
    labels = {"all_labels_equal": torch.full((B,), 4), "all_outside_shard": torch.arange(B) + 100}
    x, w, labels = kcheck.inputs(B, C, D, torch.float64, seed=7, labels=labels.get(case))
    errors = kcheck.rule(_chunked(5), x, w, labels, SCALE)
    assert max(errors) < 1e-10, errors


def test_row_without_any_class_gives_minus_inf_and_zero_gradient():
    x = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    x.requires_grad_()
    w = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 5])  # rows 0, 1 mask the only class; row 2 keeps it
    ell = chunked_lse(x, w, labels, SCALE, chunk_size=4)
    assert torch.isneginf(ell[:2]).all() and torch.isfinite(ell[2])
    ell[2].backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    assert torch.equal(x.grad[:2], torch.zeros_like(x.grad[:2]))
    ref = nontarget_lse_reference(x.detach(), w.detach(), labels, SCALE)
    torch.testing.assert_close(ell, ref)


def test_saved_tensors_hold_nothing_batch_by_classes():
    B, C, D = 32, 500, 8  # B*C is far larger than any input (C*D = 4000)
    x = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    w = torch.randn(C, D, requires_grad=True)
    labels = torch.randint(0, C, (B,))

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return sizes

    ref_sizes = saved_sizes(lambda: nontarget_lse_reference(x, w, labels, SCALE))
    assert max(ref_sizes) >= B * C  # the hook does see the reference's B x C tile
    sizes = saved_sizes(lambda: chunked_lse(x, w, labels, SCALE, chunk_size=64))
    assert sizes and max(sizes) <= max(B * D, C * D), sizes


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32),
                                             (torch.float64, torch.float64)])
def test_output_and_gradient_dtypes(dtype, out_dtype):
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).to(dtype).requires_grad_()
    w = torch.randn(10, 8).to(dtype).requires_grad_()
    ell = lse_and_target(x, w, torch.tensor([1, 2, 3, 4]), SCALE, backend="auto")[0]
    assert ell.dtype == out_dtype
    ell.sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


@pytest.mark.parametrize("frozen", ["weight", "embedding"])
def test_gradient_of_one_input_only(frozen):
    x0 = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    w0 = torch.randn(20, 8, dtype=torch.float64)
    labels = torch.randint(0, 20, (6,))
    x_ref, w_ref = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    nontarget_lse_reference(x_ref, w_ref, labels, SCALE).sum().backward()
    x, w = x0.clone().requires_grad_(frozen != "embedding"), w0.clone().requires_grad_(frozen != "weight")
    chunked_lse(x, w, labels, SCALE, chunk_size=6).sum().backward()
    live, ref, dead = (x, x_ref, w) if frozen == "weight" else (w, w_ref, x)
    assert dead.grad is None
    torch.testing.assert_close(live.grad, ref.grad, rtol=1e-10, atol=1e-12)
