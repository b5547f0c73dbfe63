"""Static memory planning: liveness over the schedule, then offsets in one activation arena.

1. Liveness (``llamagraph.ir.memory.liveness``): an activation is live from the node that
   writes it to the last node that reads it (graph outputs stay live to the end).
2. In place: when an op allows output i to overwrite input j (``OpDef.inplace``), the input
   dies at this node and the sizes match, the output joins the input's buffer.
3. Placement: buffers, largest first, each at the lowest aligned offset that overlaps no
   already-placed buffer live at the same time (greedy best fit over an interval graph).

With ``graph.meta["keep_values"]`` set (``compile(..., keep_values=True)``), every activation
stays live to the end of the schedule: each gets a buffer of its own and nothing is overwritten,
so every intermediate of a step can be read after it (``llamagraph.bisect`` does).

Sizes use the maximum of each symbolic dim (``graph.dims``), so the plan serves every step.
Weights, KV cache and step inputs are persistent regions outside the arena. The result is
written to each activation (``attrs`` offset and buffer) and the totals to
``graph.meta["memory"]``; ``llamagraph.ir.memory.buffers`` reads the buffers back.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, OPS, WEIGHT, Graph
from llamagraph.ir.memory import Liveness, align, liveness

ALIGN = 256  # bytes; every buffer starts on a 256-byte boundary (16-byte vector loads need 16)


@dataclass
class Slot:
    """One arena buffer while it is planned: the activations sharing it, in schedule order."""

    values: list[str]
    size: int
    first: int
    last: int
    offset: int = -1
    bid: int = 0


def group(graph: Graph, live: Liveness) -> list[Slot]:
    """Group activations into buffers, merging in-place outputs into their inputs' buffers."""
    owner: dict[str, Slot] = {}
    bufs: list[Slot] = []
    for i, node in enumerate(graph.nodes):
        claimed: set[str] = set()
        for oi, o in enumerate(node.outputs):
            v = graph.values[o]
            if v.kind != ACTIVATION:
                continue
            size = align(v.nbytes(graph.dims), ALIGN)
            target = None
            for ii in OPS[node.op].inplace.get(oi, ()):
                a = node.inputs[ii]
                if (
                    a in owner
                    and a not in claimed
                    and live.last[a] == i
                    and a not in graph.outputs
                    and owner[a].size == size
                    and owner[a].last == i  # no other value of that buffer outlives this node
                ):
                    target = owner[a]
                    claimed.add(a)
                    break
            if target is None:
                target = Slot([], size, i, i, bid=len(bufs))
                bufs.append(target)
            target.values.append(o)
            target.last = max(target.last, live.last[o])
            owner[o] = target
    return bufs


def place(bufs: list[Slot]) -> int:
    """Assign offsets; return the arena size."""
    placed: list[Slot] = []
    for b in sorted(bufs, key=lambda b: (-b.size, b.first, b.bid)):
        busy = sorted((p.offset, p.offset + p.size) for p in placed if p.first <= b.last and b.first <= p.last)
        offset = 0
        for lo, hi in busy:
            if offset + b.size <= lo:
                break
            offset = max(offset, hi)
        b.offset = offset
        placed.append(b)
    return max((b.offset + b.size for b in bufs), default=0)


def lower_bound(bufs: list[Slot], n_steps: int) -> int:
    """The most bytes live at one point of the schedule: no placement can use less."""
    delta = [0] * (n_steps + 2)
    for b in bufs:
        delta[b.first] += b.size
        delta[b.last + 1] -= b.size
    peak = cur = 0
    for d in delta:
        cur += d
        peak = max(peak, cur)
    return peak


def plan_memory(graph: Graph) -> Graph:
    out = graph.copy()
    live = liveness(out)
    if out.meta.get("keep_values"):  # nothing dies before the step ends: no reuse, no in-place
        for name in live.last:
            live.last[name] = len(out.nodes)
    bufs = group(out, live)
    arena = place(bufs)
    for b in bufs:
        for name in b.values:
            out.values[name].attrs.update(offset=b.offset, buffer=b.bid)

    def region(kind: str) -> int:
        return sum(v.nbytes(out.dims) for v in out.values.values() if v.kind == kind and "alias" not in v.attrs)

    out.meta["memory"] = {
        "arena_bytes": arena,
        "lower_bound_bytes": lower_bound(bufs, len(out.nodes)),
        "weight_bytes": region(WEIGHT),
        "kv_cache_bytes": region(KV_CACHE),
        "input_bytes": region(INPUT),
        "buffers": len(bufs),
        "align": ALIGN,
    }
    return out
