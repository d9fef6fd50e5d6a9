#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no network there). Run from the repo root:
#   bash bench/gpu_check.sh            # results under $OUT (the device tool's output folder)
# It installs this package offline, runs every test marked `gpu` (Triton kernels vs the float64
# truth, fused loss vs the torch reference, no host syncs, FFCV-style loader with cv2 and nvJPEG
# vs the CPU path, CUDA detector/features vs CPU), then times the loss kernels, the loaders and
# the iresnet100 training step. pytest is not installed on the lent machines: carry wheels
# made by `make gpu-wheels` (folder .gpu_wheels) and they are installed from there, offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $*"; }

step "install (offline, editable: loaders/ and kernels/ map into unpg.*)"
python -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
if ! python -c "import pytest" 2>/dev/null && [ -d .gpu_wheels ]; then
    python -m pip install -q --no-index --find-links .gpu_wheels pytest || status=1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"

step "GPU correctness tests (pytest -m gpu)"
if python -c "import pytest" 2>/dev/null; then
    timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "pytest is not installed and .gpu_wheels is missing: run 'make gpu-wheels' and carry .gpu_wheels" \
        | tee "$OUT/gpu_tests.txt"
    status=1
fi

step "loss kernels: B=512 D=512 C=85742, ArcFace + UNPG (bf16 inputs, then fp32)"
timeout 150 python bench/loss.py --device cuda --dtype bfloat16 --impls seed,torch,chunked,triton \
    --json "$OUT/loss_bf16.json" 2>&1 | tee "$OUT/loss_bf16.txt" || status=1
timeout 90 python bench/loss.py --device cuda --dtype float32 --impls torch,triton \
    --json "$OUT/loss_fp32.json" 2>&1 | tee "$OUT/loss_fp32.txt" || status=1

step "training step: iresnet100 + ArcFace/UNPG, batch 512, bf16, channels_last"
timeout 150 python bench/train_step.py --device cuda --model iresnet100 --batch 512 --amp bf16 \
    --channels-last --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.txt" || status=1

step "loaders on CUDA (FFCV-style with cv2 and nvJPEG; no DALI on these machines)"
timeout 150 python bench/throughput.py --device cuda --identities 1000 --images-per-identity 20 \
    --workers 8 --skip dali seed --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt" || status=1

echo; echo "gpu_check: exit status $status (results in $OUT)"
exit $status
