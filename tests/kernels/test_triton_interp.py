"""Runs the Triton interpreter cases (``_interp_cases.py``) in a fresh process.

``TRITON_INTERPRET=1`` only takes effect if set before triton is imported, and any other test
module in this pytest process may have imported triton already; a subprocess is the robust way.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the Triton interpreter in a subprocess: `make test-fast` leaves them out

CASES = Path(__file__).with_name("_interp_cases.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    repo_root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter cases failed:\n{out[-8000:]}"
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) >= 10, f"too few interpreter cases ran:\n{out[-3000:]}"
    assert "skipped" not in out.splitlines()[-1], out[-3000:]
