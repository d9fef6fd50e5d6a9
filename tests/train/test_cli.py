"""The entry point: the official code's flag shorthands, error exits, and a real run of ``unpg/train.py`` /
``python -m unpg.train`` on a synthetic rec that is stopped by SIGTERM and resumed to the exact
loss sequence of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unpg import checkpoint as ck
from unpg.train import build_parser, main, resolve_config, shorthand_overrides

REPO = Path(__file__).resolve().parents[2]


def test_seed_flags_map_onto_config_keys():
    args = build_parser().parse_intermixed_args(["--model", "iresnet-34", "--head", "cosface",
                                      "--unpg_wisk", "1.0", "--name", "example", "--weights",
                                      "w.pt", "--resume"])
    assert shorthand_overrides(args) == [
        "model.name=iresnet-34", "head.name=cosface", "unpg.enabled=true", "unpg.wisk=1.0",
        "train.name=example", "model.weights=w.pt", "train.resume=auto"]
    cfg = resolve_config(["--config", str(REPO / "configs" / "ms1mv2_r100_arcface.yaml"),
                          "--model", "iresnet-34", "--unpg_wisk", "1.0", "--name", "example",
                          "--resume", "train.name=explicit", "optim.lr=0.05"])
    assert cfg.model.name == "iresnet-34" and cfg.unpg.enabled and cfg.unpg.wisk == 1.0
    assert cfg.train.resume == "auto" and cfg.optim.lr == 0.05
    assert cfg.train.name == "explicit"  # an explicit key=value wins over a shorthand
    assert cfg.data.num_classes == 85742  # the rest comes from the file
    plain = resolve_config([])
    assert not plain.unpg.enabled and plain.train.resume == ""


def test_bad_config_and_missing_data_exit_2_with_a_fix(capsys, tmp_path):
    assert main(["optim.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "fast" in err
    assert main([f"data.rec={tmp_path / 'none'}", "train.device=cpu",
                 f"train.output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data.rec={tmp_path / 'none'}") and err.count("\n") == 1
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing written


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_uninterrupted_run(tiny_rec, tmp_path, losses):
    common = [f"data.rec={tiny_rec}", "loader.workers=0", "model.name=mobilefacenet_s",
              "model.embedding_size=32", "model.channels_last=true", "head.s=16.0",
              "head.m=0.2", "unpg.enabled=true", "train.batch_size=8", "train.amp=none",
              "train.device=cpu", "schedule.epochs=100", "schedule.warmup_epochs=1",
              "train.log_every=1", "train.save_every=0", "eval.every=0",
              f"train.output_dir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "unpg.train", *common, "train.name=sig"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    latest = ck.latest_checkpoint(tmp_path / "sig")
    saved = ck.load_checkpoint(latest)["train_state"]  # complete, loads with weights_only=True
    k = saved["global_step"]
    assert k >= 3 and latest.name == f"ckpt_{k:09d}.pt"
    assert saved["epoch"] * 6 + saved["step_in_epoch"] == k  # 48 images / 8 = 6 batches/epoch
    assert not [p for p in (tmp_path / "sig").iterdir() if p.name.endswith(".tmp")]

    # Resume past an epoch boundary, and run the same steps uninterrupted through the file path.
    stop = k + 7
    subprocess.run([sys.executable, "-m", "unpg.train", *common, "train.name=sig", "--resume",
                    f"train.max_steps={stop}"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "unpg/train.py", *common, "train.name=full",
                    f"train.max_steps={stop}"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    resumed, full = losses(tmp_path / "sig"), losses(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, stop + 1))
    assert resumed == full  # bit-identical losses, steps 1..k from before the signal


@pytest.mark.slow
@pytest.mark.parametrize("how", [["-m", "unpg.train"], ["unpg/train.py"]])
def test_help_works_for_both_entry_points(how):
    out = subprocess.run([sys.executable, *how, "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "--unpg_wisk" in out and "key=value" in out


@pytest.mark.slow
def test_torchrun_two_processes_sharded(tiny_rec, tmp_path, losses):
    """The real launcher: torchrun starts unpg/train.py twice (gloo, env:// rendezvous)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "unpg/train.py", f"data.rec={tiny_rec}", "loader.workers=0",
           "model.name=mobilefacenet_s", "model.embedding_size=32", "train.batch_size=8",
           "train.device=cpu", "fc.mode=sharded", "--unpg_wisk", "1.5", "train.max_steps=2",
           "train.log_every=1", f"train.output_dir={tmp_path}", "--name", "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    saved = ck.load_checkpoint(tmp_path / "ddp" / "ckpt_000000002.pt")
    assert saved["train_state"]["world_size"] == 2
    assert saved["classifier"]["weight"].shape == (8, 32)
    assert saved["config"]["unpg"] == {"enabled": True, "wisk": 1.5}
    assert [s for s, _ in losses(tmp_path / "ddp")] == [1, 2]
