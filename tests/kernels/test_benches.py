"""The loss and training-step benchmarks run end to end on the CPU (tiny shapes) and write the
documented ``--json`` names; their numbers are not checked here (benchmarks judge speed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benches as subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[2]


def _run(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args,
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {r["name"]: r["value"] for r in json.loads(out.read_text())["results"]}, proc.stdout


def test_loss_bench_side_by_side_names(tmp_path):
    results, stdout = _run(["--device", "cpu", "--B", "8", "--D", "16", "--C", "50,70",
                            "--states", "init,trained", "--repeats", "3",
                            "--impls", "official,torch,chunked,kernel,fwd,train"],
                           tmp_path, "loss")
    for impl in ("official", "torch", "chunked", "kernel", "fwd", "train"):
        for key in ("50_init", "50_trained", "70_init", "70_trained"):
            assert results[f"loss/{impl}/{key}/ms"] > 0
            assert f"loss/{impl}/{key}/peak_mb" in results
    assert "x floor" in stdout


def test_loss_bench_rejects_unknown_implementation(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "loss.py"), "--device", "cpu",
                           "--impls", "torch,nope"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_train_step_bench_reports_loss_share_and_backbone_alone(tmp_path):
    results, _ = _run(["--device", "cpu", "--model", "mobilefacenet_s", "--embedding-size", "32",
                       "--batch", "4", "--classes", "40", "--amp", "none", "--steps", "1",
                       "--passes", "3", "--warmup", "1"], tmp_path, "train_step")
    tag = "train_step/mobilefacenet_s_b4_none"
    assert results[f"{tag}/seconds"] > 0 and results[f"{tag}/backbone_alone_seconds"] > 0
    assert 0 < results[f"{tag}/loss_share"] < 1
