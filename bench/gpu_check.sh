#!/usr/bin/env bash
# One prepared check for a GPU host without network, in one call of at most ~8 minutes:
#   bash bench/gpu_check.sh [OUT_DIR]      # or OUT=DIR bash bench/gpu_check.sh
# Results (logs and --json files) go to OUT_DIR, else $OUT, else bench/gpu_out.
# Steps, each under its own `timeout` so one slow or broken step cannot sink the others:
#   install   offline: editable install through PEP 660 (pyproject.toml), else the checkout is
#             put on PYTHONPATH through a folder of links (unpg, unpg/loaders, unpg/kernels)
#   tests     every test marked `gpu` (Triton vs float64 truth in every precision, no host
#             syncs, loaders with cv2/nvJPEG vs CPU, CUDA detector/features vs CPU)
#   loss      bench/loss.py at C = 85,742 and 2,059,906, initial and trained-like states
#   train     bench/train_step.py iresnet100 b512 bf16 channels_last (+ backbone alone);
#             then with --compile if enough of the budget is left
#   loaders   bench/throughput.py on CUDA
# Nothing is fetched from the network. pytest may be missing on a GPU host: carry the wheels made
# by `make gpu-wheels` (folder .gpu_wheels) and they are installed from there, offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench/gpu_out}}"
mkdir -p "$OUT"
BUDGET=470   # seconds for the whole script; the optional compile step uses what is left
status=0
step() { echo; echo "=== [$SECONDS s] $*"; }
left() { echo $((BUDGET - SECONDS)); }
# cap SECONDS: a step's own limit, never past the budget (at least 5 s so it can report)
cap() { local r=$((BUDGET - SECONDS)); [ "$r" -lt 5 ] && r=5; [ "$1" -lt "$r" ] && echo "$1" || echo "$r"; }

step "install (offline)"
if ! timeout "$(cap 60)" python -m pip install -q --no-deps --no-build-isolation --no-index -e . \
        >"$OUT/install.txt" 2>&1; then
    # Old setuptools without PEP 660 / bdist_wheel: run from the checkout instead. The links
    # reproduce setup.py's package_dir mapping (loaders/ -> unpg.loaders, kernels/ -> unpg.kernels).
    echo "editable install failed (see $OUT/install.txt); using the checkout through links"
    site="$(mktemp -d)/site"
    mkdir -p "$site/unpg"
    for entry in "$PWD"/unpg/*; do ln -s "$entry" "$site/unpg/"; done
    ln -s "$PWD/loaders" "$site/unpg/loaders"
    ln -s "$PWD/kernels" "$site/unpg/kernels"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python -c "import pytest" 2>/dev/null && [ -d .gpu_wheels ]; then
    timeout "$(cap 30)" python -m pip install -q --no-index --find-links .gpu_wheels pytest || status=1
fi
# simplejpeg (the default decoder): from the wheels when carried; without it the loader tests
# and benches use cv2, which they name.
if ! python -c "import simplejpeg" 2>/dev/null && [ -d .gpu_wheels ]; then
    timeout "$(cap 20)" python -m pip install -q --no-index --find-links .gpu_wheels simplejpeg \
        || echo "simplejpeg wheel does not fit this Python: loaders fall back to cv2"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python -c "import unpg.kernels, unpg.loaders; print('unpg imports from', unpg.kernels.__file__)"
} 2>&1 | tee "$OUT/machine.txt"

step "GPU correctness tests (pytest -m gpu)"
if python -c "import pytest" 2>/dev/null; then
    # Tests check results, not speed: the first tile plan that compiles, no timing sweep.
    UNPG_TRITON_AUTOTUNE=0 timeout "$(cap 140)" python -m pytest -q -m gpu -p no:cacheprovider tests \
        2>&1 | tee "$OUT/gpu_tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "pytest is not installed and .gpu_wheels is missing: run 'make gpu-wheels' and carry .gpu_wheels" \
        | tee "$OUT/gpu_tests.txt"
    status=1
fi

step "loss: B=512 D=512, C=85742 and 2059906, init and trained, bf16 embeddings, fp32 weight"
timeout "$(cap 160)" python bench/loss.py --device cuda --json "$OUT/loss.json" 2>&1 | tee "$OUT/loss.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "training step: iresnet100 + ArcFace/UNPG, batch 512, bf16, channels_last (eager)"
timeout "$(cap 90)" python bench/train_step.py --device cuda --model iresnet100 --batch 512 --amp bf16 \
    --channels-last --steps 5 --passes 3 --warmup 2 --json "$OUT/train_step.json" 2>&1 \
    | tee "$OUT/train_step.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "loaders on CUDA: scaling 1/4/16 workers, gil_load, fed training (no DALI on these hosts)"
timeout "$(cap 120)" python bench/throughput.py --device cuda --workers 16 --scaling 1,4,16 \
    --identities 500 --skip dali ffcv_threads --json "$OUT/throughput.json" 2>&1 \
    | tee "$OUT/throughput.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

remaining=$(left)
if [ "$remaining" -ge 150 ]; then
    step "training step with --compile (train.compile), ${remaining}s left"
    timeout $((remaining - 10)) python bench/train_step.py --device cuda --model iresnet100 \
        --batch 512 --amp bf16 --channels-last --compile --steps 5 --passes 3 --warmup 2 \
        --json "$OUT/train_step_compile.json" 2>&1 | tee "$OUT/train_step_compile.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "skipped --compile step: only ${remaining}s of the budget left" | tee "$OUT/train_step_compile.txt"
fi

echo; echo "gpu_check: exit status $status after ${SECONDS}s (results in $OUT)"
exit $status
