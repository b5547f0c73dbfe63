#!/usr/bin/env bash
# The 2-GPU benchmark of issue #9 (tensor parallelism; docs/tp_h200x2.txt), run on the lent
# nvidia-h200-x2 machine from the repo root, in one device call:
#   bash tools/bench_tp.sh [PART ...]     PART: 8b 8b-step 8b-nccl 8b-int4 70b profile (default: all, in that order)
#   8b        Llama-3-8B at tp 2 beside the same plan at tp 1, twice (compare within a run; report both)
#   8b-step   the same with generate waiting for every decode step (LLAMAGRAPH_AHEAD=0: no pipelining)
#   8b-nccl   the same with every all-reduce through NCCL (LLAMAGRAPH_P2P=0), tp 2 only
#   8b-int4   int4 (G 128) at tp 2 beside the int4 plan at tp 1
#   70b       Llama-3-70B in fp16 at tp 2 (its tp 1 plan does not fit one GPU)
#   profile   one 8B tp 2 decode step, launch by launch, with the all-reduce time per step
# Every table goes to $OUT/bench_tp.txt under the command that printed it, every bench's figures to
# $OUT/bench_<run>.json, its log to $OUT/bench_<run>.log. Batch 1, prompt 128, 128 new tokens, fp16.
set -uo pipefail
parts=${*:-8b 8b-step 8b-nccl 8b-int4 70b profile}
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on the lent machines (device notes)
source "$(dirname "$0")/bench_run.sh"  # bench_setup, run NAME BENCH-ARGS...
bench_setup bench_tp.txt "llamagraph bench --tp 2" "$parts"

for part in $parts; do
  case $part in
    8b)
      run llama-3-8b-tp2-a examples/llama-3-8b.json --random-weights --tp 2
      run llama-3-8b-tp2-b examples/llama-3-8b.json --random-weights --tp 2 ;;
    8b-step)
      echo "# LLAMAGRAPH_AHEAD=0: the host waits for each decode step's token before it queues the next" >> "$txt"
      LLAMAGRAPH_AHEAD=0 run llama-3-8b-tp2-step examples/llama-3-8b.json --random-weights --tp 2 ;;
    8b-nccl)
      echo "# LLAMAGRAPH_P2P=0: every all-reduce through NCCL, then the residual kernel in its local form" >> "$txt"
      LLAMAGRAPH_P2P=0 run llama-3-8b-tp2-nccl examples/llama-3-8b.json --random-weights --tp 2 --no-tp1 ;;
    8b-int4)
      run llama-3-8b-tp2-int4 examples/llama-3-8b.json --random-weights --tp 2 --quantize int4 --group-size 128 ;;
    70b)
      run llama-3-70b-tp2 examples/llama-3-70b.json --random-weights --tp 2 --no-tp1 ;;
    profile)
      echo "\$ llamagraph profile examples/llama-3-8b.json --random-weights --tp 2" >> "$txt"
      python3 -m llamagraph profile examples/llama-3-8b.json --random-weights --tp 2 \
        -o "$OUT/profile_8b_tp2.html" --json "$OUT/profile_8b_tp2.json" 2> "$OUT/profile_8b_tp2.log" \
        | grep -E "^(total|all-reduce)" >> "$txt" ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done
