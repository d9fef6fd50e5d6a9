"""SIGTERM to the whole process group, as torchrun, ``docker stop`` and SLURM deliver it: the
loader's worker processes ignore it, the trainer finishes its step, saves one checkpoint (one
for all ranks) and exits 0. Real processes, real signals: each run starts in its own session
and is signalled with ``os.killpg``."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unpg import checkpoint as ck

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def common(tiny_rec, out, name):
    return [f"data.rec={tiny_rec}", "model.name=mobilefacenet_s", "model.embedding_size=32",
            "train.batch_size=8", "train.amp=none", "train.device=cpu", "schedule.epochs=100",
            "train.log_every=1", "train.save_every=0", "eval.every=0",
            f"train.output_dir={out}", f"train.name={name}"]


def run_until_logged(cmd, metrics: Path, rows: int, timeout: float = 240.0):
    """Start ``cmd`` in a new session, wait for ``rows`` lines of ``metrics``, SIGTERM the
    whole process group and return ``(returncode, output)``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out


def last_logged_step(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max(int(line.split('"step": ')[1].split(",")[0]) for line in lines)


@pytest.fixture(scope="module")
def packed(tiny_rec, tmp_path_factory):
    """The tiny rec as a packed file (``loader.name=ffcv``)."""
    out = tmp_path_factory.mktemp("packed") / "data.ffcv"
    subprocess.run([sys.executable, "-m", "unpg.tools.pack", "--rec", str(tiny_rec), "--out",
                    str(out)], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "ffcv"])
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_0(tiny_rec, packed,
                                                                            tmp_path, loader):
    run_dir = tmp_path / "grp"
    source = ["loader.name=ffcv", f"data.ffcv_file={packed}"] if loader == "ffcv" else []
    code, out = run_until_logged(
        [sys.executable, "-m", "unpg.train", *common(tiny_rec, tmp_path, "grp"), *source,
         "loader.workers=2"], run_dir / "metrics.jsonl", rows=2)
    assert code == 0, out[-4000:]
    assert "SIGTERM received" in out and "Traceback" not in out, out[-4000:]
    latest = ck.latest_checkpoint(run_dir)
    state = ck.load_checkpoint(latest)["train_state"]
    assert state["global_step"] == last_logged_step(run_dir) >= 2  # no step lost
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_saves_one_checkpoint_for_both_ranks(tiny_rec, tmp_path):
    run_dir = tmp_path / "ddp"
    code, out = run_until_logged(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "unpg/train.py", *common(tiny_rec, tmp_path, "ddp"), "loader.workers=1",
         "fc.mode=sharded"], run_dir / "metrics.jsonl", rows=2)
    # Both ranks agreed on the step, saved together and returned 0 (rank 0 logs "finished");
    # torchrun's own agent reports the signal it received (its exit code is its own).
    assert "SIGTERM received" in out and "finished: SIGTERM" in out, out[-4000:]
    assert "exitcode  : 1" not in out and "Traceback" not in out.split("SIGTERM received")[0]
    saved = ck.load_checkpoint(ck.latest_checkpoint(run_dir))
    k = saved["train_state"]["global_step"]
    assert k == last_logged_step(run_dir) >= 2 and saved["train_state"]["world_size"] == 2
    # The checkpoint resumes (here on one process: the class centres reshard).
    done = subprocess.run([sys.executable, "-m", "unpg.train", *common(tiny_rec, tmp_path, "ddp"),
                           "loader.workers=0", "fc.mode=sharded", "--resume",
                           f"train.max_steps={k + 1}"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert last_logged_step(run_dir) == k + 1
