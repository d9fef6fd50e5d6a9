"""Data parallelism: 2 gloo ranks train exactly like 1 process on the same global batch, in
both FC layouts, with UNPG on; checkpoints saved by 2 shards resume on 1 and 3 processes.

The backbone is the BN-free ``tiny_test_net`` (per-rank batch-norm statistics would differ
from one process by construction, see ``unpg.distributed``). Tolerances: float32, the same
numbers summed in a different order (all-gathered batch, DDP buckets, sharded log-sum-exp),
amplified over 3-5 SGD steps with s=16: relative differences stay below 1e-6 in practice; the
bound is 1e-4 for weights and optimizer state, 1e-5 for losses. A wrong convention (DDP's
average of the sharded gradients, local UNPG negatives) is off by factors, not 1e-4.
"""
import json

import pytest
import torch

from unpg import checkpoint as ck

pytestmark = pytest.mark.slow  # gloo process groups: `make test-fast` leaves them out

# The global gradient norm is about 180 on the first two steps and 80 after: grad_clip=120
# clips those two (checking the norm over DDP-reduced backbone gradients and per-rank FC
# shards) and leaves the later steps unclipped (so a gradient scale error cannot hide).
COMMON = ("train.batch_size=12", "schedule.epochs=2", "train.save_every=3",
          "data.num_classes=0", "optim.grad_clip=120.0")


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def assert_same_state(got, want, where):
    for key, w in want["backbone"].items():
        assert rel_err(got["backbone"][key], w) < 1e-4, f"{where}: backbone {key}"
    assert rel_err(got["classifier"]["weight"], want["classifier"]["weight"]) < 1e-4, \
        f"{where}: class centres"
    groups = [g["name"] for g in want["optimizer"]["param_groups"]]
    assert groups == ["backbone", "classifier"]
    assert [g["name"] for g in got["optimizer"]["param_groups"]] == groups
    assert sorted(got["optimizer"]["state"]) == sorted(want["optimizer"]["state"])
    for idx, w_state in want["optimizer"]["state"].items():
        w_mom = w_state["momentum_buffer"]
        g_mom = got["optimizer"]["state"][idx]["momentum_buffer"]
        assert g_mom.shape == w_mom.shape  # the classifier's: full [C, D] whatever the layout
        assert rel_err(g_mom, w_mom) < 1e-4, f"{where}: momentum of parameter {idx}"
    assert got["train_state"]["global_step"] == want["train_state"]["global_step"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, launch):
    """``job(world, mode, max_steps, resume='')`` -> run folder; each distinct job runs once.
    Data: 7 classes x 8 images, global batch 12 (4 steps/epoch), 2 epochs."""
    done = {}

    def run(world, mode, max_steps, resume=""):
        key = (world, mode, max_steps, str(resume))
        if key not in done:
            out = tmp_path_factory.mktemp(f"w{world}_{mode}_{max_steps}")
            launch(world, out, *COMMON, f"train.max_steps={max_steps}", f"fc.mode={mode}",
                   f"train.resume={resume}")
            done[key] = out / "run"
        return done[key]

    return run


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_two_ranks_equal_one_process(job, mode):
    ref = job(1, "replicated", 5)
    run = job(2, mode, 3)
    got, want = losses(run), losses(ref)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"loss at step {step}"
    assert_same_state(ck.load_checkpoint(run / "ckpt_000000003.pt"),
                      ck.load_checkpoint(ref / "ckpt_000000003.pt"), f"2 ranks {mode}")


@pytest.mark.parametrize("world", [1, 3])
def test_two_shard_checkpoint_resumes_on_other_world_sizes(job, world):
    """7 classes: 2 shards of 4 + 3 rows saved as one [7, D] matrix, resumed as 1 shard of 7
    and as 3 shards of 3 + 2 + 2 (weights and momentum), continuing the reference run."""
    ref = job(1, "replicated", 5)
    saved = job(2, "sharded", 3) / "ckpt_000000003.pt"
    two = ck.load_checkpoint(saved)
    assert two["train_state"]["world_size"] == 2
    assert two["classifier"]["weight"].shape == (7, 16)  # gathered, not a shard
    run = job(world, "sharded", 5, resume=saved)
    got, want = losses(run), losses(ref)
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"loss at step {step}"
    assert_same_state(ck.load_checkpoint(run / "ckpt_000000005.pt"),
                      ck.load_checkpoint(ref / "ckpt_000000005.pt"), f"{world} rank(s)")


def test_class_sampling_moves_only_sampled_rows(helpers, tmp_path):
    """fc.sample_rate < 1 with 2 micro-batches: rows sampled by neither keep their weight and
    zero momentum; the union of both micro-batches' samples moves."""
    from unpg.trainer import Trainer

    images, labels = helpers["make_data"](n_classes=20, per_class=2)
    cfg = helpers["tiny_config"](tmp_path, "fc.mode=sharded", "fc.sample_rate=0.4",
                                 "optim.accum_steps=2", "train.max_steps=1")
    factory = lambda c, r, w, d, train=True: helpers["MemoryLoader"](images, labels, c, r, w, d)  # noqa: E731
    t = Trainer(cfg, loader_factory=factory).setup()
    before = t.classifier.weight.detach().clone()
    t.loader.set_epoch(0)
    images_b, labels_b = next(iter(t.loader))
    out = t.train_step(images_b, labels_b)
    assert bool(out["ok"])
    moved = (t.classifier.weight.detach() != before).any(dim=1)
    sampled = t.classifier.rows_moved_by_last_step()
    assert moved.any() and not moved[~sampled].any()
    assert set(labels_b.tolist()) <= set(sampled.nonzero().flatten().tolist())
    assert sampled.sum() < 20  # 2 micro-batches of 4 labels, 8 sampled rows each at most
    mom = t.optimizer.state[t.classifier.weight]["momentum_buffer"]
    assert torch.equal(mom[~sampled], torch.zeros_like(mom[~sampled]))
