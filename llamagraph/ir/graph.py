"""The operator graph: typed values and nodes in schedule order.

The node list is the source of truth and is always a valid schedule (every input is produced
before it is read). ``dataflow()`` gives the networkx view the verifier checks the schedule
against. A graph prints as readable text that parses back (``str(graph)``,
``Graph.from_text``; the grammar is in ``text.py``) and round-trips through JSON.

Each value carries its own layout: a dtype (float32, float16, bfloat16, int8, packed int4, or
an integer type for step inputs) and, where it applies, a quantization description and a shard
description (weights) or a cache layout (the KV cache). Sizes come from the layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable

from .dtypes import DTYPES, nbytes
from .jsontext import dumps_lines

# Value kinds. Only "activation" values live in the planned arena; the others are
# persistent regions that outlive a step.
ACTIVATION, WEIGHT, KV_CACHE, INPUT = "activation", "weight", "kv_cache", "input"

Dim = int | str  # an int, or a symbolic dim name: "T" tokens in the step, "B" sequences in the step

# Roles: what a value is, where something must know (weights: how to draw random ones, what the
# embedding table is; graph outputs: which holds the logits), so nothing guesses it from a name.
ROLES = ("embedding_table", "norm", "matrix", "bias", "scales", "zeros", "logits", "next_token", "next_logprob",
         "token_logprobs")


@dataclass(frozen=True)
class Quant:
    """A quantized weight: its codes are this value; scales (and zeros) are other weight values.

    scheme "int8": symmetric, one scale per output row (``scales``: [N]); group_size None.
    scheme "int4": asymmetric, one scale and zero per group of ``group_size`` consecutive input
    columns of an output row (``scales``, ``zeros``: [N, K / group_size]).
    code_order: how the codes are stored on the device (``llamagraph.ir.quant.order_codes``): None,
    rows in order; "tile16", each block of 16 rows chunk-major. The logical array is row-major.
    """

    scheme: str
    scales: str
    group_size: int | None = None
    zeros: str | None = None
    code_order: str | None = None


QUANT_SCHEMES = {"int8": "int8", "int4": "int4"}  # scheme -> the dtype of its codes


@dataclass(frozen=True)
class Shard:
    """This weight value is one rank's slice of the whole weight, split along ``axis`` over ``ranks`` ranks.

    A weight is stacked from checkpoint parts (``attrs["parts"]``); each part is sliced on its own,
    before stacking, so a fused QKV value takes the rank's heads of q, of k and of v.

    ``blocks`` (one entry per part): the part is ``b`` equal blocks along ``axis`` (heads, or single
    rows); rank r takes ``max(1, b // ranks)`` blocks from block ``r * b // ranks``. With b < ranks
    every block is taken by ``ranks / b`` ranks in turn: KV heads replicated, as vLLM does.
    ``chunk`` (vocabulary-parallel, one part): rank r takes rows ``[r * chunk, (r + 1) * chunk)``; the
    last rank's slice may run past the part and is padded with zero rows up to ``chunk``.
    """

    axis: int
    ranks: int
    blocks: tuple[int, ...] | None = None
    chunk: int | None = None

    def __post_init__(self):
        if self.blocks is not None:  # from JSON: a list
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    def take(self, part: int, arr, rank: int):
        """Rank ``rank``'s slice of part number ``part`` (a numpy or cupy array)."""
        n = arr.shape[self.axis]
        if self.chunk is not None:
            lo, hi = min(n, rank * self.chunk), min(n, (rank + 1) * self.chunk)
            index = [slice(None)] * arr.ndim
            index[self.axis] = slice(lo, hi)
            piece = arr[tuple(index)]
            pad = self.chunk - (hi - lo)
            if pad:
                shape = list(arr.shape)
                shape[self.axis] = pad
                xp = array_module(arr)
                piece = xp.concatenate([piece, xp.zeros(shape, arr.dtype)], axis=self.axis)
            return piece
        b = self.blocks[part]
        size, count, first = n // b, max(1, b // self.ranks), rank * b // self.ranks
        index = [slice(None)] * arr.ndim
        index[self.axis] = slice(first * size, (first + count) * size)
        return arr[tuple(index)]


def stacked_shard(a: Shard | None, b: Shard | None) -> Shard | None:
    """The shard of a weight stacked from two weights' parts (a's, then b's), each cut alike."""
    if a is None and b is None:
        return None
    if a is None or b is None or a.axis != b.axis or a.ranks != b.ranks or a.blocks is None or b.blocks is None:
        raise ValueError(f"cannot stack weights sharded as {a} and {b}")
    return Shard(a.axis, a.ranks, blocks=a.blocks + b.blocks)


def array_module(arr):
    """numpy, or cupy for a cupy array (imported only when one is seen)."""
    mod = type(arr).__module__.split(".")[0]
    if mod == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy


@dataclass(frozen=True)
class CacheLayout:
    """How a KV cache is laid out. "dense": [max_batch, max_seq, kv_heads, head_dim], one slot per sequence."""

    kind: str = "dense"


CACHE_LAYOUTS = ("dense",)


@dataclass
class Value:
    name: str
    shape: tuple[Dim, ...]
    dtype: str
    kind: str = ACTIVATION
    # weight: {"parts": [[checkpoint_name, [rows, cols...]], ...]} concatenated along dim 0
    # kv_cache written by a node: {"alias": name of the cache it updates}
    # planned activation: {"offset": bytes into the arena, "buffer": buffer id}
    attrs: dict = field(default_factory=dict)
    layer: int | None = None  # the decoder layer it belongs to (None: outside the layers)
    role: str | None = None  # one of ROLES, where it matters
    quant: Quant | None = None
    shard: Shard | None = None
    layout: CacheLayout | None = None  # KV cache values only

    def numel(self, dims: dict[str, int]) -> int:
        n = 1
        for d in self.concrete_shape(dims):
            n *= d
        return n

    def nbytes(self, dims: dict[str, int]) -> int:
        return nbytes(self.dtype, self.concrete_shape(dims))

    def concrete_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def type_str(self) -> str:
        return f"{DTYPES[self.dtype].short}[{','.join(str(d) for d in self.shape)}]"

    def fields(self) -> dict:
        """Everything but name, shape, dtype and kind that is set, in a fixed order (for text
        and JSON): layer, role, quant, shard, layout, then attrs by key."""
        out: dict = {}
        if self.layer is not None:
            out["layer"] = self.layer
        if self.role is not None:
            out["role"] = self.role
        for key in ("quant", "shard", "layout"):
            obj = getattr(self, key)
            if obj is not None:
                out[key] = {k: v for k, v in asdict(obj).items() if v is not None}
        for key in sorted(self.attrs):
            out[key] = self.attrs[key]
        return out

    @classmethod
    def from_fields(cls, name: str, shape, dtype: str, kind: str, fields: dict) -> "Value":
        fields = dict(fields)
        v = cls(name, tuple(shape), dtype, kind)
        v.layer = fields.pop("layer", None)
        v.role = fields.pop("role", None)
        if "quant" in fields:
            v.quant = Quant(**fields.pop("quant"))
        if "shard" in fields:
            v.shard = Shard(**fields.pop("shard"))
        if "layout" in fields:
            v.layout = CacheLayout(**fields.pop("layout"))
        v.attrs = fields
        return v


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""
    layer: int | None = None  # the decoder layer it computes (None: outside the layers)


@dataclass
class Graph:
    values: dict[str, Value] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)  # max sizes of symbolic dims, for planning
    meta: dict = field(default_factory=dict)  # model config summary; the memory plan's totals

    # ---- construction -------------------------------------------------------------------
    def add_value(self, name: str, shape: Iterable[Dim], dtype: str, kind: str = ACTIVATION, *,
                  layer: int | None = None, role: str | None = None, quant: Quant | None = None,
                  shard: Shard | None = None, layout: CacheLayout | None = None, **attrs) -> str:
        if name in self.values:
            raise ValueError(f"duplicate value name {name!r}")
        self.values[name] = Value(name, tuple(shape), dtype, kind, dict(attrs), layer, role, quant, shard, layout)
        return name

    def add_node(self, op: str, inputs: list[str], outputs: list[str], name: str = "", layer: int | None = None,
                 **attrs) -> Node:
        node = Node(op, list(inputs), list(outputs), dict(attrs), name or outputs[0], layer)
        self.nodes.append(node)
        return node

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base.2``, ``base.3``... : the first name no value has."""
        name, k = base, 1
        while name in self.values:
            k += 1
            name = f"{base}.{k}"
        return name

    def copy(self) -> "Graph":
        """A copy sharing nothing mutable. Built field by field: deepcopy's bookkeeping made
        copying most of the pass pipeline's time (every rewrite copies the graph)."""
        values = {k: Value(v.name, v.shape, v.dtype, v.kind, _copy_data(v.attrs), v.layer, v.role, v.quant, v.shard,
                           v.layout) for k, v in self.values.items()}
        nodes = [Node(n.op, list(n.inputs), list(n.outputs), _copy_data(n.attrs), n.name, n.layer) for n in self.nodes]
        return Graph(values, nodes, list(self.outputs), dict(self.dims), _copy_data(self.meta))

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

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def with_role(self, role: str) -> str:
        """The name of the one value with ``role`` (e.g. the graph output holding the logits)."""
        found = [v.name for v in self.values.values() if v.role == role]
        if len(found) != 1:
            raise KeyError(f"graph has {len(found)} values with role {role!r}, expected one")
        return found[0]

    def dependencies(self) -> list[tuple[int, int, str, str]]:
        """(i, j, value, kind) for every ordering constraint: node j must run after node i.

        "flow" edges carry a value i writes and j reads. "anti" edges order a cache update
        after every reader of the cache it overwrites in place (a write-after-read hazard).
        """
        edges = []
        prod = self.producers()
        readers = self.users()
        for j, n in enumerate(self.nodes):
            for v in n.inputs:
                if v in prod:
                    edges.append((prod[v], j, v, "flow"))
            for o in n.outputs:
                base = self.values[o].attrs.get("alias") if o in self.values else None
                for i in readers.get(base, []) if base else []:
                    if i != j:
                        edges.append((i, j, base, "anti"))
        return edges

    def dataflow(self):
        """``dependencies()`` as a networkx DiGraph over node indices (edge data: value, kind).
        networkx is imported here, not with the module: loading a plan never needs it."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(range(len(self.nodes)))
        for i, j, value, kind in self.dependencies():
            g.add_edge(i, j, value=value, kind=kind)
        return g

    # ---- text and JSON ----------------------------------------------------------------------
    def __str__(self) -> str:
        from .text import print_graph

        return print_graph(self)

    @classmethod
    def from_text(cls, text: str) -> "Graph":
        from .text import parse_graph

        return parse_graph(text)

    def to_dict(self) -> dict:
        def node(n: Node) -> dict:
            d = {"op": n.op, "name": n.name, "inputs": n.inputs, "outputs": n.outputs, "attrs": n.attrs}
            if n.layer is not None:
                d["layer"] = n.layer
            return d

        return {
            "dims": self.dims,
            "meta": self.meta,
            "outputs": self.outputs,
            "values": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype, "kind": v.kind, **v.fields()}
                       for v in self.values.values()],
            "nodes": [node(n) for n in self.nodes],
        }

    def to_json(self) -> str:
        return dumps_lines(self.to_dict())  # one value or node a line

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        g = cls(dims=dict(d["dims"]), meta=d["meta"], outputs=list(d["outputs"]))
        for v in d["values"]:
            rest = {k: x for k, x in v.items() if k not in ("name", "shape", "dtype", "kind")}
            g.values[v["name"]] = Value.from_fields(v["name"], v["shape"], v["dtype"], v["kind"], rest)
        for n in d["nodes"]:
            g.nodes.append(Node(n["op"], n["inputs"], n["outputs"], n["attrs"], n["name"], n.get("layer")))
        return g

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        return cls.from_dict(json.loads(text))

    def structure(self) -> tuple:
        """A canonical form for structural comparison in tests: the non-activation values (any
        order), then every node in schedule order with its wiring, types, attrs and layer."""
        def typed(name: str) -> tuple:
            v = self.values[name]
            return name, v.type_str(), json.dumps(v.fields(), sort_keys=True)

        decls = sorted(typed(v.name) + (v.kind,) for v in self.values.values()
                       if v.kind != ACTIVATION and "alias" not in v.attrs)
        rows = tuple(
            (n.op, tuple(n.inputs), tuple(typed(o) for o in n.outputs), json.dumps(n.attrs, sort_keys=True), n.layer)
            for n in self.nodes
        )
        return tuple(decls), rows, tuple(self.outputs)


def _copy_data(x):
    """A copy of JSON-like data (dicts, lists, tuples of them); anything else is immutable here
    (numbers, strings, frozen dataclasses) and shared."""
    if isinstance(x, dict):
        return {k: _copy_data(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_data(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_copy_data(v) for v in x)
    return x
