#!/usr/bin/env bash
# Wall time of `llamagraph compile` per bundled example (the README's "Compile time" figures):
#   cold  an empty kernel cache: every NVRTC program compiled
#   warm  the same command again: NVRTC's output read from the cache
#   load  a fresh process reading the compiled plan directory (what `llamagraph run PLAN_DIR`
#         and llamagraph.load do before binding weights): import + CompiledPlan.load
# Each figure is the best of REPS runs (default 3), with the worst beside it: other work on the
# machine only ever adds time. Every run is a new process, as a user's would be.
#
#   tools/compile_time.sh [EXAMPLE.json ...]        (default: examples/*.json)
#   REPS=5 ARCH=sm_90 tools/compile_time.sh
#
# Python writes its bytecode caches (__pycache__) as it does by default: a first import compiles
# llamagraph's sources once, as after any install, before anything is timed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
ARCH=${ARCH:-sm_90}
PY=${PYTHON:-python}
unset PYTHONDONTWRITEBYTECODE
examples=("$@")
[ ${#examples[@]} -gt 0 ] || examples=(examples/*.json)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -c "import llamagraph.cli, llamagraph.report" # bytecode, once
nvrtc=$("$PY" -c "from llamagraph.codegen import nvrtc; print(nvrtc.available() or 'none', nvrtc.default_jobs())")
echo "# llamagraph compile wall seconds, best (worst) of $REPS; $(nproc) CPUs, NVRTC ${nvrtc% *}" \
     "in ${nvrtc##* } programs at once; load average $(cut -d' ' -f1-3 /proc/loadavg)"

seconds() {  # seconds a command takes, output discarded
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}

summary() {  # best (worst) of the numbers on stdin
    sort -g | awk '{v[NR] = $1} END {printf "%.2f (%.2f)", v[1], v[NR]}'
}

printf "%-22s %14s %14s %14s\n" example cold warm load
for ex in "${examples[@]}"; do
    name=$(basename "$ex" .json)
    out="$work/$name.llamagraph"
    cold=() warm=() load=()
    for _ in $(seq "$REPS"); do
        cache="$work/cache.$RANDOM$RANDOM"
        cold+=("$(LLAMAGRAPH_CACHE=$cache seconds "$PY" -m llamagraph compile "$ex" --arch "$ARCH" -o "$out")")
        warm+=("$(LLAMAGRAPH_CACHE=$cache seconds "$PY" -m llamagraph compile "$ex" --arch "$ARCH" -o "$out")")
        load+=("$(seconds "$PY" -c "import sys, llamagraph; llamagraph.CompiledPlan.load(sys.argv[1])" "$out")")
        rm -rf "$cache"
    done
    printf "%-22s %14s %14s %14s\n" "$name" "$(printf '%s\n' "${cold[@]}" | summary)" \
        "$(printf '%s\n' "${warm[@]}" | summary)" "$(printf '%s\n' "${load[@]}" | summary)"
done
