#!/usr/bin/env bash
# A/B decode speed in one device call: `llamagraph bench` of another source tree (OLD, e.g. an
# exported earlier commit: `git archive C | tar -x -C .ab && cp -r .ab/templates .ab/llamagraph/`)
# against this checkout, alternating old/new per example and repetition, peers off.
#   OLD=.ab REPS=2 bash tools/ab_bench.sh [example names...]   -> $OUT/ab.log, summary on stdout
set -uo pipefail
OUT=${OUT:-./out}; mkdir -p "$OUT"
OLD=${OLD:-.ab}
export PYTHONUNBUFFERED=1 LLAMAGRAPH_CACHE=${LLAMAGRAPH_CACHE:-/tmp/llamagraph-cache}
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
names=${*:-tinyllama-1.1b llama-3.2-1b llama-2-7b llama-3-8b}
log="$OUT/ab.log"; : > "$log"
for n in $names; do
  for k in $(seq "${REPS:-2}"); do
    for side in old new; do
      echo "=== $n $side $k" >> "$log"
      if [ "$side" = old ]; then
        PYTHONPATH="$OLD" python3 -m llamagraph bench "examples/$n.json" --random-weights --peers none >> "$log" 2>&1
      else
        python3 -m llamagraph bench "examples/$n.json" --random-weights --peers none >> "$log" 2>&1
      fi
    done
  done
done
python3 - "$log" <<'PY'
import re, statistics, sys
runs, cur = {}, None
for line in open(sys.argv[1]):
    if line.startswith("=== "):
        cur = line.split()[1:3]
    elif line.startswith("llamagraph (CUDA graphs)") and cur:
        tok_s, pct = float(line.split()[4]), float(line.split()[6].rstrip("%"))
        runs.setdefault(tuple(cur), []).append((tok_s, pct))
print(f"{'example':<16} {'old tok/s':>10} {'old %floor':>10} {'new tok/s':>10} {'new %floor':>10} {'new/old':>8}")
for name in dict.fromkeys(k[0] for k in runs):
    o, n = runs.get((name, "old"), []), runs.get((name, "new"), [])
    if not o or not n:
        print(f"{name:<16} missing runs: old {len(o)}, new {len(n)}"); continue
    mo, mn = statistics.median(x[0] for x in o), statistics.median(x[0] for x in n)
    po, pn = statistics.median(x[1] for x in o), statistics.median(x[1] for x in n)
    print(f"{name:<16} {mo:>10.1f} {po:>9.1f}% {mn:>10.1f} {pn:>9.1f}% {mn / mo:>7.3f}x"
          f"   (old runs {[x[0] for x in o]}, new runs {[x[0] for x in n]})")
PY
