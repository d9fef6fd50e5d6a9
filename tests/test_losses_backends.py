"""``margin_softmax_loss`` through every CPU backend: the fused decomposition from
``unpg.kernels`` (chunked) equals the plain reference for every head, with and without UNPG.
(The Triton backend is compared the same way under the interpreter in tests/kernels.)"""
# B: batch, C: classes, D: embedding dim
import pytest
import torch

from unpg.classifier import MarginClassifier
from unpg.heads import build_head
from unpg.losses import margin_softmax_loss

HEADS = {
    "arcface": dict(s=64.0, m=0.5),
    "cosface": dict(s=64.0, m=0.35),
    "magface": dict(s=64.0, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0, lambda_g=35.0),
    "combined": dict(s=64.0, m1=1.0, m2=0.3, m3=0.2),
}


def _inputs(B=11, C=29, D=7, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[2] = labels[1]
    weight = torch.randn(C, D, generator=gen, dtype=dtype)
    # Norms in MagFace's [l_a, u_a] range and embeddings near their centres, so that margins,
    # easy margin and the UNPG filter are all exercised.
    emb = (torch.randn(B, D, generator=gen, dtype=dtype) + 1.5 * weight[labels]) * 12
    return emb, labels, weight


def _loss_and_grads(backend, emb, labels, weight, head, wisk, **kw):
    emb = emb.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = margin_softmax_loss(emb, labels, weight, head, unpg_wisk=wisk, backend=backend,
                               **HEADS[head], **kw)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("wisk", [None, 1.5, 0.0])
@pytest.mark.parametrize("chunk_size", [4, 8192])
def test_chunked_equals_reference_float64(head, wisk, chunk_size):
    emb, labels, weight = _inputs()
    ref = _loss_and_grads("torch", emb, labels, weight, head, wisk)
    got = _loss_and_grads("chunked", emb, labels, weight, head, wisk, chunk_size=chunk_size)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_auto_on_cpu_is_the_chunked_kernel_and_float32_is_close():
    emb, labels, weight = _inputs(dtype=torch.float32, seed=3)
    truth = _loss_and_grads("torch", emb.double(), labels, weight.double(), "arcface", 1.5)
    auto = _loss_and_grads("auto", emb, labels, weight, "arcface", 1.5)
    chunked = _loss_and_grads("chunked", emb, labels, weight, "arcface", 1.5)
    for a, c in zip(auto, chunked):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    for t, a in zip(truth, auto):
        torch.testing.assert_close(a.double(), t, rtol=1e-4, atol=1e-5)


def test_all_labels_equal_and_single_row():
    emb, labels, weight = _inputs(B=5)
    labels[:] = 4
    for B in (5, 1):
        ref = _loss_and_grads("torch", emb[:B], labels[:B], weight, "arcface", 1.5)
        got = _loss_and_grads("chunked", emb[:B], labels[:B], weight, "arcface", 1.5)
        for r, g in zip(ref, got):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_classifier_uses_the_backend():
    emb, labels, weight = _inputs(dtype=torch.float32)
    out = {}
    for backend in ("torch", "chunked"):
        module = MarginClassifier(weight.shape[0], weight.shape[1],
                                  build_head("cosface", **HEADS["cosface"]), unpg_wisk=1.5,
                                  backend=backend)
        with torch.no_grad():
            module.weight.copy_(weight)
        loss, _ = module(emb, labels)
        loss.backward()
        out[backend] = (loss.detach(), module.weight.grad)
    for r, g in zip(out["torch"], out["chunked"]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
