"""Fixtures of the training tests: the helper module (loaded by path) and a tiny synthetic rec."""
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
