#!/usr/bin/env bash
# Pipelined decoding A/B on one GPU (run on the lent nvidia-h100-x1 from the repo root, one device call):
#   bash tools/bench_ahead.sh [MODEL ...]    MODEL: bundled example names (default: all four)
# Each model twice in the same call: generate running decode steps ahead (the default; beside the
# gpt-fast-style peer), then step by step (LLAMAGRAPH_AHEAD=0: the host reads each token before it
# queues the next step). Batch 1, prompt 128, 128 new tokens, fp16. Tables to $OUT/bench_ahead.txt.
set -uo pipefail
models=${*:-tinyllama-1.1b llama-3.2-1b llama-2-7b llama-3-8b}
source "$(dirname "$0")/bench_run.sh"  # bench_setup, run NAME BENCH-ARGS...
bench_setup bench_ahead.txt "llamagraph bench, pipelined vs step-by-step decode" "$models"
for n in $models; do
  run "$n" "examples/$n.json" --random-weights --peers gptfast
  echo "# LLAMAGRAPH_AHEAD=0: step by step" >> "$txt"
  LLAMAGRAPH_AHEAD=0 run "$n-step" "examples/$n.json" --random-weights --peers none
done
