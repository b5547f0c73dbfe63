"""The operator graph: typed values and nodes in schedule order.

The node list is the source of truth and is always a valid schedule (every input is produced
before it is read). networkx views are built on demand for algorithms and drawing.
A graph prints as readable text (``str(graph)``) and round-trips through JSON.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx

# Value kinds. Only "activation" values live in the planned arena; the others are
# persistent regions that outlive a step.
ACTIVATION, WEIGHT, KV_CACHE, INPUT = "activation", "weight", "kv_cache", "input"
KINDS = (ACTIVATION, WEIGHT, KV_CACHE, INPUT)

# Storage dtypes and their sizes in bytes. bf16 is held as raw 16-bit words.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4, "int64": 8}
DTYPE_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int32": "i32", "uint32": "u32", "int64": "i64"}

Dim = int | str  # an int, or a symbolic dim name: "T" tokens in the step, "B" sequences in the step


@dataclass
class Value:
    name: str
    shape: tuple[Dim, ...]
    dtype: str
    kind: str = ACTIVATION
    # weight: {"parts": [[checkpoint_name, [rows, cols...]], ...]} concatenated along dim 0
    # kv_cache written by a node: {"alias": name of the cache it updates}
    attrs: dict = field(default_factory=dict)

    def numel(self, dims: dict[str, int]) -> int:
        n = 1
        for d in self.shape:
            n *= dims[d] if isinstance(d, str) else d
        return n

    def nbytes(self, dims: dict[str, int]) -> int:
        return self.numel(dims) * DTYPE_BYTES[self.dtype]

    def concrete_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def type_str(self) -> str:
        return f"{DTYPE_SHORT[self.dtype]}[{','.join(str(d) for d in self.shape)}]"


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""


@dataclass
class Graph:
    values: dict[str, Value] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)  # max sizes of symbolic dims, for planning
    meta: dict = field(default_factory=dict)  # model config summary, dtype; planning results

    # ---- construction -------------------------------------------------------------------
    def add_value(self, name: str, shape: Iterable[Dim], dtype: str, kind: str = ACTIVATION, **attrs) -> str:
        if name in self.values:
            raise ValueError(f"duplicate value name {name!r}")
        self.values[name] = Value(name, tuple(shape), dtype, kind, dict(attrs))
        return name

    def add_node(self, op: str, inputs: list[str], outputs: list[str], name: str = "", **attrs) -> Node:
        node = Node(op, list(inputs), list(outputs), dict(attrs), name or outputs[0])
        self.nodes.append(node)
        return node

    def copy(self) -> "Graph":
        return copy.deepcopy(self)

    # ---- queries ---------------------------------------------------------------------------
    def producers(self) -> dict[str, int]:
        """Value name -> index of the node that writes it."""
        return {v: i for i, n in enumerate(self.nodes) for v in n.outputs}

    def users(self) -> dict[str, list[int]]:
        """Value name -> indices of the nodes that read it, in schedule order."""
        out: dict[str, list[int]] = {name: [] for name in self.values}
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                out.setdefault(v, []).append(i)
        return out

    def of_kind(self, kind: str) -> list[Value]:
        return [v for v in self.values.values() if v.kind == kind]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def to_networkx(self) -> nx.DiGraph:
        """Nodes are node indices; an edge i->j carries the value j reads from i."""
        g = nx.DiGraph()
        prod = self.producers()
        for i, n in enumerate(self.nodes):
            g.add_node(i, op=n.op, name=n.name)
            for v in n.inputs:
                if v in prod:
                    g.add_edge(prod[v], i, value=v)
        return g

    # ---- text and JSON ----------------------------------------------------------------------
    def __str__(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.dims.items())
        lines = [f"graph {self.meta.get('name', 'llama')} ({dims})"]
        for kind in (INPUT, WEIGHT, KV_CACHE):
            vals = [v for v in self.values.values() if v.kind == kind and "alias" not in v.attrs]
            if vals:
                lines.append(f"  {kind}s: {len(vals)}")
                if kind != WEIGHT:
                    lines += [f"    %{v.name}: {v.type_str()}" for v in vals]
        for n in self.nodes:
            outs = ", ".join(f"%{o}: {self.values[o].type_str()}" for o in n.outputs)
            ins = ", ".join(("@" if self.values[i].kind == WEIGHT else "%") + i for i in n.inputs)
            attrs = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(n.attrs.items()))
            lines.append(f"  {outs} = {n.op}({ins})" + (f" {{{attrs}}}" if attrs else ""))
        lines.append("  return " + ", ".join(f"%{o}" for o in self.outputs))
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(
            {
                "dims": self.dims,
                "meta": self.meta,
                "outputs": self.outputs,
                "values": [
                    {"name": v.name, "shape": list(v.shape), "dtype": v.dtype, "kind": v.kind, "attrs": v.attrs}
                    for v in self.values.values()
                ],
                "nodes": [{"op": n.op, "name": n.name, "inputs": n.inputs, "outputs": n.outputs, "attrs": n.attrs} for n in self.nodes],
            },
            indent=1,
            sort_keys=False,
        )

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        d = json.loads(text)
        g = cls(dims=dict(d["dims"]), meta=d["meta"], outputs=list(d["outputs"]))
        for v in d["values"]:
            g.values[v["name"]] = Value(v["name"], tuple(v["shape"]), v["dtype"], v["kind"], v["attrs"])
        for n in d["nodes"]:
            g.nodes.append(Node(n["op"], n["inputs"], n["outputs"], n["attrs"], n["name"]))
        return g

    def structure(self) -> list[tuple]:
        """A canonical form for structural comparison in tests: ops, wiring, attrs and types."""
        rows = []
        for n in self.nodes:
            rows.append(
                (
                    n.op,
                    tuple((i, self.values[i].type_str()) for i in n.inputs),
                    tuple((o, self.values[o].type_str()) for o in n.outputs),
                    json.dumps(n.attrs, sort_keys=True),
                )
            )
        return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)
