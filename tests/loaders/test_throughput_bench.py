"""bench/throughput.py runs end to end on the CPU on a tiny dataset and writes the documented
``--json`` names (its numbers are not checked here: benchmarks judge speed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_throughput_bench_names(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "throughput.py"), "--device", "cpu",
         "--identities", "8", "--images-per-identity", "16", "--batch", "16", "--workers", "2",
         "--passes", "1", "--decode-images", "64", "--train-batch", "4", "--skip", "dali",
         "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = {r["name"]: r["value"] for r in json.loads(out.read_text())["results"]}
    want = [f"decode/{d}/{m}/images_per_s" for d in ("simplejpeg", "pil")
            for m in ("threads", "processes")]
    want += [f"decode/simplejpeg/{m}/gil_load/images_per_s" for m in ("threads", "processes")]
    want += [f"loader/{n}/{w}/images_per_s" for n in ("seed", "torch", "ffcv", "ffcv_threads")
             for w in (1, 2)]
    want += [f"loader/{n}/gil_load/images_per_s" for n in ("seed", "torch", "ffcv", "ffcv_threads")]
    want += ["train/step/images_per_s"]
    want += [f"train/fed_by_{n}/images_per_s" for n in ("seed", "torch", "ffcv", "ffcv_threads")]
    assert sorted(got) == sorted(want)
    assert all(v > 0 for v in got.values())
    assert "ffcv / seed" in proc.stdout and "gil_load costs ffcv" in proc.stdout
