#!/usr/bin/env bash
# Run on the GPU machine: `llamagraph bench` for the given bundled examples (default: all),
# batch 1, fp16, 128-token prompt, 128 new tokens; tables under $OUT/bench_<name>.txt.
set -uo pipefail
OUT=${OUT:-./out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LLAMAGRAPH_CACHE=${LLAMAGRAPH_CACHE:-/tmp/llamagraph-cache}
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
names=${*:-tinyllama-1.1b llama-3.2-1b llama-2-7b llama-3-8b}
for n in $names; do
  llamagraph bench "examples/$n.json" --random-weights ${BENCH_ARGS:-} 2> "$OUT/bench_$n.log" | tee "$OUT/bench_$n.txt"
done
