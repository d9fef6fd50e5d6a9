"""The strict JPEG check, what build_loader checks per backend, and worker processes under signals:
a SIGTERM to the whole process group leaves the workers running (the trainer saves first), and
workers go away when the training process dies or exits. Real subprocesses and signals."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from unpg.loaders import build_loader
from unpg.loaders.decode import DecodeError, verify_jpeg

pytestmark = pytest.mark.slow  # worker processes, signals: `make test-fast` leaves them out

REPO = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


def _jpeg(seed=0, size=112):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (7, 7), 2)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _flip_mid_scan(data, count=8, every=3):
    b = bytearray(data)
    mid = (data.find(b"\xff\xda") + len(data)) // 2
    for k in range(count):
        b[mid + k * every] ^= 0xFF
    return bytes(b)


def test_verify_jpeg_catches_what_cv2_decodes_silently():
    good = _jpeg()
    verify_jpeg(good)
    verify_jpeg(np.frombuffer(good, np.uint8), expect_hw=(112, 112))
    bad = _flip_mid_scan(good)
    # OpenCV returns an image for it (libjpeg only warned) ...
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)
    # ... the strict check does not accept it
    with pytest.raises(DecodeError, match="damaged JPEG data"):
        verify_jpeg(bad)
    with pytest.raises(DecodeError, match="truncated"):
        verify_jpeg(good[: len(good) // 2])
    with pytest.raises(DecodeError, match="not a JPEG"):
        verify_jpeg(b"GIF89a" + bytes(100))
    with pytest.raises(DecodeError, match="expected 64x64"):
        verify_jpeg(good, expect_hw=(64, 64))


def test_only_the_chosen_backends_key_is_needed(prepared, cfg_factory, tmp_path):
    # loader.name=ffcv data.ffcv_file=X data.rec= is complete
    loader = build_loader(cfg_factory("ffcv", rec="", ffcv=prepared["ffcv"]), 0, 1, "cpu")
    assert len(loader) == 96 // 16
    with pytest.raises(ValueError, match="loader.name=torch reads data.rec, which is empty"):
        build_loader(cfg_factory("torch", ffcv=prepared["ffcv"]), 0, 1, "cpu")
    with pytest.raises(ValueError, match="data.rec=.*missing train.rec and train.idx"):
        build_loader(cfg_factory("torch", rec=tmp_path), 0, 1, "cpu")
    with pytest.raises(ValueError, match="data.rec=.*no such folder"):
        build_loader(cfg_factory("torch", rec=tmp_path / "nope"), 0, 1, "cpu")
    with pytest.raises(ValueError, match="loader.name=ffcv reads data.ffcv_file, which is empty"):
        build_loader(cfg_factory("ffcv", rec=prepared["rec"]), 0, 1, "cpu")
    with pytest.raises(ValueError, match="data.ffcv_file=.*no such file.*unpg.tools.pack"):
        build_loader(cfg_factory("ffcv", ffcv=tmp_path / "x.unpgpack"), 0, 1, "cpu")
    with pytest.raises(ValueError, match="loader.name=dali reads data.dali_dir, which is empty"):
        build_loader(cfg_factory("dali", ffcv=prepared["ffcv"]), 0, 1, "cpu")


def test_an_empty_rec_says_so(tmp_path, cfg_factory):
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "train.idx").write_text("")
    with pytest.raises(ValueError, match="no images") as err:
        build_loader(cfg_factory("torch", rec=tmp_path), 0, 1, "cpu")
    assert "batch" not in str(err.value)


def _children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _still_alive_after(pids, seconds):
    """The ``pids`` still alive once they are all gone or ``seconds`` have passed."""
    deadline = time.time() + seconds
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


# A "trainer": its own process group (as under torchrun/SLURM), a SIGTERM handler that finishes the
# epoch and exits 0, like the real trainer saving a checkpoint.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import make_cfg
    from unpg.loaders import build_loader
    os.setpgid(0, 0)
    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    cfg = make_cfg({name!r}, rec={rec!r}, ffcv={ffcv!r}, batch=8, workers=2, batches_ahead=1)
    loader = build_loader(cfg, 0, 1, "cpu")
    it = iter(loader)
    next(it)
    print("ready", flush=True)
    sys.stdin.readline()  # the test signals, then lets us go on
    n = 1 + sum(1 for _ in it)
    print("batches", n, "sigterm", len(got), flush=True)
    if {mode!r} == "die":
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _start(name, prepared, mode):
    code = SCRIPT.format(tests=str(REPO / "tests" / "loaders"), name=name,
                         rec=str(prepared["rec"]), ffcv=str(prepared["ffcv"]), mode=mode)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "ready"
    return p


@linux_only
@pytest.mark.parametrize("name", ["torch", "ffcv"])
def test_group_sigterm_reaches_the_trainer_not_the_workers(name, prepared):
    p = _start(name, prepared, "exit")
    try:
        workers = _children(p.pid)
        assert len(workers) >= 2
        os.killpg(p.pid, signal.SIGTERM)  # what torchrun, docker stop and SLURM do
        time.sleep(0.5)
        assert all(_alive(w) for w in workers)
        out, _ = p.communicate("go\n", timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0
    assert out.split() == ["batches", str(96 // 8), "sigterm", "1"]
    assert not _still_alive_after(workers, 10)  # the normal exit took them down


@linux_only
@pytest.mark.parametrize("name", ["torch", "ffcv"])
def test_workers_exit_when_the_training_process_is_killed(name, prepared):
    p = _start(name, prepared, "die")
    try:
        workers = _children(p.pid)
        p.communicate("go\n", timeout=60)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    leftover = _still_alive_after(workers, 15)  # ffcv workers check every second, torch's 5 s
    for w in leftover:
        os.kill(w, signal.SIGKILL)
    assert not leftover


@linux_only
def test_a_killed_worker_is_an_error_not_a_hang(prepared, cfg_factory):
    loader = build_loader(cfg_factory("ffcv", ffcv=prepared["ffcv"], batch=8, workers=2), 0, 1,
                          "cpu")
    it = iter(loader)
    next(it)
    assert len(loader.worker_pids) == 2
    os.kill(loader.worker_pids[1], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="loader worker .* died with exit code -9"):
        for _ in it:
            pass
    assert len(list(loader)) == len(loader)  # the next epoch starts fresh workers
    loader.close()
