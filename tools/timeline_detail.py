"""Per-block detail of tools/block_timeline.py's records: for each launch of the chosen layers,
quantiles (0, 10, 50, 90, 100 %) of its blocks' start, wait and end, in microseconds from the end
of the launch before it, how many started only after that end ("late"), for those the gap since
the last block of the launch before ended on the same SM ("slot gap": how long a freed slot
stayed empty), and how many SMs held 0, 1, 2, ... of its blocks.

    python tools/timeline_detail.py OUT/timeline_llama-2-7b-int4.npz [LAYERS]
    python tools/timeline_detail.py out/timeline_llama-3-8b-int4.npz 10,11

LAYERS (default 10,11) counts decoder layers from 0, as the npz's ``layers`` (each launch's layer)
gives them; records written before it held that field are read as the embedding, then five a layer.
"""

from __future__ import annotations

import sys

import numpy as np

PER_LAYER = 5  # launches a layer in records without ``layers`` (a fused decoder layer)
QUANTILES = [0, 10, 50, 90, 100]


def _row(label: str, values) -> str:
    return f"      {label:<10} " + " ".join(f"{x:7.2f}" for x in np.percentile(values, QUANTILES))


def detail(npz: str, layers: list[int]) -> list[str]:
    d = np.load(npz)
    launch, start, waited, end, sm = d["launch"], d["start"], d["waited"], d["end"], d["sm"]
    ops = d["ops"]
    n = int(launch.max()) + 1
    layer_of = d["layers"] if "layers" in d.files else np.array([-1] + [(i - 1) // PER_LAYER for i in range(1, n)])
    ends = np.array([end[launch == i].max() for i in range(n)])
    lines = []
    for i in range(1, n):
        if layer_of[i] not in layers:
            continue
        sel = launch == i
        s, w, e = ((a[sel] - ends[i - 1]) / 1e3 for a in (start, waited, end))
        late = s > 0
        lines.append(f"{i:3d} {ops[i]:<24} blocks {int(sel.sum()):4d}  late {int(late.sum()):4d}")
        lines += [_row(label, v) for label, v in (("start", s), ("wait", w), ("end", e), ("dur", e - np.maximum(w, 0)))]
        if late.any():
            lines.append(_row("late-start", s[late]))
            before = launch == i - 1
            gaps = [(start[j] - end[before & (sm == sm[j])].max()) / 1e3 for j in np.flatnonzero(sel)[late]
                    if (before & (sm == sm[j])).any()]
            if gaps:
                lines.append(_row("slot gap", gaps))
        per_sm = np.bincount(sm[sel], minlength=int(sm.max()) + 1)
        lines.append(f"      SMs holding 0, 1, 2, ... blocks: {np.bincount(per_sm).tolist()}")
    return lines


if __name__ == "__main__":
    layers = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [10, 11]
    print("\n".join(detail(sys.argv[1], layers)))
