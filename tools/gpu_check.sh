#!/usr/bin/env bash
# Run on the lent GPU machine (device tool), from the repo root:
#   bash tools/gpu_check.sh [pytest args...]      -> GPU tests, logs under $OUT (or ./out)
set -uo pipefail
OUT=${OUT:-./out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LLAMAGRAPH_CACHE=${LLAMAGRAPH_CACHE:-/tmp/llamagraph-cache}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # the tensor-parallel tests on a 2-GPU machine: NVLink multicast off
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import cupy, torch, transformers; print('cupy', cupy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest tests/gpu tests/test_chat.py -m gpu -q -rfE --tb=short -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 60
