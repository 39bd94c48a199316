#!/usr/bin/env bash
# The whole GPU check in one run of at most 8 minutes, in the GPU machine's own Python (no
# downloads there). From the repository root:
#
#     bash bench/gpu_check.sh [SHARED]
#
# SHARED is a copy of ../shared (reference/ and data/cifar10-mini/), default .gpu_shared: make it
# here with `cp -r ../shared .gpu_shared` (git ignores it) and carry it.
# Steps: (1) the test suite with CUDA visible (the tests that matter on a GPU run on cpu and
# cuda); (2) bench/step_time.py on CUDA; (3) whole epochs of the default protocol on 50,000 and
# 10,000 images tiled from cifar10-mini, a timing input only, never an accuracy; (4) one JSON
# line: card, torch, fp step ms, QuPeD iteration ms (n = 2, 4), epoch seconds, projected
# 250-epoch minutes. Logs go to $OUT (or /tmp/gpu_check).
#
# GPU_CHECK_DRY_RUN=1 does all of it on the CPU, small, so that the script cannot rot where no
# GPU is lent (tests/test_bench.py): no CUDA asserted, the suite only collected (running it would
# run this test again), one timed step each, two epochs of 256 and 128 images.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=$(realpath "${1:-.gpu_shared}")
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 QUPED_SHARED_DIR="$SHARED"
export QUPED_GOLDEN_DIR="$SHARED/reference/golden" QUPED_GOLDEN_KD_DIR="$SHARED/reference/golden-kd"
PYTHON=${PYTHON:-python3}
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu SUITE=(--collect-only) STEP=(--reps=1 --warmup=0)
    EPOCH=(--epochs=2 --train-images=256 --test-images=128)
    "$PYTHON" -c "import torch; print(torch.__version__, 'cpu (dry run)')" | tee "$LOGS/device.txt"
else
    DEVICE=cuda SUITE=() STEP=(--reps=50 --warmup=10) EPOCH=(--epochs=3)
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; \
print(torch.__version__, torch.cuda.get_device_name())" | tee "$LOGS/device.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$LOGS/device.txt" || true
fi

echo "== 1. test suite, CUDA visible"
tests=0
timeout 300 "$PYTHON" -m pytest tests -q -rs -p no:cacheprovider "${SUITE[@]}" > "$LOGS/tests.txt" 2>&1 || tests=$?
tail -25 "$LOGS/tests.txt"

echo "== 2. bench/step_time.py on $DEVICE"
timeout 90 "$PYTHON" bench/step_time.py --device=$DEVICE "${STEP[@]}" | tee "$LOGS/step.txt"

echo "== 3. whole epochs of the default protocol, cifar10-mini tiled to 50,000 / 10,000 images"
timeout 120 "$PYTHON" bench/epoch_time.py --device=$DEVICE --tile "${EPOCH[@]}" \
    --data="$SHARED/data/cifar10-mini" \
    --pretrained="$SHARED/reference/pretrained/resnet20_fp_fpinit.pt" | tee "$LOGS/epoch.txt"

echo "== 4. summary"
"$PYTHON" - "$LOGS" <<'PY'
import json, sys
step = json.loads(open(f'{sys.argv[1]}/step.txt').read().strip().splitlines()[-1])
epoch = json.loads(open(f'{sys.argv[1]}/epoch.txt').read().strip().splitlines()[-1])
print(json.dumps({'device': step['device'], 'torch': step['torch'], 'fp_step_ms': step['fp_ms'],
                  'quped_ms_n2': step['quped_ms_n2'], 'quped_ms_n4': step['quped_ms_n4'],
                  'ratio_n2': step['ratio_n2'], 'ratio_n4': step['ratio_n4'],
                  'client_ratio': step['ratio_client'], 'epoch_s': epoch['epoch_s'],
                  'projected_250_epochs_min': epoch['projected_250_epochs_min'],
                  'epoch_input': epoch['input']}))
PY
[ "$tests" = 0 ] || { echo "the test suite failed on this machine (exit status $tests)"; exit 1; }
