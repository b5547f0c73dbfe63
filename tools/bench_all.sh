#!/usr/bin/env bash
# The H100 benchmark of issue #7 (docs/bench_h100.txt), run on the lent GPU machine from the repo root:
#   bash tools/bench_all.sh [PART ...]        PART: examples batch prefill bf16 (default: all four, in that order)
#   examples  every bundled example, batch 1, prompt 128, 128 new tokens, fp16, all three peers
#   batch     TinyLlama-1.1B and Llama-3-8B at batch 8 and 16         (peers: $BATCH_PEERS, default gptfast,hf)
#   prefill   Llama-3-8B, 2048-token prompt, 8 new tokens             (peers: $PREFILL_PEERS, default hf,gptfast)
#   bf16      Llama-3.2-1B in bf16, batch 1                           (peers: $BF16_PEERS, default none)
# Every table goes to $OUT/bench_h100.txt under the command that printed it, every run's figures to
# $OUT/bench_<run>.json, its log to $OUT/bench_<run>.log and its wall time to $OUT/timings.txt.
# HF's static-cache compile row runs with the batch-1 examples only: each torch.compile of a decode step
# (one per model, batch size and cache length) costs tens of seconds, and that row is the slower
# torch.compile peer; add it elsewhere with e.g. BATCH_PEERS=gptfast,hf,compile. If the whole run would
# pass the 10-minute limit of one device call, run the parts in two calls (`examples`, then `batch prefill bf16`).
set -uo pipefail
parts=${*:-examples batch prefill bf16}
source "$(dirname "$0")/bench_run.sh"  # bench_setup, run NAME BENCH-ARGS...
bench_setup bench_h100.txt "llamagraph bench" "$parts"

for part in $parts; do
  case $part in
    examples)
      for n in tinyllama-1.1b llama-3.2-1b llama-2-7b llama-3-8b; do
        run "$n" "examples/$n.json" --random-weights --batch 1 --prompt-len 128 --gen-len 128 --dtype float16 \
          --peers gptfast,hf,compile
      done ;;
    batch)
      for n in tinyllama-1.1b llama-3-8b; do
        run "$n-batch" "examples/$n.json" --random-weights --batch 8,16 --peers "${BATCH_PEERS:-gptfast,hf}"
      done ;;
    prefill)
      run llama-3-8b-prefill examples/llama-3-8b.json --random-weights --prompt-len 2048 --gen-len 8 \
        --peers "${PREFILL_PEERS:-hf,gptfast}" ;;
    bf16)
      run llama-3.2-1b-bf16 examples/llama-3.2-1b.json --random-weights --dtype bfloat16 --peers "${BF16_PEERS:-none}" ;;
    *) echo "unknown part $part (examples, batch, prefill, bf16)" >&2; exit 2 ;;
  esac
done
echo "total: $SECONDS s" | tee -a "$OUT/timings.txt"
