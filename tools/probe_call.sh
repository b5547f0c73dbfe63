#!/usr/bin/env bash
cd "$(dirname "$0")/.."
python3 -c "import llamagraph.templates" 2>/dev/null || ln -sfn ../templates llamagraph/templates
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LLAMAGRAPH_CACHE=/tmp/lgc
OUT=${OUT:-./out}; mkdir -p "$OUT"
timeout 170 python3 tools/tuning_ab.py examples/llama-2-7b.json int4 base,w16gu,w16down,w16,base > "$OUT/ab.txt" 2>&1
timeout 70 python3 tools/tuning_ab.py examples/llama-3-8b.json int4 base,w16gu >> "$OUT/ab.txt" 2>&1
cat "$OUT/ab.txt"
for cfg in llama-2-7b llama-3-8b; do
  timeout 75 python3 tools/block_timeline.py examples/$cfg.json int4 "$OUT" > "$OUT/timeline_$cfg.txt" 2>&1
  python3 tools/timeline_detail.py "$OUT/timeline_$cfg-int4.npz" > "$OUT/detail_$cfg.txt" 2>&1
  cat "$OUT/timeline_$cfg.txt" "$OUT/detail_$cfg.txt"
done
