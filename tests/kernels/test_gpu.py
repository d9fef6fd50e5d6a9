"""Triton on CUDA vs the float64 truth at training-like shapes (skipped without CUDA)."""
# B: batch, C: classes (local shard), D: embedding dim
import pytest
import torch
from unpg.kernels import lse_and_target, target_cosine

SCALE = 64.0


def _on_cuda(tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 20011, 512), (64, 3000, 128), (1, 700, 512)])
def test_triton_cuda_within_rule(kcheck, dtype, shape):
    B, C, D = shape
    x, w, labels = _on_cuda(kcheck.inputs(B, C, D, dtype, seed=21, class_start=17,
                                          label_span=(0, C + 40)))

    def fn(x, w, labels):
        return lse_and_target(x, w, labels, SCALE, backend="triton", class_start=17)

    kcheck.rule(fn, x, w, labels, SCALE, class_start=17, with_target=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "tf32", "ieee"])
@pytest.mark.parametrize("shape", [(512, 20011, 512), (100, 3000, 128)])
def test_triton_cuda_fp32_master_weight_within_rule(kcheck, precision, shape):
    # The training call: fp32 embeddings and master weight, tiles in `precision`.
    B, C, D = shape
    x, w, labels = _on_cuda(kcheck.inputs(B, C, D, torch.float32, seed=23, label_span=(0, C)))

    def fn(x, w, labels):
        return lse_and_target(x, w, labels, SCALE, backend="triton", precision=precision)

    same = {"bf16": torch.bfloat16, "tf32": "tf32"}.get(precision, torch.float32)
    kcheck.rule(fn, x, w, labels, SCALE, with_target=True, same_dtype=same)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_triton_cuda_equals_chunked_twin(kcheck, precision):
    # Same tiles, same rounding: the kernel and its torch twin agree to fp32 accumulation
    # (bf16). TF32: the tensor cores may truncate where the twin rounds, one TF32 ulp per input.
    x, w, labels = _on_cuda(kcheck.inputs(256, 9000, 512, torch.float32, seed=24))
    out = {}
    for backend in ("triton", "chunked"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ell, cos_t = lse_and_target(xr, wr, labels, SCALE, backend=backend, precision=precision,
                                    chunk_size=2048)
        (ell.sum() - SCALE * cos_t.sum()).backward()
        out[backend] = (ell, cos_t, xr.grad, wr.grad)
    for name, a, b in zip(("ell", "cos_t", "dX", "dW"), out["triton"], out["chunked"]):
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        rel = 1e-4 if precision == "bf16" else 3e-3
        assert err <= rel * max(scale, 1.0), f"{name} ({precision}): {err:.3g} vs {scale:.3g}"


@pytest.mark.gpu
def test_every_tuning_candidate_computes_the_same(kcheck):
    # Autotuning may pick any candidate plan: each one (bf16 tiles on the fp32 master weight,
    # the training call's kernels) must give the chunked twin's values and gradients.
    from unpg.kernels import triton_launch as launch
    from unpg.kernels.triton_function import triton_lse_and_target

    x, w, labels = _on_cuda(kcheck.inputs(200, 3000, 512, torch.float32, seed=25))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ell, cos_t = lse_and_target(xr, wr, labels, SCALE, backend="chunked", precision="bf16")
    (ell.sum() - SCALE * cos_t.sum()).backward()
    twin = (ell, cos_t, xr.grad, wr.grad)
    sets = {kind: launch.candidate_plans(kind, half=True) for kind in ("fwd", "dx", "dw")}
    for i in range(max(len(c) for c in sets.values())):
        plans = {kind: c[i % len(c)] for kind, c in sets.items()}
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ell, cos_t = triton_lse_and_target(xr, wr, labels, SCALE, precision="bf16", plans=plans)
        (ell.sum() - SCALE * cos_t.sum()).backward()
        for name, a, b in zip(("ell", "cos_t", "dX", "dW"), (ell, cos_t, xr.grad, wr.grad), twin):
            err, scale = (a - b).abs().max().item(), b.abs().max().item()
            assert err <= 1e-4 * max(scale, 1.0), f"{name} with {plans}: {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_cuda_within_rule(kcheck, dtype):
    x, w, labels = _on_cuda(kcheck.inputs(256, 9000, 256, dtype, seed=22))

    def fn(x, w, labels):
        return lse_and_target(x, w, labels, SCALE, backend="chunked", chunk_size=2048)[0]

    kcheck.rule(fn, x, w, labels, SCALE)


@pytest.mark.gpu
def test_auto_backend_matches_chunked_twin():
    x = torch.nn.functional.normalize(torch.randn(128, 256, device="cuda"), dim=1)
    w = torch.randn(5000, 256, device="cuda")
    labels = torch.randint(0, 5000, (128,), device="cuda")
    ell_a, cos_a = lse_and_target(x, w, labels, SCALE, backend="auto", precision="ieee")
    ell_c = lse_and_target(x, w, labels, SCALE, backend="chunked", precision="ieee")[0]
    torch.testing.assert_close(ell_a, ell_c, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cos_a, target_cosine(x, w, labels))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_forward_backward_never_sync_with_the_host(backend):
    x = torch.nn.functional.normalize(torch.randn(256, 128, device="cuda"), dim=1)
    x = x.bfloat16().requires_grad_()
    w = torch.randn(3000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 3000, (256,), device="cuda")

    def step():
        ell, cos_t = lse_and_target(x, w, labels, SCALE, backend=backend, chunk_size=1024)
        (ell - SCALE * cos_t).mean().backward()

    step()  # warm-up: compilation and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(w.grad.float()).all()
