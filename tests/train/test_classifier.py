"""``MarginClassifier`` through its public methods: the loss equals the functional loss in both
layouts; gradient finishing and ``grad_sq_norm`` on 2 gloo ranks equal one process; the full
matrix and the optimizer's per-row state round-trip and reshard 2 -> 1 and 1 -> 2; the run's
AMP dtype reaches the kernel entry as ``precision``.

The gloo ranks run THIS file as ``__main__`` (``runpy.run_path``; a pytest-imported module is
not importable in a spawned child), see ``run_rank`` at the bottom.
"""
# B: global batch, b: local batch, C: classes, D: embedding dim
import gc
import os

import pytest
import torch
import torch.distributed as dist

import unpg.losses
from unpg.classifier import MarginClassifier, resolve_precision
from unpg.distributed import DistContext
from unpg.heads import build_head
from unpg.losses import margin_softmax_loss
from unpg.optim import OptimizerState, param_groups

C, D, B, RANKS = 7, 6, 8, 2
HEAD = dict(s=16.0, m=0.4)
F64 = torch.float64


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, D, generator=gen, dtype=F64)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[1] = labels[0]
    emb = 8.0 * torch.randn(B, D, generator=gen, dtype=F64) + 10.0 * weight[labels]
    return emb, labels, weight


def build(mode, ctx=None, wisk=1.5, **kw):
    clf = MarginClassifier(C, D, build_head("arcface", **HEAD), unpg_wisk=wisk, mode=mode,
                           backend="chunked", chunk_size=3, ctx=ctx, **kw)
    return clf.double()


def sgd(clf, backbone_param=None):
    """SGD over the trainer's named groups (a stand-in backbone parameter first)."""
    backbone = torch.nn.Linear(1, 1, bias=False) if backbone_param is None else backbone_param
    opt = torch.optim.SGD(param_groups(backbone, clf), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return opt, OptimizerState(opt, clf)


def one_step(clf, emb_bD, labels_b):
    """forward, backward, gradient finishing, one SGD step; returns what the test compares."""
    opt, state = sgd(clf)
    emb = emb_bD.clone().requires_grad_()
    loss, _ = clf(emb, labels_b)
    clf.arm_grad_sync()
    loss.backward()
    clf.finish_grad_sync()
    sq = clf.grad_sq_norm()
    grad = clf.weight.grad.clone()
    with clf.step_context(opt):
        opt.step()
    return dict(loss=loss.detach(), emb_grad=emb.grad, w_grad=grad, sq=sq, opt=opt, state=state)


# ----------------------------------------------------------------------------- one process
@pytest.mark.parametrize("wisk", [None, 1.5])
def test_loss_equals_the_functional_loss_in_both_layouts(wisk):
    emb, labels, weight = make_inputs()
    want = margin_softmax_loss(emb, labels, weight, "arcface", unpg_wisk=wisk, backend="torch",
                               **HEAD)
    for mode in ("replicated", "sharded"):
        clf = build(mode, wisk=wisk)
        clf.load_state_dict({"weight": weight})
        loss, stats = clf(emb, labels)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        assert bool(stats) == (wisk is not None)
        assert clf.loss_is_global  # one process: the local mean is the global mean


def test_initial_centres_are_insightface_and_the_same_in_every_layout():
    full = MarginClassifier(C, D, build_head("arcface", **HEAD), seed=3).state_dict()["weight"]
    assert full.shape == (C, D) and 0.003 < full.std().item() < 0.03
    rows = []
    for rank in range(3):  # the shards a 3-rank run starts from are rows of the same matrix
        ctx = DistContext(rank=rank, world_size=3)
        clf = MarginClassifier(C, D, build_head("arcface", **HEAD), mode="sharded", ctx=ctx,
                               seed=3)
        rows.append(clf.weight.detach())
        assert torch.equal(clf.weight.detach(), clf.local_rows(full))
    assert torch.equal(torch.cat(rows), full)
    other = MarginClassifier(C, D, build_head("arcface", **HEAD), seed=4).state_dict()["weight"]
    assert not torch.equal(other, full)


def test_state_dict_round_trip_and_shape_errors():
    emb, labels, weight = make_inputs(1)
    a, b = build("replicated"), build("sharded")
    a.load_state_dict({"weight": weight})
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.state_dict()["weight"], weight)
    with pytest.raises(ValueError, match=r"class centres are \(7, 5\) but this run has 7 classes"):
        a.load_state_dict({"weight": weight[:, :5]}, where="ckpt_3.pt")
    with pytest.raises(ValueError, match="no class-centre matrix"):
        a.load_state_dict({})
    with pytest.raises(ValueError, match="cannot be split over 9 ranks"):
        MarginClassifier(C, D, build_head("arcface", **HEAD), mode="sharded",
                         ctx=DistContext(rank=8, world_size=9))
    with pytest.raises(ValueError, match="sample_rate=0.5 < 1 .* needs fc.mode=sharded"):
        build("replicated", sample_rate=0.5)


def test_grad_sq_norm_and_optimizer_state_in_one_process():
    emb, labels, weight = make_inputs(2)
    clf = build("replicated")
    clf.load_state_dict({"weight": weight})
    assert float(clf.grad_sq_norm()) == 0.0  # no gradient yet
    out = one_step(clf, emb, labels)
    torch.testing.assert_close(out["sq"], (out["w_grad"].float() ** 2).sum())
    saved = out["state"].state_dict()
    assert [g["name"] for g in saved["param_groups"]] == ["backbone", "classifier"]
    fresh = build("replicated")
    opt, state = sgd(fresh)
    state.load_state_dict(saved)
    torch.testing.assert_close(opt.state[fresh.weight]["momentum_buffer"],
                               out["opt"].state[clf.weight]["momentum_buffer"], rtol=0, atol=0)
    renamed = {**saved, "param_groups": [dict(g, name="fc") for g in saved["param_groups"]]}
    with pytest.raises(ValueError, match="parameter groups"):
        state.load_state_dict(renamed)


@pytest.mark.parametrize("amp,fc_precision,want", [
    ("bf16", "auto", "bf16"), ("none", "auto", "auto"), ("bf16", "ieee", "ieee")])
def test_the_training_call_reaches_the_kernel_with_the_amp_precision(
        helpers, tmp_path, monkeypatch, amp, fc_precision, want):
    """Through ``Trainer.train_step``: under train.amp=bf16 the B x C work is asked for bf16
    tiles (the embedding arrives in bf16 and the weight stays the fp32 master)."""
    from unpg.trainer import Trainer

    seen = []
    real = unpg.losses.lse_and_target

    def recording(emb_hat_BD, weight_CD, *args, **kwargs):
        seen.append((kwargs["precision"], weight_CD.dtype))
        return real(emb_hat_BD, weight_CD, *args, **kwargs)

    monkeypatch.setattr(unpg.losses, "lse_and_target", recording)
    images, labels = helpers["make_data"](n_classes=5, per_class=8)
    cfg = helpers["tiny_config"](tmp_path, f"train.amp={amp}", f"fc.precision={fc_precision}",
                                 "fc.backend=chunked")
    factory = lambda c, r, w, d, train=True: helpers["MemoryLoader"](images, labels, c, r, w, d)  # noqa: E731
    t = Trainer(cfg, loader_factory=factory).setup()
    assert t.classifier.precision == want
    t.loader.set_epoch(0)
    x, y = next(iter(t.loader))
    out = t.train_step(x, y)
    assert bool(out["ok"]) and torch.isfinite(out["loss"])
    assert seen == [(want, torch.float32)]
    assert t.classifier.weight.dtype == torch.float32


def test_resolve_precision():
    assert resolve_precision("auto", torch.bfloat16) == "bf16"
    assert resolve_precision("auto", torch.float16) == "fp16"
    assert resolve_precision("auto", None) == "auto"
    assert resolve_precision("tf32", torch.bfloat16) == "tf32"
    with pytest.raises(ValueError, match="fc.precision"):
        resolve_precision("fp8", None)


# ----------------------------------------------------------------------------- gloo ranks



@pytest.mark.slow
def test_two_ranks_equal_one_process_and_state_reshards(tmp_path, gloo_ranks):
    emb, labels, weight = make_inputs(5)
    ref = {}
    for mode in ("replicated", "sharded"):  # one process: both layouts give the same numbers
        clf = build(mode)
        clf.load_state_dict({"weight": weight})
        ref[mode] = one_step(clf, emb, labels)
        ref[mode]["weight"] = clf.state_dict()["weight"]
    single = ref["replicated"]
    momentum = single["opt"].state[single["opt"].param_groups[1]["params"][0]]["momentum_buffer"]
    full_optim = single["state"].state_dict()
    ranks = gloo_ranks(__file__, tmp_path, RANKS, dict(emb=emb, labels=labels, weight=weight,
                                         full_optim=full_optim))
    b = B // RANKS
    for mode in ("replicated", "sharded"):
        for rank, res in enumerate(ranks):
            got = res[mode]
            tag = f"{mode} rank {rank}"
            start, n = int(got["start"]), int(got["num_local"])
            if mode == "sharded":  # every rank computes the global-batch loss
                torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-12, atol=0)
            # Replicated: rank k's rows get d(sum_k L_k)/de = K dL/de, which DDP's average of
            # the backbone gradients turns into dL/dtheta (convention in unpg.distributed).
            factor = RANKS if mode == "replicated" else 1
            torch.testing.assert_close(got["emb_grad"],
                                       factor * single["emb_grad"][rank * b:(rank + 1) * b],
                                       rtol=1e-10, atol=1e-12, msg=lambda m, t=tag: f"{t}: {m}")
            torch.testing.assert_close(got["w_grad"], single["w_grad"][start:start + n],
                                       rtol=1e-10, atol=1e-12, msg=lambda m, t=tag: f"{t}: {m}")
            torch.testing.assert_close(got["sq"], single["sq"], rtol=1e-6, atol=0)
            # 1 -> 2: the single process's optimizer state cut to this rank's rows.
            torch.testing.assert_close(got["loaded_momentum"], momentum[start:start + n],
                                       rtol=0, atol=0)
        if mode == "replicated":  # per-rank local means: their average is the global loss
            mean = (ranks[0][mode]["loss"] + ranks[1][mode]["loss"]) / 2
            torch.testing.assert_close(mean, single["loss"], rtol=1e-12, atol=0)
        assert [bool(r[mode]["loss_is_global"]) for r in ranks] == [mode == "sharded"] * 2
        # 2 -> 1: rank 0 holds the full matrices (the others nothing), equal to one process.
        saved = ranks[0][mode]
        assert "weight" not in ranks[1][mode]["clf_state"] and not ranks[1][mode]["optim_state"]
        torch.testing.assert_close(saved["clf_state"]["weight"], single["weight"], rtol=1e-12,
                                   atol=1e-14)
        fresh = build("replicated")
        fresh.load_state_dict(saved["clf_state"])
        opt, state = sgd(fresh)
        state.load_state_dict(saved["optim_state"])
        torch.testing.assert_close(opt.state[fresh.weight]["momentum_buffer"], momentum,
                                   rtol=1e-10, atol=1e-14)


def rank_results(rank, world, data):
    ctx = DistContext(rank, world, 0, torch.device("cpu"), dist.group.WORLD)
    b = data["emb"].shape[0] // world
    emb_b, labels_b = (t[rank * b:(rank + 1) * b] for t in (data["emb"], data["labels"]))
    results = {}
    for mode in ("replicated", "sharded"):
        clf = build(mode, ctx=ctx)
        clf.load_state_dict({"weight": data["weight"]})
        out = one_step(clf, emb_b, labels_b)
        fresh = build(mode, ctx=ctx)
        opt, state = sgd(fresh)
        state.load_state_dict(data["full_optim"])
        results[mode] = dict(
            loss=out["loss"], emb_grad=out["emb_grad"], w_grad=out["w_grad"], sq=out["sq"],
            start=torch.tensor(clf.start), num_local=torch.tensor(clf.num_local),
            loss_is_global=torch.tensor(clf.loss_is_global),
            clf_state=clf.state_dict(), optim_state=out["state"].state_dict(),
            loaded_momentum=opt.state[fresh.weight]["momentum_buffer"])
    return results


def run_rank(rank, world, init_file, in_path, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = rank_results(rank, world, torch.load(in_path, weights_only=True))
        tmp = f"{out_path}.tmp"
        torch.save(results, tmp)
        os.replace(tmp, out_path)
        # The classifiers (and their gradient averagers) holding the group are gone with
        # rank_results' frame; collect any cycle, then no rank tears gloo down while a peer is
        # still in a collective: either aborts a rank at exit now and then ("terminate called
        # without an active exception").
        del results
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(RANK, WORLD, INIT_FILE, IN_PATH, OUT_PATH)  # noqa: F821 (init_globals)
