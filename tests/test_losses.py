"""margin_softmax_loss (torch backend) against the official code transcription, numpy and hand checks."""
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unpg.classifier import MarginClassifier
from unpg.heads import build_head
from unpg.losses import margin_softmax_loss
from unpg.negatives import unpg_logsumexp
from unpg.official_loss import official_margin_softmax_loss

F64 = torch.float64
HEADS = {
    "arcface": dict(s=64.0, m=0.5),
    "cosface": dict(s=64.0, m=0.35),
    "magface": dict(s=64.0, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0, lambda_g=35.0),
    "combined": dict(s=64.0, m1=0.9, m2=0.4, m3=0.15),
}
WISKS = [None, 1.5, 0.0]
SCALAR_STATS = {"num_negatives", "num_kept", "q1", "q3", "lower", "upper", "min", "max"}
STAT_KEYS = SCALAR_STATS | {"neg_hist"}  # neg_hist: counts of the negatives' cosines


def make_batch(B, C, D, kind, seed=0, dtype=F64):
    """Embeddings with norms spread over [3, 160] (both sides of MagFace's clamp), class centres,
    labels of the given kind; rows 1 and 3 nearly copy rows 0 and 2 under other labels, so the
    in-batch negatives have high outliers for the whisker filter to drop."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=gen, dtype=F64)
    for dst, src in ((1, 0), (3, 2)):
        if B > dst:
            emb[dst] = emb[src] + 0.05 * torch.randn(D, generator=gen, dtype=F64)
    emb = emb / emb.norm(dim=1, keepdim=True) * torch.linspace(3.0, 160.0, B, dtype=F64)[:, None]
    weight = torch.randn(C, D, generator=gen, dtype=F64)
    if kind == "distinct":
        labels = torch.randperm(C, generator=gen)[:B]
    elif kind == "repeated":
        labels = torch.randint(0, min(4, C), (B,), generator=gen)
        if B > 3:
            labels[1], labels[3] = (labels[0] + 1) % C, (labels[2] + 1) % C
    else:  # all equal
        labels = torch.full((B,), C - 1, dtype=torch.long)
    return emb.to(dtype), labels, weight.to(dtype)


def loss_and_grads(fn, emb, labels, weight, *args, **kwargs):
    emb = emb.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = fn(emb, labels, weight, *args, **kwargs)
    g_emb, g_w = torch.autograd.grad(loss, [emb, weight])
    return loss.detach(), g_emb, g_w


def assert_matches_seed(emb, labels, weight, head, wisk):
    ours = loss_and_grads(margin_softmax_loss, emb, labels, weight, head, unpg_wisk=wisk, backend="torch", **HEADS[head])
    official = loss_and_grads(official_margin_softmax_loss, emb, labels, weight, head, unpg_wisk=wisk, **HEADS[head])
    for a, b in zip(ours, official):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    return ours


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("wisk", WISKS)
@pytest.mark.parametrize("kind", ["distinct", "repeated"])
def test_equals_seed_float64(head, wisk, kind):
    emb, labels, weight = make_batch(10, 13, 64, kind, seed=2)
    assert_matches_seed(emb, labels, weight, head, wisk)


def test_whisker_filter_is_exercised_by_the_fixture():
    # Guards the test above against a vacuous fixture: wisk=1.5 drops the planted outliers,
    # wisk=0 keeps about half, and with repeated labels some pairs are positives.
    for kind in ("distinct", "repeated"):
        emb, labels, _ = make_batch(10, 13, 64, kind, seed=2)
        emb_hat = F.normalize(emb)
        _, st15 = unpg_logsumexp(emb_hat, labels, 64.0, 1.5)
        _, st0 = unpg_logsumexp(emb_hat, labels, 64.0, 0.0)
        assert 0 < st15["num_kept"] < st15["num_negatives"]
        assert 0 < st0["num_kept"] < st15["num_kept"]
        assert (st15["num_negatives"] < 45) == (kind == "repeated")


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("wisk", WISKS)
def test_odd_shapes_equal_seed(head, wisk):
    emb, labels, weight = make_batch(7, 13, 5, "repeated", seed=2)
    assert_matches_seed(emb, labels, weight, head, wisk)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("B", [1, 6])
def test_no_negatives_equals_plain_loss(head, B):
    # B = 1 has no pairs; all-equal labels have pairs but no negatives: UNPG adds nothing.
    emb, labels, weight = make_batch(B, 11, 8, "equal", seed=3)
    plain = loss_and_grads(margin_softmax_loss, emb, labels, weight, head, **HEADS[head])
    for wisk in (1.5, 0.0):
        ours = assert_matches_seed(emb, labels, weight, head, wisk)
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    _, stats = margin_softmax_loss(emb, labels, weight, head, unpg_wisk=1.5, return_stats=True, **HEADS[head])
    assert stats["num_negatives"] == 0 and stats["num_kept"] == 0
    assert all(torch.isnan(stats[k]) for k in ("q1", "q3", "lower", "upper", "min", "max"))


@pytest.mark.parametrize("head", sorted(HEADS))
def test_float32_close_to_float64(head):
    emb, labels, weight = make_batch(12, 17, 16, "repeated", seed=4)
    ref = loss_and_grads(margin_softmax_loss, emb, labels, weight, head, unpg_wisk=1.5, **HEADS[head])
    f32 = loss_and_grads(
        margin_softmax_loss, emb.float(), labels, weight.float(), head, unpg_wisk=1.5, **HEADS[head]
    )
    assert f32[0].dtype == torch.float32
    for a, b in zip(f32, ref):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5 * scale)


def test_half_precision_embeddings_pick_half_tiles_and_int32_labels_accepted():
    """bf16 embeddings: float32 length-B math, bf16 tiles for the B x C work under 'auto'
    (the same numbers as float32 inputs with precision='bf16'); 'ieee' keeps float32 tiles."""
    emb, labels, weight = make_batch(8, 9, 16, "repeated", seed=5)
    kw = dict(backend="chunked", **HEADS["arcface"])
    rounded = emb.bfloat16().float()
    out = margin_softmax_loss(emb.bfloat16(), labels.int(), weight.float(), "arcface", **kw)
    assert out.dtype == torch.float32
    bf16_tiles = margin_softmax_loss(rounded, labels, weight.float(), "arcface", precision="bf16", **kw)
    assert torch.equal(out, bf16_tiles)
    ieee = margin_softmax_loss(emb.bfloat16(), labels, weight.float(), "arcface", precision="ieee", **kw)
    torch.testing.assert_close(ieee, margin_softmax_loss(rounded, labels, weight.float(), "arcface", **kw))
    truth = margin_softmax_loss(rounded.double(), labels, weight, "arcface", backend="torch", **HEADS["arcface"])
    assert out.item() != ieee.item()  # really different tiles
    assert abs(out.item() - truth.item()) < 0.05 * truth.item()


def numpy_unpg(emb, labels, s, wisk):
    x = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    sim = x @ x.T
    lab = labels.numpy()
    vals = np.array(
        [sim[i, j] for i in range(len(lab)) for j in range(i + 1, len(lab)) if lab[i] != lab[j]]
    )
    ordered = np.sort(vals)
    count = len(ordered)
    q1, q3 = ordered[int(0.25 * count)], ordered[int(0.75 * count)]
    lower, upper = q1 - wisk * (q3 - q1), q3 + wisk * (q3 - q1)
    kept = ordered[(ordered >= lower) & (ordered <= upper)]
    top = (s * kept).max()
    u = top + np.log(np.exp(s * kept - top).sum())
    return dict(
        num_negatives=count, num_kept=len(kept), q1=q1, q3=q3, lower=lower, upper=upper,
        min=kept.min(), max=kept.max(), u=u, values=vals,
    )


@pytest.mark.parametrize("wisk", [1.5, 1.0, 0.0])
@pytest.mark.parametrize("B", [5, 10, 23])
def test_stats_and_u_match_numpy(wisk, B):
    emb, labels, _ = make_batch(B, 13, 16, "repeated", seed=6 + B)
    emb_hat = F.normalize(emb)
    u, stats = unpg_logsumexp(emb_hat, labels, 30.0, wisk)
    ref = numpy_unpg(emb, labels, 30.0, wisk)
    assert set(stats) == STAT_KEYS
    assert stats["num_negatives"].dtype == torch.int64
    hist = stats["neg_hist"]
    want_hist, _ = np.histogram(ref["values"], bins=hist.numel(), range=(-1.0, 1.0))
    assert hist.tolist() == want_hist.tolist() and int(hist.sum()) == ref["num_negatives"]
    for key in SCALAR_STATS:
        assert stats[key].dim() == 0 and not stats[key].requires_grad
        assert stats[key].item() == pytest.approx(ref[key], rel=1e-12, abs=1e-14), key
    assert u.item() == pytest.approx(ref["u"], rel=1e-12)


def test_u_gradient_flows_through_kept_values_only():
    emb, labels, _ = make_batch(10, 13, 16, "distinct", seed=1)
    emb_hat = F.normalize(emb).requires_grad_(True)
    u, stats = unpg_logsumexp(emb_hat, labels, 10.0, 1.5)
    (g,) = torch.autograd.grad(u, emb_hat)
    # Independent: softmax weights over kept pairs, dU/dx_i = s * sum_j p_ij x_j.
    sim = (emb_hat @ emb_hat.T).detach()
    lower, upper = stats["lower"], stats["upper"]
    expected = torch.zeros_like(emb_hat)
    pairs = [
        (i, j) for i in range(10) for j in range(i + 1, 10)
        if labels[i] != labels[j] and lower <= sim[i, j] <= upper
    ]
    weights = torch.softmax(torch.stack([10.0 * sim[i, j] for i, j in pairs]), 0)
    for p, (i, j) in zip(weights, pairs):
        expected[i] += 10.0 * p * emb_hat[j].detach()
        expected[j] += 10.0 * p * emb_hat[i].detach()
    assert len(pairs) == stats["num_kept"].item() < stats["num_negatives"].item()
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


class HostSync(RuntimeError):
    pass


@pytest.fixture
def forbid_host_sync(monkeypatch):
    def boom(*args, **kwargs):
        raise HostSync("host sync in the loss path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(torch, "nonzero", boom)


@pytest.mark.parametrize("B", [1, 9])
def test_no_host_sync_in_unpg_and_loss(forbid_host_sync, B):
    emb, labels, weight = make_batch(B, 13, 16, "repeated", seed=7)
    with pytest.raises(HostSync):  # the guard itself works
        torch.ones(()).item()
    emb_hat = F.normalize(emb).requires_grad_(True)
    u, _ = unpg_logsumexp(emb_hat, labels, 64.0, 1.5)
    u.backward()
    emb.requires_grad_(True)
    for head in HEADS:
        loss = margin_softmax_loss(emb, labels, weight, head, unpg_wisk=1.5, validate=False, **HEADS[head])
        loss.backward()
    with pytest.raises(HostSync):  # validate=True syncs once, as documented
        margin_softmax_loss(emb, labels, weight, "cosface", unpg_wisk=1.5, **HEADS["cosface"])


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    emb, labels, weight = make_batch(64, 100, 32, "repeated", seed=8, dtype=torch.float32)
    emb, labels, weight = emb.cuda().requires_grad_(True), labels.cuda(), weight.cuda().requires_grad_(True)
    kwargs = dict(unpg_wisk=1.5, validate=False, **HEADS["magface"])
    margin_softmax_loss(emb, labels, weight, "magface", **kwargs).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        margin_softmax_loss(emb, labels, weight, "magface", **kwargs).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = margin_softmax_loss(emb.detach().cpu(), labels.cpu(), weight.detach().cpu(), "magface", **kwargs)
    gpu = margin_softmax_loss(emb.detach(), labels, weight.detach(), "magface", **kwargs)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_arcface_straight_through_gradient():
    emb, labels, weight = make_batch(8, 9, 16, "repeated", seed=9)
    st = dict(HEADS["arcface"], arcface_grad="straight_through")
    exact = loss_and_grads(margin_softmax_loss, emb, labels, weight, "arcface", unpg_wisk=1.5, **HEADS["arcface"])
    loss, g_emb, _ = loss_and_grads(margin_softmax_loss, emb, labels, weight, "arcface", unpg_wisk=1.5, **st)
    torch.testing.assert_close(loss, exact[0])
    assert not torch.allclose(g_emb, exact[1])

    def shifted_ce(e, y, w):  # insightface: the margin is a constant shift of the target logit
        cos = F.normalize(e) @ F.normalize(w).T
        one_hot = F.one_hot(y, w.shape[0]).bool()
        shift = (torch.cos(torch.acos(cos) + 0.5) - cos).detach()
        return F.cross_entropy(64.0 * torch.where(one_hot, cos + shift, cos), y)

    ours = loss_and_grads(margin_softmax_loss, emb, labels, weight, "arcface", **st)
    ref = loss_and_grads(shifted_ce, emb, labels, weight)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_backend_and_prebuilt_head_match_torch():
    emb, labels, weight = make_batch(8, 9, 16, "repeated", seed=10)
    ref = margin_softmax_loss(emb, labels, weight, "cosface", unpg_wisk=1.0, backend="torch", **HEADS["cosface"])
    auto = margin_softmax_loss(emb, labels, weight, "cosface", unpg_wisk=1.0, **HEADS["cosface"])
    built = margin_softmax_loss(emb, labels, weight, build_head("cosface", **HEADS["cosface"]), unpg_wisk=1.0)
    assert ref.item() == auto.item() == built.item()
    loss, stats = margin_softmax_loss(emb, labels, weight, "cosface", return_stats=True, **HEADS["cosface"])
    assert stats == {} and loss.dim() == 0


EMB, LAB, W = make_batch(6, 9, 16, "repeated", seed=11)
ARC = HEADS["arcface"]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((EMB, torch.tensor([0, 1, 2, 3, 4, 9]), W, "arcface"), ARC, r"labels must lie in \[0, 9\)"),
        ((EMB, torch.tensor([0, 1, -1, 3, 4, 5]), W, "arcface"), ARC, r"\[0, 9\).*-1"),
        ((EMB, LAB[:5], W, "arcface"), ARC, r"labels must be \[B\] = \[6\]"),
        ((EMB, LAB, W[:, :8], "arcface"), ARC, "embedding dim mismatch"),
        ((EMB[0], LAB, W, "arcface"), ARC, r"embeddings must be \[B, D\]"),
        ((EMB[:0], LAB[:0], W, "arcface"), ARC, "B >= 1"),
        ((EMB, LAB.double(), W, "arcface"), ARC, "labels must be an integer tensor"),
        ((EMB, LAB.bool(), W, "arcface"), ARC, "labels must be an integer tensor"),
        ((EMB.long(), LAB, W, "arcface"), ARC, "must be floating point"),
        ((EMB, LAB, W, "sphereface"), ARC, "unknown head 'sphereface'"),
        ((EMB, LAB, W, "arcface"), dict(s=64.0), r"missing parameter\(s\) \['m'\]"),
        ((EMB, LAB, W, "cosface"), dict(s=64.0, m=0.3, m1=1.0), r"unknown parameter\(s\) \['m1'\]"),
        ((EMB, LAB, W, "arcface"), dict(ARC, unpg_wisk=-1.0), "wisk must be >= 0"),
        ((EMB, LAB, W, "arcface"), dict(ARC, unpg_wisk=math.inf), "wisk must be a finite number"),
        ((EMB, LAB, W, "arcface"), dict(ARC, backend="cuda"), "unknown backend 'cuda'"),
        ((EMB, LAB, W, "arcface"), dict(ARC, backend="triton"), "needs CUDA tensors"),
        ((EMB, LAB, W, "arcface"), dict(ARC, process_group=object(), negatives_group=object()), "not both"),
        ((EMB, LAB, W, build_head("arcface", **ARC)), dict(m=0.1), "prebuilt head"),
    ],
)
def test_invalid_input_raises_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        margin_softmax_loss(*args, **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_embeddings_rejected_unless_validation_off(bad):
    emb = EMB.clone()
    emb[2, 3] = bad
    with pytest.raises(ValueError, match=r"NaN/inf in 1 row\(s\), e.g. rows \[2\]"):
        margin_softmax_loss(emb, LAB, W, "arcface", **ARC)
    margin_softmax_loss(emb, LAB, W, "arcface", validate=False, **ARC)  # hot path: no check


@pytest.mark.parametrize("head", ["arcface", "magface"])
def test_module_trains_on_separable_problem(head):
    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 3.0
    labels = torch.arange(4).repeat_interleave(8)
    inputs = centres[labels] + 0.3 * torch.randn(32, 8)
    backbone = torch.nn.Linear(8, 8)
    params = dict(HEADS[head], s=16.0)
    if head == "magface":
        params.update(l_a=1.0, u_a=20.0, lambda_g=1.0)
    crit = MarginClassifier(4, 8, build_head(head, **params), unpg_wisk=1.5)
    assert crit.weight.shape == (4, 8) and 0.005 < crit.weight.std().item() < 0.02
    opt = torch.optim.SGD(list(backbone.parameters()) + list(crit.parameters()), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):  # 25 are enough for most initial centres, 40 for every seed tried (0-3)
        opt.zero_grad()
        loss, stats = crit(backbone(inputs), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(stats) == STAT_KEYS and stats["num_negatives"] == 32 * 24 // 2
    assert losses[-1] < 0.3 * losses[0] and max(losses[-5:]) < min(losses[:5]), losses


def test_module_from_config_and_errors():
    cfg_head = types.SimpleNamespace(name="cosface", params=lambda: dict(s=32.0, m=0.3))
    cfg_fc = types.SimpleNamespace(mode="replicated", sample_rate=1.0, backend="auto",
                                   precision="auto", chunk_size=8192)
    on = types.SimpleNamespace(unpg_wisk=1.0)
    off = types.SimpleNamespace(unpg_wisk=None)
    crit = MarginClassifier.from_config(cfg_fc, cfg_head, on, num_classes=9, embedding_size=16)
    assert crit.unpg_wisk == 1.0 and crit.head.params() == dict(s=32.0, m=0.3)
    assert MarginClassifier.from_config(cfg_fc, cfg_head, off, num_classes=9,
                                        embedding_size=16).unpg_wisk is None
    with torch.no_grad():
        crit.weight.copy_(W.float())
    loss, stats = crit(EMB.float(), LAB)
    ref = margin_softmax_loss(EMB.float(), LAB, W.float(), "cosface", unpg_wisk=1.0, s=32.0, m=0.3)
    assert loss.item() == ref.item() and stats["num_negatives"] > 0
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        MarginClassifier(0, 16, build_head("cosface", s=32.0, m=0.3))
    with pytest.raises(ValueError, match="missing"):
        MarginClassifier.from_config(cfg_fc, types.SimpleNamespace(
            name="magface", params=lambda: dict(s=32.0)), off, num_classes=9, embedding_size=16)
