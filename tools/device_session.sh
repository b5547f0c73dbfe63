#!/usr/bin/env bash
# One device call that does as much as its limit allows, for sessions whose machine starts are scarce
# (a start can cost more device time than the work): the tuning A/B queue first (tools/tuning_ab.py,
# ~5 s a variant once the plan's kernels are compiled), then each GEMV of one layer alone per variant
# (tools/bench_qgemv.py), then block timelines (tools/block_timeline.py), then Nsight Compute on one decoder
# layer (tools/ncu_layer.py), then the GPU test files in order, each cut to what is left of DEADLINE seconds. Logs land under $OUT as they are written, so a call cut by its
# limit still brings back what ran.
#   DEADLINE=540 bash tools/device_session.sh    -> $OUT/ab.txt, [qgemv.txt], [timeline*], [ncu*], $OUT/tests.txt
#   AB="examples/llama-3-8b.json int4 base,gu5,base" NCU="" TESTS="test_quant_e2e.py:120" bash tools/device_session.sh
# AB: ';'-separated "CONFIG QUANT VARIANTS" runs; QGEMV: ';'-separated "CONFIG QUANTS VARIANTS" runs; TIMELINE: ';'-separated "CONFIG QUANT [VARIANT]" block timelines
# (tools/block_timeline.py, npz under $OUT); NCU: ';'-separated "CONFIG QUANT LAYER" runs; TESTS:
# space-separated FILE[:EXPR]:SECONDS, EXPR a pytest -k expression with '~' for its spaces (ahead~and~float16).
# A run named "none" in AB is the 16-bit plan, the denominator of the quantized ratios.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LLAMAGRAPH_CACHE=${LLAMAGRAPH_CACHE:-/tmp/llamagraph-cache}
DEADLINE=${DEADLINE:-540}
# a bare machine: PYTHONPATH alone lacks the package data llamagraph.templates (templates/ at the root)
python3 -c "import llamagraph.templates" 2>/dev/null || ln -sfn ../templates llamagraph/templates
python3 -c "import llamagraph.templates" || { echo "llamagraph.templates does not import" | tee "$OUT/ab.txt"; exit 1; }
# (default: session 19's first call, with session 20's int8 ct16; its second: AB="examples/llama-2-7b.json int4 base,noalu,tpf0,tpf2,qpf0qkv,nosz,ahead2gu,ahead2qkv,zsumgu,lcngu,base"
#  NCU="examples/llama-2-7b.json int4 10;examples/llama-2-7b.json none 10" TESTS="", docs/ab_h100.txt)
AB=${AB-"examples/llama-2-7b.json int4 base,ahead2,ct16,zsum,nwpf,lcn,wef,ct16+ahead2,tpf0,tpfh,nopers,noalu,base;\
examples/llama-2-7b.json int8 base,ct16,base;examples/llama-2-7b.json none base"}
QGEMV=${QGEMV-"examples/llama-2-7b.json int4,none base,ct16,noalu,tpf0,tpfh,nopers,ahead2,zsum,nosz,ct16+ahead2,ct16+tpf0,tpf0+ahead2;\
examples/llama-2-7b.json int8 base,ct16;examples/llama-3-8b.json int4 base,ct16"}
NCU=${NCU-""}
TESTS=${TESTS-"test_kernels_quant_gemv.py:ahead2~or~c16~or~zsum:150 test_quant_e2e.py:tile16:90 \
test_kernels_quant_gemv.py:150 test_quant_e2e.py:120 \
test_cuda_e2e.py:150 test_profile_cuda.py:90 test_kernels_fused_gemv.py:90"}

left() { local t=$((DEADLINE - SECONDS)); echo $(( $1 < t ? $1 : t )); }

nvidia-smi --query-gpu=name,clocks.max.mem --format=csv,noheader | tee "$OUT/ab.txt"
# runs RUNS CAP LOG CMD...: each ';'-separated run of RUNS as `CMD... RUN` (its words), cut to the time
# left up to CAP seconds (skipped under 30), its output appended to $OUT/LOG
runs() {
  local list=$1 cap=$2 log=$3 r t; shift 3
  local -a each
  IFS=';' read -ra each <<< "$list"
  for r in "${each[@]}"; do
    [ -z "${r// }" ] && continue
    t=$(left "$cap"); [ "$t" -lt 30 ] && { echo "no time for: $r" | tee -a "$OUT/$log"; continue; }
    # shellcheck disable=SC2086
    timeout "$t" "$@" $r 2>&1 | tee -a "$OUT/$log"
  done
}
runs "$AB" 240 ab.txt python3 tools/tuning_ab.py
echo "A/B done at ${SECONDS}s" | tee -a "$OUT/ab.txt"
runs "$QGEMV" 200 qgemv.txt python3 tools/bench_qgemv.py

IFS=';' read -ra runs <<< "${TIMELINE:-}"
for r in "${runs[@]}"; do
  [ -z "${r// }" ] && continue
  t=$(left 120); [ "$t" -lt 45 ] && { echo "no time for timeline: $r" | tee -a "$OUT/timeline.txt"; continue; }
  set -- $r  # CONFIG QUANT [VARIANT]
  # shellcheck disable=SC2086
  timeout "$t" python3 tools/block_timeline.py "$1" "$2" "$OUT" ${3:+--variant "$3"} 2>&1 | tee -a "$OUT/timeline.txt"
done

IFS=';' read -ra runs <<< "$NCU"
for r in "${runs[@]}"; do
  [ -z "${r// }" ] && continue
  t=$(left 150); [ "$t" -lt 60 ] && { echo "no time for ncu: $r" | tee -a "$OUT/ncu.txt"; continue; }
  # shellcheck disable=SC2086
  timeout "$t" python3 tools/ncu_layer.py $r "$OUT" 2>&1 | tail -n 80 | tee -a "$OUT/ncu.txt"
done

: > "$OUT/tests.txt"
for spec in $TESTS; do
  f=${spec%%:*}; rest=${spec#*:}; secs=${rest##*:}; k=""
  [ "$rest" != "$secs" ] && k=${rest%:*} && k=${k//\~/ }
  t=$(left "$secs"); [ "$t" -lt 20 ] && { echo "no time for $f" | tee -a "$OUT/tests.txt"; continue; }
  echo "== $f${k:+ -k '$k'} (limit ${t}s)" | tee -a "$OUT/tests.txt"
  timeout "$t" python3 -m pytest "tests/gpu/$f" -m gpu -q -rfE --tb=short -p no:cacheprovider ${k:+-k "$k"} 2>&1 \
    | tail -n 8 | tee -a "$OUT/tests.txt"
done
