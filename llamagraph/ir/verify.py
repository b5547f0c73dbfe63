"""Well-formedness check, run after every pass.

A graph is well formed when:
- every node's op is registered and gets an allowed number of inputs;
- every value it reads is defined earlier in the schedule (or is a persistent input, weight or
  cache), every activation is written exactly once, and every output's declared shape and
  dtype equal what the op's shape rule infers;
- the schedule is a topological order of the dataflow, including the
  write-after-read order of in-place KV-cache updates, and that dataflow has no cycle (named
  with networkx, imported only when something is out of order);
- every value's layout is consistent: a known dtype for its kind, a quantization description
  only on weights and naming real scale/zero weights of the right shapes, a shard description
  with a real axis, a cache layout on exactly the KV-cache values.
"""

from __future__ import annotations

from .dtypes import DTYPES, FLOAT_DTYPES, QUANT_DTYPES
from .errors import GraphError
from .layout import ROW_ORDERS, row_order
from .graph import ACTIVATION, CACHE_LAYOUTS, INPUT, KV_CACHE, QUANT_SCHEMES, ROLES, WEIGHT, Graph, Value
from .ops import OPS
from .quant import CHUNK, CODE_ORDERS, TILE_ROWS


def verify(graph: Graph, where: str = "") -> None:
    at = f" (after {where})" if where else ""
    for v in graph.values.values():
        problem = _layout_problem(graph, v)
        if problem:
            raise GraphError(f"value %{v.name}: {problem}{at}")
    defined = {name for name, v in graph.values.items() if v.kind != ACTIVATION and "alias" not in v.attrs}
    written: set[str] = set()
    for idx, node in enumerate(graph.nodes):
        here = f"node {idx} '{node.name}' ({node.op}){at}"
        if node.op not in OPS:
            raise GraphError(f"{here}: unknown op")
        opdef = OPS[node.op]
        lo, hi = opdef.n_inputs
        if not lo <= len(node.inputs) <= hi:
            raise GraphError(f"{here}: takes {lo}..{hi} inputs, got {len(node.inputs)}")
        if node.layer is not None and (not isinstance(node.layer, int) or node.layer < 0):
            raise GraphError(f"{here}: layer must be a non-negative integer, got {node.layer!r}")
        for name in node.inputs:
            if name not in graph.values:
                raise GraphError(f"{here}: reads undeclared value %{name}")
            if name not in defined:
                raise GraphError(f"{here}: reads %{name} before it is written")
        for name in node.outputs:
            if name not in graph.values:
                raise GraphError(f"{here}: writes undeclared value %{name}")
            if name in written:
                raise GraphError(f"{here}: writes %{name}, which an earlier node already wrote")
            v = graph.values[name]
            if v.kind not in (ACTIVATION, KV_CACHE) or (v.kind == KV_CACHE and "alias" not in v.attrs):
                raise GraphError(f"{here}: writes %{name} of kind {v.kind}; only activations and cache aliases are written")
            written.add(name)
            defined.add(name)
        try:
            inferred = opdef.infer([graph.values[i] for i in node.inputs], node.attrs)
        except (KeyError, ValueError, IndexError) as e:
            raise GraphError(f"{here}: shape rule failed: {e}") from None
        if len(inferred) != len(node.outputs):
            raise GraphError(f"{here}: op has {len(inferred)} outputs, node lists {len(node.outputs)}")
        for name, (shape, dtype) in zip(node.outputs, inferred):
            v = graph.values[name]
            if tuple(v.shape) != tuple(shape) or v.dtype != dtype:
                raise GraphError(f"{here}: %{name} declared {v.type_str()} but op infers {DTYPES[dtype].short}{list(shape)}")
    for name in graph.outputs:
        if name not in written:
            raise GraphError(f"graph output %{name} is never written{at}")
    for name, v in graph.values.items():
        if v.kind == ACTIVATION and name not in written:
            raise GraphError(f"activation %{name} is declared but never written{at}")
    _check_schedule(graph, at)


def _check_schedule(graph: Graph, at: str) -> None:
    edges = graph.dependencies()
    backward = [e for e in edges if e[0] >= e[1]]
    if not backward:
        return  # every constraint points forward: the schedule is a topological order, so no cycle
    # something is out of order: networkx names a cycle if there is one (then no order can work)
    import networkx as nx

    flow = graph.dataflow()
    if not nx.is_directed_acyclic_graph(flow):
        cycle = " -> ".join(graph.nodes[i].name for i, _ in nx.find_cycle(flow))
        raise GraphError(f"the dataflow has a cycle: {cycle}{at}")
    i, j, value, kind = backward[0]  # j must run after i but is scheduled before it
    first, later = f"node {j} '{graph.nodes[j].name}'", f"node {i} '{graph.nodes[i].name}'"
    if kind == "anti":
        raise GraphError(f"{first} overwrites %{value} in place before {later} reads it{at}")
    raise GraphError(f"{first} reads %{value} before {later} writes it{at}")


def _layout_problem(graph: Graph, v: Value) -> str | None:
    if v.dtype not in DTYPES:
        return f"unknown dtype {v.dtype!r}"
    if v.kind not in (ACTIVATION, WEIGHT, KV_CACHE, INPUT):
        return f"unknown kind {v.kind!r}"
    if v.dtype in QUANT_DTYPES and v.kind != WEIGHT:
        return f"only weights may be {v.dtype}"
    if v.kind in (ACTIVATION, KV_CACHE) and v.dtype not in FLOAT_DTYPES + ("int32",):
        return f"an {v.kind} must be a float (or int32) value, not {v.dtype}"
    if v.role is not None and v.role not in ROLES:
        return f"unknown role {v.role!r}; roles are {', '.join(ROLES)}"
    if v.layer is not None and (not isinstance(v.layer, int) or v.layer < 0):
        return f"layer must be a non-negative integer, got {v.layer!r}"
    if (v.layout is not None) != (v.kind == KV_CACHE):
        return "a cache layout belongs on exactly the KV-cache values"
    if v.layout is not None and v.layout.kind not in CACHE_LAYOUTS:
        return f"unknown cache layout {v.layout.kind!r}; layouts are {', '.join(CACHE_LAYOUTS)}"
    if v.shard is not None:
        if v.kind != WEIGHT:
            return "only weights are sharded"
        if not 0 <= v.shard.axis < len(v.shape):
            return f"shard axis {v.shard.axis} is not an axis of {v.type_str()}"
        if v.shard.ranks < 1:
            return f"shard ranks must be >= 1, got {v.shard.ranks}"
        if (v.shard.blocks is None) == (v.shard.chunk is None):
            return "a shard names either blocks (one per part) or a chunk"
        if v.shard.blocks is not None and len(v.shard.blocks) != len(v.attrs.get("parts", [])):
            return f"shard blocks {list(v.shard.blocks)} do not match its {len(v.attrs.get('parts', []))} parts"
    if v.dtype in QUANT_DTYPES and v.quant is None:
        return f"{v.dtype} weight has no quantization description (scales)"
    if v.dtype == "int4" and v.shape and isinstance(v.shape[-1], int) and v.shape[-1] % 2:
        return f"packed int4 needs an even last dim, got {v.type_str()}"
    if v.quant is not None:
        return _quant_problem(graph, v)
    if "row_order" in v.attrs:
        return _row_order_problem(v)
    return None


def _row_order_problem(v: Value) -> str | None:
    """A row order must name a known permutation of exactly this weight's rows."""
    spec = v.attrs["row_order"]
    if v.kind != WEIGHT:
        return "only weights have a row order"
    if not isinstance(spec, list) or not spec or spec[0] not in ROW_ORDERS:
        return f"unknown row_order {spec!r}; row orders are {', '.join(ROW_ORDERS)}"
    try:
        order = row_order(v.attrs)
    except (TypeError, ValueError) as e:
        return f"bad row_order {spec!r}: {e}"
    if not v.shape or len(order) != v.shape[0]:
        return f"row_order {spec!r} permutes {len(order)} rows, value has {v.type_str()}"
    return None


def _quant_problem(graph: Graph, v: Value) -> str | None:
    q = v.quant
    if v.kind != WEIGHT:
        return "only weights are quantized"
    if q.scheme not in QUANT_SCHEMES:
        return f"unknown quantization scheme {q.scheme!r}; schemes are {', '.join(QUANT_SCHEMES)}"
    if v.dtype != QUANT_SCHEMES[q.scheme]:
        return f"scheme {q.scheme} stores {QUANT_SCHEMES[q.scheme]} codes, value is {v.dtype}"
    if len(v.shape) != 2 or not all(isinstance(d, int) for d in v.shape):
        return f"a quantized weight is a fixed-size matrix [N, K], got {v.type_str()}"
    N, K = v.shape
    if q.scheme == "int8":
        if q.group_size is not None or q.zeros is not None:
            return "int8 is one symmetric scale per row: no group_size, no zeros"
        want = {"scales": (N,)}
    else:
        if not isinstance(q.group_size, int) or q.group_size <= 0 or K % q.group_size:
            return f"int4 group_size {q.group_size!r} must be a positive divisor of K={K}"
        if q.zeros is None:
            return "int4 is asymmetric: it needs zeros"
        want = {"scales": (N, K // q.group_size), "zeros": (N, K // q.group_size)}
    if q.code_order is not None:
        if q.code_order not in CODE_ORDERS:
            return f"code order {q.code_order!r} is not one of {', '.join(CODE_ORDERS)}"
        row_bytes = K if q.scheme == "int8" else K // 2
        if N % TILE_ROWS or K % 2 or row_bytes % CHUNK:
            return (f"code order {q.code_order!r} needs N % {TILE_ROWS} == 0 and whole {CHUNK}-byte chunks of "
                    f"{q.scheme} codes a row, got [{N}, {K}]")
    for field_name, shape in want.items():
        ref = getattr(q, field_name)
        other = graph.values.get(ref)
        if other is None or other.kind != WEIGHT:
            return f"quantization {field_name} %{ref} is not a weight of this graph"
        if tuple(other.shape) != shape or other.dtype not in FLOAT_DTYPES:
            return f"quantization {field_name} %{ref} must be a float {list(shape)}, got {other.type_str()}"
    return None
