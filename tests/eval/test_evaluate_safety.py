"""`python -m unpg.evaluate` as a user runs it (real subprocesses): a training checkpoint needs no
--model/--embedding-size, key=value overrides go anywhere, TAR at unmeasurable FARs gets a caveat,
and a truncated checkpoint or an unwritable output folder is one `error:` line and exit code 2,
found before the evaluation runs."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unpg.config import Config
from unpg.eval.bins import read_bin_pickle
from unpg.models import build_backbone

pytestmark = pytest.mark.slow  # real CLI subprocesses: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[2]
PAIRS = 20  # 10 genuine + 10 impostor pairs: FARs below 1/10 are not measurable


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "unpg.evaluate", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def one_error_line(res, *parts):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr[-2000:]
    for p in parts:
        assert str(p) in lines[0], (p, lines[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fixtures_dir):
    tmp = tmp_path_factory.mktemp("evalsafe")
    blobs, issame = read_bin_pickle(fixtures_dir / "verification" / "synth_pairs.bin")
    (tmp / "tiny.bin").write_bytes(pickle.dumps((blobs[:2 * PAIRS], issame[:PAIRS].tolist()),
                                                protocol=2))
    assert sum(issame[:PAIRS]) == PAIRS // 2
    torch.manual_seed(0)
    net = build_backbone("mobilefacenet_s", embedding_size=24)
    cfg = Config().to_dict()
    cfg["model"].update(name="mobilefacenet_s", embedding_size=24)
    # What the trainer writes: the backbone beside the run's resolved config.
    torch.save({"backbone": net.state_dict(), "config": cfg, "step": 7}, tmp / "ckpt.pt")
    (tmp / "bins.yaml").write_text(
        f"benchmark: bins\nroot: {tmp}\nnames: [missing_set]\nbatch_size: 40\n"
        f"output_dir: {tmp / 'out'}\n")
    return tmp


def test_training_checkpoint_overrides_anywhere_and_far_caveat(setup):
    tmp = setup
    out = tmp / "out_a"
    # An override before the flags and one after them; no --model/--embedding-size.
    res = run(f"output_dir={out}", "--weights", tmp / "ckpt.pt", "--data", tmp / "bins.yaml",
              "names=[tiny]", "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mobilefacenet_s" in res.stdout and "checkpoint" in res.stdout
    (js,) = out.glob("bins_ckpt_*.json")
    r = json.loads(js.read_text())
    assert (r["model"], r["embedding_size"]) == ("mobilefacenet_s", 24)
    tiny = r["sets"]["tiny"]
    assert tiny["num_impostor"] == PAIRS // 2
    assert tiny["far_below_resolution"] == ["1e-06", "1e-05", "0.0001", "0.001", "0.01"]
    caveats = [ln for ln in res.stdout.splitlines() if ln.startswith("caveat:")]
    assert len(caveats) == 1 and "tiny" in caveats[0], res.stdout
    assert "FAR 1e-06, 1e-05, 0.0001, 0.001, 0.01 is below" in caveats[0]


def test_truncated_checkpoint_is_one_error_line(setup, tmp_path):
    tmp = setup
    cut = tmp_path / "cut.pt"
    data = (tmp / "ckpt.pt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    res = run("--weights", cut, "--data", tmp / "bins.yaml", "names=[tiny]", "--device", "cpu",
              f"output_dir={tmp_path / 'o'}")
    one_error_line(res, cut, "truncated")


def test_unwritable_output_dir_fails_before_evaluating(setup, tmp_path):
    tmp = setup
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = run("--weights", tmp / "ckpt.pt", "--data", tmp / "bins.yaml", "names=[tiny]",
              "--device", "cpu", "--no-progress", f"output_dir={blocker / 'results'}")
    one_error_line(res, blocker / "results", "not a writable folder")
    assert "10-fold" not in res.stdout  # nothing was evaluated (and lost)
