"""Shared test fixtures: paths to the read-only data in tests/fixtures, a CUDA skip marker, and
``gloo_ranks`` to run a script as several gloo ranks."""
import runpy
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"  # where each file came from: its README.md
MODELS_DIR = FIXTURES_DIR / "models"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    # The fixtures are part of the repository: a missing folder is a broken checkout, not a skip.
    assert FIXTURES_DIR.is_dir(), f"test fixtures not found at {FIXTURES_DIR}"
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def models_dir() -> Path:
    assert MODELS_DIR.is_dir(), f"test model weights not found at {MODELS_DIR}"
    return MODELS_DIR


def _run_gloo_ranks(script, tmp_path: Path, world: int, inputs) -> list:
    """Run ``script`` as ``world`` spawned processes (``__main__``, with globals RANK, WORLD,
    INIT_FILE for a file:// rendezvous, IN_PATH holding ``inputs`` and OUT_PATH where each rank
    saves its results) and return every rank's saved results, rank order."""
    in_path = tmp_path / "inputs.pt"
    torch.save(inputs, in_path)
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=runpy.run_path, args=(str(script),), kwargs=dict(
        init_globals=dict(RANK=r, WORLD=world, INIT_FILE=str(tmp_path / "store"),
                          IN_PATH=str(in_path), OUT_PATH=str(tmp_path / f"rank{r}.pt")),
        run_name="__main__")) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed (see captured stderr)"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="session")
def gloo_ranks():
    """``gloo_ranks(script, tmp_path, world, inputs) -> [results of rank 0, 1, ...]``."""
    return _run_gloo_ranks
