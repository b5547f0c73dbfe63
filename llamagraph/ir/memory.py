"""Liveness over a schedule, and the arena buffers a memory plan assigned.

The planner (``llamagraph.passes.plan_memory``) writes each activation's ``offset`` and
``buffer`` into its value and the totals into ``graph.meta["memory"]``; ``buffers`` reads the
plan back from those fields, so the graph alone is the whole memory plan (reports, pictures
and tests all read it through here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import ACTIVATION, Graph


@dataclass
class Liveness:
    first: dict[str, int] = field(default_factory=dict)  # activation -> index of the node writing it
    last: dict[str, int] = field(default_factory=dict)  # activation -> index of its last reader


def liveness(graph: Graph) -> Liveness:
    """An activation is live from the node that writes it to the last node that reads it;
    graph outputs stay live to the end of the schedule (index ``len(graph.nodes)``)."""
    live = Liveness()
    end = len(graph.nodes)
    for i, node in enumerate(graph.nodes):
        for o in node.outputs:
            if graph.values[o].kind == ACTIVATION:
                live.first[o] = i
                live.last[o] = i
        for v in node.inputs:
            if v in live.first:
                live.last[v] = i
    for o in graph.outputs:
        if o in live.last:
            live.last[o] = end
    return live


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass
class Buffer:
    id: int
    values: list[str]
    offset: int
    size: int  # bytes, aligned
    first: int  # schedule step where its first value is written
    last: int  # schedule step of its last value's last read

    def as_dict(self) -> dict:
        return {"id": self.id, "values": self.values, "offset": self.offset, "size": self.size,
                "first": self.first, "last": self.last}


def buffers(graph: Graph) -> list[Buffer]:
    """The planned arena buffers, by id, read back from the planned graph."""
    if "memory" not in graph.meta:
        raise ValueError("graph has no memory plan (run the plan_memory pass)")
    to = graph.meta["memory"]["align"]
    live = liveness(graph)
    found: dict[int, Buffer] = {}
    for name in live.first:  # schedule order
        v = graph.values[name]
        bid, size = v.attrs["buffer"], align(v.nbytes(graph.dims), to)
        b = found.setdefault(bid, Buffer(bid, [], v.attrs["offset"], size, live.first[name], live.last[name]))
        b.values.append(name)
        b.size = max(b.size, size)
        b.last = max(b.last, live.last[name])
    return [found[k] for k in sorted(found)]
