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
import torch.nn.functional as F  # noqa: E402
from unpg.kernels import lse_and_target, reference_lse_and_target  # noqa: E402
from unpg.kernels import triton_launch as launch  # noqa: E402
from unpg.kernels.reference import nontarget_lse_reference  # noqa: E402
from unpg.kernels.triton_function import triton_lse_and_target  # noqa: E402

SCALE = 64.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _triton(class_start=0, plans=None, with_target=False, precision="ieee"):
    def fn(x, w, labels):
        out = triton_lse_and_target(x, w, labels, SCALE, class_start=class_start,
                                    precision=precision, plans=plans)
        return out if with_target else out[0]
    return fn


def _auto(x_dtype):
    """Precision ``auto`` resolves to the embeddings' dtype here (no autocast, no TF32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x_dtype, "ieee")


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_entry_default_plan(kcheck, dtype):
    # C = 200 is not a multiple of the class tile; labels partly outside the shard.
    x, w, labels = kcheck.inputs(13, 200, 40, dtype, seed=11, class_start=5, label_span=(0, 215))

    def fn(x, w, labels):
        return lse_and_target(x, w, labels, SCALE, backend="triton", class_start=5)

    kcheck.rule(fn, x, w, labels, SCALE, class_start=5, with_target=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_splits_row_blocks_and_d_blocks(kcheck, dtype):
    # Forward: 3 class splits. dX: 3 row blocks x 2 class splits x 2 D blocks (partials summed).
    # dW: 6 class tiles x 2 D blocks, each program looping over 3 row blocks. B, C, D are not
    # multiples of any tile.
    plans = {"fwd": launch.Plan(8, 32, 16, splits=3),
             "dx": launch.Plan(8, 32, 16, block_do=16, splits=2),
             "dw": launch.Plan(8, 32, 16, block_do=16)}
    x, w, labels = kcheck.inputs(20, 170, 24, dtype, seed=12, class_start=30,
                                 label_span=(25, 210))
    kcheck.rule(_triton(30, plans, with_target=True, precision=_auto(dtype)), x, w, labels,
                SCALE, class_start=30, with_target=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32", "ieee"])
def test_fp32_master_weight_every_precision(kcheck, precision):
    # fp32 embeddings and weight, tiles in `precision`: the rule holds against torch in the
    # tile dtype (fp32 for tf32/ieee), and the kernel equals the chunked CPU twin.
    x, w, labels = kcheck.inputs(18, 150, 40, torch.float32, seed=15, class_start=7,
                                 label_span=(0, 160))
    fn = _triton(7, with_target=True, precision=precision)
    kcheck.rule(fn, x, w, labels, SCALE, class_start=7, with_target=True,
                same_dtype=HALF.get(precision, "tf32" if precision == "tf32" else torch.float32))
    got = fn(x, w, labels)
    twin = lse_and_target(x, w, labels, SCALE, backend="chunked", precision=precision,
                          class_start=7, chunk_size=64)
    for a, b in zip(got, twin):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-5)


def test_bf16_embeddings_with_fp32_weight_run_bf16_tiles():
    # The training call under AMP: bf16 embeddings, fp32 master weight, precision "auto".
    gen = torch.Generator().manual_seed(16)
    x = F.normalize(torch.randn(12, 48, generator=gen), dim=1).bfloat16().requires_grad_()
    w = torch.randn(90, 48, generator=gen, requires_grad=True)
    labels = torch.randint(0, 90, (12,), generator=gen)
    launch.LAST_LAUNCH.clear()
    ell, cos_t = lse_and_target(x, w, labels, SCALE, backend="triton")
    (ell.sum() + cos_t.sum()).backward()
    assert {k: v[0] for k, v in launch.LAST_LAUNCH.items()} == \
        {"fwd": "bf16", "dx": "bf16", "dw": "bf16"}
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    # The values are those of bf16-rounded weight tiles scaled by the fp32 norms: equal to that
    # float64 computation, and measurably off the reference on the un-rounded fp32 weight.
    x64, w64 = x.detach().double(), w.detach().double()
    logits = SCALE * (x64 @ w.detach().bfloat16().double().t()) / w64.norm(dim=1)
    logits[torch.arange(12), labels] = float("-inf")
    on_rounded = torch.logsumexp(logits, dim=1)
    on_fp32 = reference_lse_and_target(x64, w64, labels, SCALE)[0]
    err_rounded = (ell.detach().double() - on_rounded).abs().max().item()
    err_fp32 = (ell.detach().double() - on_fp32).abs().max().item()
    assert err_rounded < 1e-4 < err_fp32, (err_rounded, err_fp32)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_initialisation_state_near_uniform_softmax(kcheck, precision):
    # Random unit embeddings, W ~ N(0, 0.01): every probability is ~1/C, the state where
    # skipping small-probability tiles would lose the most mass; the rule must hold here too.
    gen = torch.Generator().manual_seed(17)
    x = F.normalize(torch.randn(16, 32, generator=gen), dim=1)
    w = 0.01 * torch.randn(700, 32, generator=gen)
    labels = torch.randint(0, 700, (16,), generator=gen)
    kcheck.rule(_triton(with_target=True, precision=precision), x, w, labels, SCALE,
                with_target=True, same_dtype=HALF.get(precision, precision))


def test_autocast_selects_half_tiles_for_fp32_inputs():
    x = F.normalize(torch.randn(8, 16), dim=1)
    w = torch.randn(40, 16)
    labels = torch.randint(0, 40, (8,))
    launch.LAST_LAUNCH.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ell = lse_and_target(x, w, labels, SCALE, backend="triton")[0]
    assert launch.LAST_LAUNCH["fwd"][0] == "bf16" and ell.dtype == torch.float32
    explicit = lse_and_target(x, w, labels, SCALE, backend="triton", precision="bf16")[0]
    torch.testing.assert_close(ell, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["batch_of_one", "classes_below_one_tile", "exact_tiles",
                                  "all_labels_equal", "all_outside_shard"])
def test_odd_shapes_and_labels(kcheck, case):
    B, C, D = {"batch_of_one": (1, 50, 16), "classes_below_one_tile": (7, 50, 16),
               "exact_tiles": (16, 128, 64)}.get(case, (9, 60, 16))
    labels = {"all_labels_equal": torch.full((B,), 7), "all_outside_shard": torch.arange(B) + 60}
    x, w, labels = kcheck.inputs(B, C, D, torch.float32, seed=14, labels=labels.get(case))
    kcheck.rule(_triton(with_target=True), x, w, labels, SCALE, with_target=True)


def test_row_without_any_class():
    x = F.normalize(torch.randn(3, 16), dim=1).requires_grad_()
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
    x0 = F.normalize(torch.randn(8, 32, dtype=torch.float64), dim=1)
    w0 = torch.randn(40, 32, dtype=torch.float64)
    labels = torch.randint(0, 40, (8,))
    x_ref, w_ref = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    nontarget_lse_reference(x_ref, w_ref, labels, SCALE).sum().backward()
    x = x0.float().requires_grad_(frozen != "embedding")
    w = w0.float().requires_grad_(frozen != "weight")
    launch.LAST_LAUNCH.clear()
    _triton()(x, w, labels).sum().backward()
    live, ref, dead = (x, x_ref, w) if frozen == "weight" else (w, w_ref, x)
    assert dead.grad is None
    # The pass of the frozen input does not run at all.
    assert ("dw" in launch.LAST_LAUNCH) == (frozen != "weight")
    assert ("dx" in launch.LAST_LAUNCH) == (frozen != "embedding")
    torch.testing.assert_close(live.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


def test_backward_is_deterministic():
    x, w = F.normalize(torch.randn(24, 32), dim=1), torch.randn(130, 32)
    labels = torch.randint(0, 130, (24,))
    plans = {"dx": launch.Plan(8, 32, 16, block_do=16, splits=3)}
    grads = []
    for _ in range(2):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ell, cos_t = triton_lse_and_target(xr, wr, labels, SCALE, plans=plans)
        (ell.sum() - cos_t.sum()).backward()
        grads.append((xr.grad, wr.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_triton_rejects_float64():
    x = F.normalize(torch.randn(2, 8, dtype=torch.float64), dim=1)
    with pytest.raises(ValueError, match="chunked"):
        lse_and_target(x, torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1]), SCALE,
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
