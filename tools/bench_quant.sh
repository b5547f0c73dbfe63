#!/usr/bin/env bash
# The H100 benchmark of issue #8 (weight-only int8 / int4; docs/bench_quant_h100.txt), run on the lent GPU
# machine from the repo root:
#   bash tools/bench_quant.sh [PART ...]     PART: llama2 llama3 70b (default: all three, in that order)
#   llama2   Llama-2-7B, batch 1, int8 and int4 (G 128), each beside the fp16 plan and the quantized gpt-fast peer
#   llama3   Llama-3-8B, batch 1, int4 (G 128), the same
#   70b      Llama-3-70B shape in int4 on one GPU (no peers: its fp16 plan does not fit)
# Every table goes to $OUT/bench_quant_h100.txt under the command that printed it, every run's figures to
# $OUT/bench_<run>.json, its log to $OUT/bench_<run>.log. Prompt 128, 128 new tokens, fp16 activations.
set -uo pipefail
parts=${*:-llama2 llama3 70b}
source "$(dirname "$0")/bench_run.sh"  # bench_setup, run NAME BENCH-ARGS...
bench_setup bench_quant_h100.txt "llamagraph bench --quantize" "$parts"

for part in $parts; do
  case $part in
    llama2)
      run llama-2-7b-int8 examples/llama-2-7b.json --random-weights --quantize int8 --peers "${PEERS:-gptfast}"
      run llama-2-7b-int4 examples/llama-2-7b.json --random-weights --quantize int4 --group-size 128 --peers "${PEERS:-gptfast}" ;;
    llama3)
      run llama-3-8b-int4 examples/llama-3-8b.json --random-weights --quantize int4 --group-size 128 --peers "${PEERS:-gptfast}" ;;
    70b)
      run llama-3-70b-int4 examples/llama-3-70b.json --random-weights --quantize int4 --group-size 128 --peers none \
        --gen-len 64 ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done
