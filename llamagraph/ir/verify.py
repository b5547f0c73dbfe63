"""Well-formedness check, run after every pass.

A graph is well formed when every node's op is registered and gets an allowed number of
inputs, every value it reads is defined earlier in the schedule (or is a persistent input,
weight or cache), every activation is written exactly once, and every output's declared shape
and dtype equal what the op's shape rule infers.
"""

from __future__ import annotations

from .errors import GraphError
from .graph import ACTIVATION, KV_CACHE, Graph
from .ops import OPS


def verify(graph: Graph, where: str = "") -> None:
    at = f" (after {where})" if where else ""
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
                raise GraphError(f"{here}: %{name} declared {v.type_str()} but op infers {dtype}{list(shape)}")
    for name in graph.outputs:
        if name not in written:
            raise GraphError(f"graph output %{name} is never written{at}")
    for name, v in graph.values.items():
        if v.kind == ACTIVATION and name not in written:
            raise GraphError(f"activation %{name} is declared but never written{at}")
