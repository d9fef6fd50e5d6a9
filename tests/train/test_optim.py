"""Optimizer groups, the warm-up + cosine/poly schedule, the device-side skipped step and
gradient accumulation."""
import math

import pytest
import torch

from unpg.config import load_config
from unpg.grads import finalize_grads
from unpg.optim import (
    Schedule,
    WarmupDecay,
    build_optimizer,
    group_params,
    guarded_step,
    param_groups,
    schedule_steps,
)


def hand_schedule(t, total, warmup, name, min_factor=0.0, power=2.0):
    if t < warmup:
        return (t + 1) / warmup
    p = (t - warmup) / (total - warmup)
    if name == "cosine":
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * p))
    return min_factor + (1 - min_factor) * (1 - p) ** power


@pytest.mark.parametrize("name", ["cosine", "poly"])
def test_schedule_follows_warmup_then_decay(name):
    cfg = load_config(None, ["optim.lr=0.2", "schedule.epochs=4", "schedule.warmup_epochs=0.5",
                             f"schedule.name={name}", "schedule.min_lr=0.02",
                             "schedule.poly_power=3.0"])
    sched = schedule_steps(cfg.schedule, cfg.optim.lr, steps_per_epoch=10)
    assert (sched.total_steps, sched.warmup_steps) == (40, 5)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=cfg.optim.lr)
    lr_sched = Schedule(opt, sched, cfg.optim.lr)
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lr_sched.step()
    want = [0.2 * hand_schedule(t, 40, 5, name, 0.1, 3.0) for t in range(40)]
    assert seen == pytest.approx(want, rel=1e-12)
    # Spot values: warm-up is linear from lr/5; the decay starts at lr and ends near min_lr.
    assert seen[0] == pytest.approx(0.04) and seen[4] == pytest.approx(0.2)
    assert seen[5] == pytest.approx(0.2) and 0.02 < seen[-1] < 0.03


def test_schedule_state_is_the_position_and_round_trips_through_weights_only_load(tmp_path):
    """The checkpoint holds the position; the shape is this run's (a longer run resumed from
    step 7 continues on its own curve, not the saved one)."""
    shape = WarmupDecay(total_steps=20, warmup_steps=3, name="cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s1 = Schedule(opt, shape, 0.1)
    for _ in range(7):
        opt.step()
        s1.step()
    torch.save(s1.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s2 = Schedule(opt2, WarmupDecay(total_steps=20, warmup_steps=3), 0.1)
    s2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert s2.steps_done == 7 and s2.get_last_lr() == s1.get_last_lr() == [0.1 * shape(7)]
    for _ in range(5):
        opt.step()
        s1.step()
        opt2.step()
        s2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    longer = WarmupDecay(total_steps=40, warmup_steps=3)
    opt3 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    s3 = Schedule(opt3, longer, 0.2)
    s3.load_state_dict(s1.state_dict())
    assert opt3.param_groups[0]["lr"] == pytest.approx(0.2 * longer(12))
    with pytest.raises(ValueError, match="steps_done"):
        s3.load_state_dict({"steps_done": -1})


def test_classifier_has_its_own_named_group_with_insightface_weight_decay():
    cfg = load_config(None, ["optim.weight_decay=1.0e-3"])
    backbone, fc = torch.nn.Linear(3, 2), torch.nn.Linear(2, 5, bias=False)
    backbone.bias.requires_grad_(False)  # frozen parameters stay out of the groups
    opt = build_optimizer(cfg.optim, param_groups(backbone, fc), torch.device("cpu"))
    names = [g["name"] for g in opt.param_groups]
    assert names == ["backbone", "classifier"]
    assert group_params(opt, "classifier") == [fc.weight]
    assert group_params(opt, "backbone") == [backbone.weight]
    with pytest.raises(KeyError, match="no parameter group named 'fc'"):
        group_params(opt, "fc")
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 1e-3]
    assert opt.param_groups[0]["momentum"] == 0.9
    adam = build_optimizer(load_config(None, ["optim.name=adamw"]).optim,
                           param_groups(backbone, fc), torch.device("cpu"))
    assert isinstance(adam, torch.optim.AdamW)


@pytest.mark.parametrize("fused", [False, True])
def test_guarded_step_skips_parameters_and_state(fused):
    """ok=False leaves weights and momentum untouched (also for a skipped FIRST fused step,
    whose momentum buffer would otherwise be uninitialised memory)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.01, fused=fused or None)
    ref = torch.nn.Parameter(w.detach().clone())
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    for step, ok in enumerate([False, True, False, True, True]):
        g = torch.randn(64)
        w.grad = g.clone() if ok else torch.full_like(g, math.nan)
        before = w.detach().clone()
        guarded_step(opt, torch.tensor(ok))
        if ok:
            ref.grad = g.clone()
            ref_opt.step()
            torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(opt.state[w]["momentum_buffer"],
                                       ref_opt.state[ref]["momentum_buffer"], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(w.detach(), before), f"step {step} moved the weights"
    assert not hasattr(opt, "found_inf")


def _accum_run(helpers, tmp_path, accum, steps=3):
    from unpg.trainer import Trainer

    images, labels = helpers["make_data"](n_classes=5, per_class=8)
    cfg = helpers["tiny_config"](tmp_path / f"acc{accum}", f"optim.accum_steps={accum}",
                                 "unpg.enabled=false", f"train.max_steps={steps}",
                                 "train.log_every=1000")
    factory = lambda c, r, w, d, train=True: helpers["MemoryLoader"](images, labels, c, r, w, d)  # noqa: E731
    t = Trainer(cfg, loader_factory=factory).setup()
    losses = []
    t.loader.set_epoch(0)
    for images_b, labels_b in t.loader:
        losses.append(float(t.train_step(images_b, labels_b)["loss"]))
        if len(losses) == steps:
            break
    return losses, t


def test_gradient_accumulation_equals_full_batch(helpers, tmp_path):
    """2 micro-batches of B/2 (loss / 2 each) == one batch of B for a BN-free model (UNPG
    off: with UNPG each micro-batch draws negatives from itself)."""
    l1, t1 = _accum_run(helpers, tmp_path, 1)
    l2, t2 = _accum_run(helpers, tmp_path, 2)
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(t1.backbone.parameters(), t2.backbone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t1.classifier.weight, t2.classifier.weight, rtol=1e-5, atol=1e-6)
    assert t1.scheduler.steps_done == t2.scheduler.steps_done == 3  # per optimizer step


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_grad_clip_scales_to_the_global_norm(helpers, tmp_path, mode):
    from unpg.trainer import Trainer

    images, labels = helpers["make_data"](n_classes=5, per_class=8)
    cfg = helpers["tiny_config"](tmp_path, "optim.grad_clip=0.5", f"fc.mode={mode}")
    factory = lambda c, r, w, d, train=True: helpers["MemoryLoader"](images, labels, c, r, w, d)  # noqa: E731
    t = Trainer(cfg, loader_factory=factory).setup()
    t.loader.set_epoch(0)
    x, y = next(iter(t.loader))
    loss, _ = t.classifier(t.model(x), y)
    loss.backward()
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    grads = [p.grad.clone() for p in params if p.grad is not None]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm > 0.5  # the clip is active
    torch.testing.assert_close(t.classifier.grad_sq_norm(), t.classifier.weight.grad.norm() ** 2)
    ok = finalize_grads(t.optimizer, loss.detach(), scaler=t.scaler, clip=0.5, ctx=t.ctx,
                        classifier=t.classifier)
    clipped = [p.grad for p in params if p.grad is not None]
    assert bool(ok)
    assert torch.cat([g.flatten() for g in clipped]).norm() == pytest.approx(0.5, rel=1e-4)
    for g, c in zip(grads, clipped):  # same direction
        torch.testing.assert_close(c, g * (0.5 / (norm + 1e-6)), rtol=1e-5, atol=1e-8)
