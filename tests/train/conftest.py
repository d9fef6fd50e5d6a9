"""Fixtures of the training tests: the helper module (loaded by path), a tiny synthetic rec, a
tiny in-memory training run, metrics.jsonl reading and a gloo launcher."""
import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="session")
def helpers():
    """``tests/train/_helpers.py`` as a namespace dict (TinyNet, MemoryLoader, tiny_config...)."""
    return runpy.run_path(str(HERE / "_helpers.py"))


@pytest.fixture(scope="session")
def tiny_rec(tmp_path_factory):
    """8 identities x 6 images + a 20-pair held-out synth_val.bin (about a second to write)."""
    from unpg.data.synthetic import ensure_dataset

    out = tmp_path_factory.mktemp("tiny_rec")
    ensure_dataset(str(out), identities=8, images_per_identity=6, val_identities=10,
                   val_pairs=20, seed=0, workers=1, progress=False)
    return out


def train_losses(run_dir) -> list:
    """``[(step, loss)]`` of the training rows of ``run_dir/metrics.jsonl``."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="session")
def losses():
    """``losses(run_dir)`` -> ``[(step, loss)]`` from metrics.jsonl."""
    return train_losses


@pytest.fixture(scope="session")
def memory_run(helpers):
    """``memory_run(out, *overrides, loader_box=None)`` -> ``(trainer, result)``: the tiny
    in-memory run (5 classes x 8 images, global batch 8: 5 steps per epoch, 2 epochs, a
    checkpoint every 3 steps, the newest 2 kept) through ``Trainer.setup().train()``."""
    from unpg.trainer import Trainer

    images, labels = helpers["make_data"](n_classes=5, per_class=8)

    def run(out, *overrides, loader_box=None):
        def factory(cfg, rank, world, device, train=True):
            loader = helpers["MemoryLoader"](images, labels, cfg, rank, world, device)
            if loader_box is not None:
                loader_box.append(loader)
            return loader

        cfg = helpers["tiny_config"](out, "schedule.epochs=2", "train.save_every=3",
                                     "train.keep_last=2", *overrides)
        trainer = Trainer(cfg, loader_factory=factory).setup()
        return trainer, trainer.train()

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(world: int, out_dir, *overrides: str, timeout: float = 120.0) -> None:
    """Run ``_worker.py`` as ``world`` ranks (torchrun's environment variables, gloo)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "_worker.py"), str(out_dir), *overrides], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0] * world, f"ranks exited with {codes}:\n" + "\n".join(
        o[-3000:] for o in outputs)


@pytest.fixture(scope="session")
def launch():
    """``launch(world, out_dir, *overrides)``: a gloo job of ``_worker.py`` ranks."""
    return launch_workers
