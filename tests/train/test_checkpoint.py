"""Checkpoint files: atomic writes, rotation, best.pt, RNG state, FC resharding, and resuming
that reproduces the uninterrupted run bit for bit."""
import json
import random

import numpy as np
import pytest
import torch

from unpg import checkpoint as ck
from unpg.train import main


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_atomic_save_never_leaves_partial_files(tmp_path):
    path = tmp_path / "ckpt_000000001.pt"
    ck.atomic_save({"a": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="boom"):
        ck.atomic_save({"a": torch.zeros(1000), "b": Unpicklable()}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))  # old intact


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a unpg training checkpoint"):
        ck.load_checkpoint(tmp_path / "x.pt")
    (tmp_path / "y.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        ck.load_checkpoint(tmp_path / "y.pt")
    with pytest.raises(FileNotFoundError, match="train.resume"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip(tmp_path):
    state = ck.capture_rng()
    torch.save({"rng": state}, tmp_path / "r.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    ck.restore_rng(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_resume_mid_epoch_reproduces_the_uninterrupted_run_exactly(memory_run, losses, tmp_path,
                                                                   optim):
    full, _ = memory_run(tmp_path / "full", f"optim.name={optim}")
    assert full.global_step == 10
    # Interrupted at step 7 (epoch 2, batch 2 of 5), then resumed from the latest checkpoint.
    part, result = memory_run(tmp_path / "part", "train.max_steps=7", f"optim.name={optim}")
    assert result["reason"] == "max_steps" and result["global_step"] == 7
    run_dir = tmp_path / "part" / "run"
    assert [p.name for p in ck.list_checkpoints(run_dir)] == ["ckpt_000000006.pt",
                                                              "ckpt_000000007.pt"]  # keep_last=2
    saved = ck.load_checkpoint(run_dir / "ckpt_000000007.pt")["train_state"]
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 2, 7)
    box = []
    resumed, result = memory_run(tmp_path / "part", "train.resume=auto", f"optim.name={optim}",
                                 loader_box=box)
    assert result["global_step"] == 10
    # Epoch 2 is read once from its start: 2 batches skipped (same order), 3 trained on.
    assert box[0].batches_read == 5
    # Bit-identical loss sequence (the resumed run appended steps 8..10 to metrics.jsonl).
    assert losses(run_dir) == losses(tmp_path / "full" / "run")
    for a, b in zip(full.backbone.state_dict().values(), resumed.backbone.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(full.classifier.weight, resumed.classifier.weight)
    for idx, state in full.optimizer.state_dict()["state"].items():  # momentum / Adam moments
        for key, value in state.items():
            assert torch.equal(value, resumed.optimizer.state_dict()["state"][idx][key]), key
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_best_checkpoint_follows_verification_accuracy(memory_run, tiny_rec, tmp_path):
    trainer, result = memory_run(tmp_path / "best", "eval.every=2",
                           f"eval.bins=[{tiny_rec / 'synth_val.bin'}]", "eval.batch_size=40",
                           "train.max_steps=6")
    run_dir = tmp_path / "best" / "run"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["synth_val/accuracy"]) for r in evals if r["kind"] == "eval"]
    assert [s for s, _ in evals] == [2, 4, 6]
    best_step, best_acc = max(evals, key=lambda e: (e[1], -e[0]))  # first of equal maxima
    best = ck.load_checkpoint(run_dir / ck.BEST_NAME)
    best = best["train_state"]
    assert best["global_step"] == best_step and best["best_score"] == pytest.approx(best_acc)
    assert 0.0 <= best_acc <= 1.0


@pytest.mark.parametrize("change, component", [("optim.name=adamw", "optimizer"),
                                               ("model.embedding_size=8", "backbone")])
def test_resume_into_another_model_or_optimizer_names_the_component(memory_run, tmp_path, change,
                                                                    component):
    memory_run(tmp_path, "train.max_steps=2")
    with pytest.raises(ValueError) as info:
        memory_run(tmp_path, "train.resume=auto", change)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'run' / 'ckpt_000000002.pt'}: the saved {component} ")
    assert "\n" not in msg and "resume with the model, optimizer and data" in msg


@pytest.mark.slow
def test_iresnet_run_resumes(fixtures_dir, tmp_path, capsys):
    """iresnet keeps a frozen tensor (``features.weight``): the optimizer holds one tensor less
    than the backbone's state, which a resume must not mistake for another architecture."""
    common = [f"data.rec={fixtures_dir / 'ms1m_tiny'}", "model.name=iresnet18",
              "model.embedding_size=32", "train.batch_size=4", "loader.workers=0",
              "train.amp=none", "train.device=cpu", "eval.every=0", "train.log_every=1",
              f"train.output_dir={tmp_path}", "train.name=r18"]
    assert main(common + ["train.max_steps=1"]) == 0
    assert main(common + ["train.max_steps=2", "--resume"]) == 0, capsys.readouterr().err
    saved = ck.load_checkpoint(tmp_path / "r18" / "ckpt_000000002.pt")
    assert saved["train_state"]["global_step"] == 2
    assert "features.weight" in saved["backbone"]  # the frozen tensor is saved and restored
