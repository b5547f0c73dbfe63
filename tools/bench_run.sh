# Sourced by tools/bench_all.sh and tools/bench_quant.sh.
# `bench_setup FILE TITLE PARTS` installs the tree, points $txt at $OUT/FILE and writes its header
# (TITLE, the GPU, the time, the commit, the parts, the library versions).
bench_setup() {
  OUT=${OUT:-./out}; mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 LLAMAGRAPH_CACHE=${LLAMAGRAPH_CACHE:-/tmp/llamagraph-cache}
  python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
  txt="$OUT/$1"
  {
    echo "# $2 on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1), $(date -u +%Y-%m-%dT%H:%MZ)," \
         "commit $(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown), parts: $3"
    python3 -c "import cupy, torch, transformers; print('# cupy', cupy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    echo
  } >> "$txt"
}

# `run NAME BENCH-ARGS...` runs one
# `llamagraph bench`, appends the command and its table to $txt, its figures to $OUT/bench_NAME.json,
# its log to $OUT/bench_NAME.log and its wall time to $OUT/timings.txt.
run() {
  local name=$1; shift
  local start=$SECONDS
  echo "\$ llamagraph bench $* --json bench_$name.json" >> "$txt"
  python3 -m llamagraph bench "$@" --json "$OUT/bench_$name.json" >> "$txt" 2> "$OUT/bench_$name.log" \
    || { echo "(failed: exit $?; last lines of bench_$name.log below)"; tail -n 5 "$OUT/bench_$name.log"; } >> "$txt"
  echo >> "$txt"
  echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
}
