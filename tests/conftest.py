"""Shared test fixtures: paths to the read-only data in tests/fixtures and a CUDA skip marker."""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"  # where each file came from: its README.md
MODELS_DIR = FIXTURES_DIR / "models"


def pytest_collection_modifyitems(config, items):
    import torch

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
