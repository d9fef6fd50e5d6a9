"""A run folder belongs to one run: a fresh run refuses an earlier run's folder (one ``error:``
line, exit 2, nothing touched) unless ``train.overwrite=true``; rotation deletes only this run's
checkpoints; ``train.resume=auto`` continues the run of ``run.json`` from its newest *readable*
checkpoint and removes what an interrupted save left; an unwritable output folder is reported
before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unpg import checkpoint as ck
from unpg.train import main

REPO = Path(__file__).resolve().parents[2]


def snapshot(folder):
    """Every file under ``folder`` with its bytes: 'nothing touched' is an equal snapshot."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run_id(run_dir):
    return json.loads((run_dir / "run.json").read_text())["run_id"]


def test_fresh_run_refuses_an_earlier_runs_folder_and_touches_nothing(memory_run, tiny_rec,
                                                                      tmp_path, capsys):
    memory_run(tmp_path, "train.max_steps=4")
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    assert {"run.json", "config.yaml", "metrics.jsonl", "ckpt_000000004.pt"} <= set(before)
    capsys.readouterr()
    # The README's own example after `make demo`: a second fresh run into the same folder.
    code = main([f"data.rec={tiny_rec}", "train.device=cpu", "model.name=mobilefacenet_s",
                 "train.batch_size=8", "loader.workers=0", f"train.output_dir={tmp_path}",
                 "train.name=run", "train.max_steps=3"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: run folder {run_dir} is not empty") and err.count("\n") == 1
    assert "--resume" in err and "train.overwrite=true" in err
    assert snapshot(run_dir) == before


def test_overwrite_deletes_the_earlier_run_only_when_asked(memory_run, losses, tmp_path):
    memory_run(tmp_path, "train.max_steps=4")
    run_dir = tmp_path / "run"
    first = run_id(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"train.overwrite=true: .*\(notes.txt\); nothing was deleted"):
        memory_run(tmp_path, "train.max_steps=2", "train.overwrite=true")
    assert snapshot(run_dir) == before
    (run_dir / "notes.txt").unlink()
    _, result = memory_run(tmp_path, "train.max_steps=2", "train.overwrite=true")
    assert result["global_step"] == 2
    assert [p.name for p in ck.list_checkpoints(run_dir)] == ["ckpt_000000002.pt"]
    assert [s for s, _ in losses(run_dir)] == [1, 2]  # the earlier run's rows are gone
    assert run_id(run_dir) != first
    assert ck.load_checkpoint(run_dir / "ckpt_000000002.pt")["run_id"] == run_id(run_dir)


def test_rotation_touches_only_this_runs_checkpoints(memory_run, losses, tmp_path):
    """Rewinding to step 3 abandons ckpt_6: the new writes (4, 5) are kept and ckpt_6 rotates
    out; a file that only looks like a checkpoint is never deleted nor resumed from."""
    memory_run(tmp_path, "train.max_steps=6", "train.keep_last=3")  # saves 3, 5 (epoch end), 6
    run_dir = tmp_path / "run"
    uninterrupted = losses(run_dir)
    assert [p.name for p in ck.list_checkpoints(run_dir)] == [
        "ckpt_000000003.pt", "ckpt_000000005.pt", "ckpt_000000006.pt"]
    foreign = run_dir / "ckpt_000000099.pt"
    torch.save({"not": "ours"}, foreign)
    _, result = memory_run(tmp_path, f"train.resume={run_dir / 'ckpt_000000003.pt'}",
                           "train.max_steps=5", "train.save_every=1")
    assert result["global_step"] == 5
    assert [p.name for p in ck.list_checkpoints(run_dir)] == [
        "ckpt_000000004.pt", "ckpt_000000005.pt", "ckpt_000000099.pt"]
    assert foreign.read_bytes() and torch.load(foreign, weights_only=True) == {"not": "ours"}
    # --resume continues this run from its newest write (step 5), not from ckpt_99 or ckpt_6.
    resumed, result = memory_run(tmp_path, "train.resume=auto", "train.max_steps=6")
    assert result["global_step"] == 6
    assert losses(run_dir) == uninterrupted  # steps 4-6 retrained to the same losses


def test_resume_auto_skips_an_unreadable_newest_checkpoint_and_removes_stale_temporaries(
        memory_run, losses, tmp_path, caplog):
    _, _ = memory_run(tmp_path / "full")
    memory_run(tmp_path, "train.max_steps=7")  # keeps ckpt_6, ckpt_7
    run_dir = tmp_path / "run"
    newest = run_dir / "ckpt_000000007.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated copy
    stale = run_dir / ".ckpt_000000008.pt.x1y2z3_a.tmp"  # what a kill -9 during a save leaves
    stale.write_bytes(b"partial")
    other = run_dir / ".notes.tmp"  # not ours: left alone
    other.write_bytes(b"keep")
    with caplog.at_level("WARNING", logger="unpg.train"):
        _, result = memory_run(tmp_path, "train.resume=auto")
    text = caplog.text
    assert f"skipping {newest}" in text and "ckpt_000000006.pt, the newest readable" in text
    assert result["global_step"] == 10
    assert losses(run_dir) == losses(tmp_path / "full" / "run")
    assert not stale.exists() and other.read_bytes() == b"keep"


def test_resume_auto_refuses_to_start_over_when_the_runs_checkpoints_are_gone(memory_run,
                                                                             tmp_path):
    memory_run(tmp_path, "train.max_steps=3")
    (tmp_path / "run" / "ckpt_000000003.pt").unlink()
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match=r"no checkpoint .* readable .*missing: ckpt_000000003.pt"):
        memory_run(tmp_path, "train.resume=auto")
    assert snapshot(tmp_path / "run") == before


def test_resumed_config_change_is_kept_beside_config_yaml(memory_run, tmp_path):
    memory_run(tmp_path, "train.max_steps=2")
    run_dir = tmp_path / "run"
    first = (run_dir / "config.yaml").read_bytes()
    memory_run(tmp_path, "train.resume=auto", "train.max_steps=3", "optim.lr=0.01")
    assert (run_dir / "config.yaml").read_bytes() == first
    changed = (run_dir / "config_resumed_000000002.yaml").read_text()
    assert "lr: 0.01" in changed and "max_steps: 3" in changed
    memory_run(tmp_path, "train.resume=auto", "train.max_steps=4")  # max_steps differs
    memory_run(tmp_path, "train.resume=auto", "train.max_steps=2")  # as at the start: no file
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == [
        "config.yaml", "config_resumed_000000002.yaml", "config_resumed_000000003.yaml"]


def test_unwritable_output_folder_is_one_error_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # data.rec does not exist either: the output folder is checked first.
    code = main([f"data.rec={tmp_path / 'no_data'}", "train.device=cpu",
                 f"train.output_dir={blocker}", "train.name=run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: train.output_dir: cannot write the run folder {blocker}/run")
    assert err.count("\n") == 1 and blocker.read_text() == "x"


@pytest.mark.slow
def test_every_rank_of_a_torchrun_job_stops_on_a_refused_run_folder(memory_run, tiny_rec,
                                                                   tmp_path):
    """Rank 0 decides; the other rank gets the same error instead of waiting for rank 0."""
    memory_run(tmp_path, "train.max_steps=2")
    before = snapshot(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "unpg/train.py", f"data.rec={tiny_rec}", "train.device=cpu", "train.batch_size=8",
         "model.name=mobilefacenet_s", f"train.output_dir={tmp_path}", "train.name=run"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    # Counted, not split into lines: the two ranks share one stderr pipe and their lines may
    # interleave mid-line.
    assert done.returncode != 0 and done.stderr.count("error: run folder") == 2, \
        done.stderr[-3000:]
    assert snapshot(tmp_path / "run") == before
