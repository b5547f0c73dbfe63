# Sourced by tools/bench_all.sh and tools/bench_quant.sh: `run NAME BENCH-ARGS...` runs one
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
