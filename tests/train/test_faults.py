"""Faults: a non-finite loss skips its update; too many in a row stop the run with a message
naming the step and the last good checkpoint; bad configs and data stop before training; a
corrupt sample under ``loader.on_corrupt=error`` ends the run with one error line, exit 2."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unpg import checkpoint as ck
from unpg.distributed import DistContext
from unpg.recordio import IndexedRecordIO, unpack
from unpg.trainer import NonFiniteLossError, Trainer

REPO = Path(__file__).resolve().parents[2]
BAD_KEY = 9  # an image record of the tiny rec (key 0 is the header)


class PoisonedLoader:
    """Wraps a loader; batches at global steps ``bad`` (1-based) get NaN images."""

    def __init__(self, inner, bad, steps_per_epoch):
        self.inner, self.bad, self.spe = inner, set(bad), steps_per_epoch
        self.num_classes = inner.num_classes
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for i, (x, y) in enumerate(self.inner):
            step = self.epoch * self.spe + i + 1
            yield (torch.full_like(x, float("nan")) if step in self.bad else x), y


def make_trainer(helpers, tmp_path, bad, *overrides):
    images, labels = helpers["make_data"](n_classes=5, per_class=8)  # 5 steps per epoch

    def factory(cfg, rank, world, device, train=True):
        inner = helpers["MemoryLoader"](images, labels, cfg, rank, world, device)
        return PoisonedLoader(inner, bad, len(inner))

    cfg = helpers["tiny_config"](tmp_path, *overrides)
    return Trainer(cfg, loader_factory=factory).setup()


def test_nonfinite_step_is_skipped_with_a_warning(helpers, tmp_path, caplog):
    clean = make_trainer(helpers, tmp_path / "a", [], "train.max_steps=2")
    clean.train()
    skipped = make_trainer(helpers, tmp_path / "b", [3], "train.max_steps=3")
    with caplog.at_level("WARNING", logger="unpg.train"):
        result = skipped.train()
    assert result["reason"] == "max_steps"
    assert any("skipped 1 update" in r.getMessage() and "step 3" in r.getMessage()
               for r in caplog.records)
    # Step 3 changed nothing: weights and momentum equal the clean run after step 2.
    for a, b in zip(clean.backbone.parameters(), skipped.backbone.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(clean.classifier.weight, skipped.classifier.weight)
    s_clean = clean.optimizer.state_dict()["state"]
    s_skip = skipped.optimizer.state_dict()["state"]
    for idx in s_clean:
        assert torch.equal(s_clean[idx]["momentum_buffer"], s_skip[idx]["momentum_buffer"])
    assert skipped.global_step == 3 and skipped.scheduler.last_epoch == 3


def test_too_many_nonfinite_steps_stop_naming_step_and_checkpoint(helpers, tmp_path):
    trainer = make_trainer(helpers, tmp_path, range(3, 100), "train.max_nonfinite=2",
                           "train.save_every=2")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    msg = str(info.value)
    # Steps 3, 4, 5 are non-finite: the run of 3 > 2 is reached at step 5; step 4 (two
    # skipped updates, unchanged weights) was still saved.
    assert "at step 5" in msg and "train.max_nonfinite=2" in msg
    assert str(tmp_path / "run" / "ckpt_000000004.pt") in msg
    assert trainer.global_step == 5


def test_missing_data_is_reported_before_anything_is_written(tmp_path):
    from unpg.config import load_config

    out = f"train.output_dir={tmp_path / 'out'}"
    (tmp_path / "half").mkdir()
    for rec, pattern in [(tmp_path / "nope", r"data.rec=.*nope"), ("", "data.rec"),
                         (tmp_path / "half", r"data.rec=.*half.*train.rec")]:
        cfg = load_config(None, [f"data.rec={rec}", "train.device=cpu", out])
        with pytest.raises(ValueError, match=pattern):
            Trainer(cfg).setup()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_class_count_mismatch_is_reported(tiny_rec, tmp_path):
    from unpg.config import load_config

    cfg = load_config(None, [f"data.rec={tiny_rec}", "data.num_classes=99", "train.device=cpu",
                             "train.batch_size=8", "loader.workers=0", "model.name=mobilefacenet_s",
                             f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"data.num_classes=99 .* 8 classes.*(0|read from)"):
        Trainer(cfg).setup()


def test_world_size_and_file_checks(helpers, tmp_path):
    cfg = helpers["tiny_config"](tmp_path, "train.batch_size=6", "optim.accum_steps=2")
    trainer = Trainer(cfg)
    trainer.ctx = DistContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"train.batch_size=6 .* 2 x 2; .* multiple of 4"):
        trainer.check_config()
    with pytest.raises(ValueError, match="checkpoint not found: /no/such.pt"):
        Trainer(helpers["tiny_config"](tmp_path, "train.resume=/no/such.pt")).setup()
    for override, pattern in [
        ("model.weights=/no/w.pt", "model.weights=/no/w.pt: file not found"),
        ("model.name=resnet-9000", "unknown backbone 'resnet-9000'"),
    ]:
        t = Trainer(helpers["tiny_config"](tmp_path, override))
        t.ctx = DistContext()
        with pytest.raises(ValueError, match=pattern):
            t.check_config()
    t = Trainer(helpers["tiny_config"](tmp_path, "eval.every=5", "eval.bins=[/no/x.bin]"))
    t.ctx = DistContext()
    with pytest.raises(ValueError, match=r"verification file\(s\) not found: /no/x.bin"):
        t.check_config()
    with pytest.raises(ValueError, match="train.amp=fp16 needs CUDA"):
        Trainer(helpers["tiny_config"](tmp_path, "train.amp=fp16")).setup_distributed()


@pytest.mark.slow
def test_corrupt_sample_under_on_corrupt_error_is_one_error_line_and_exit_2(tiny_rec, tmp_path):
    """A training run meets a record whose JPEG is destroyed: one ``error:`` line naming the
    record and the fix, exit code 2, no traceback; the steps done before it are saved."""
    rec = tmp_path / "rec"
    shutil.copytree(tiny_rec, rec)
    offsets = dict(map(int, line.split("\t")) for line in (rec / "train.idx").read_text().split("\n")
                   if line.strip())
    offset = offsets[BAD_KEY]
    with IndexedRecordIO(str(rec / "train.idx"), str(rec / "train.rec"), "r") as r:
        record = r.read_idx(BAD_KEY)
    _, jpeg = unpack(record)
    start = offset + 8 + len(record) - len(jpeg)  # after magic, length and the IRHeader
    with open(rec / "train.rec", "r+b") as f:
        f.seek(start)
        f.write(bytes(64))  # no SOI marker, no header: undecodable by any decoder
    cmd = [sys.executable, "-m", "unpg.train", f"data.rec={rec}", "loader.on_corrupt=error",
           "loader.workers=1", "model.name=mobilefacenet_s", "model.embedding_size=32",
           "train.batch_size=8", "train.amp=none", "train.device=cpu", "eval.every=0",
           "train.log_every=1", f"train.output_dir={tmp_path}", "train.name=bad"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    err_lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), done.stderr[-3000:]
    assert f"record key {BAD_KEY}" in err_lines[0] and "loader.on_corrupt=skip" in err_lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    latest = ck.latest_checkpoint(tmp_path / "bad")
    trained = len((tmp_path / "bad" / "metrics.jsonl").read_text().splitlines())
    if trained:  # the bad sample was not in the first batch: those steps are kept
        assert ck.load_checkpoint(latest)["train_state"]["global_step"] == trained
