"""Dead-code elimination: drop nodes nothing reads (unless they write the KV cache) and
values no node touches. Step inputs stay: the runtime writes them every step."""

from __future__ import annotations

from llamagraph.ir import INPUT, OPS, Graph


def dce(graph: Graph) -> Graph:
    out = graph.copy()
    live = set(out.outputs)
    kept = []
    for node in reversed(out.nodes):
        if OPS[node.op].effects or any(o in live for o in node.outputs):
            kept.append(node)
            live.update(node.inputs)
    out.nodes = kept[::-1]
    touched = set(out.outputs)
    for node in out.nodes:
        touched.update(node.inputs)
        touched.update(node.outputs)
    for name in list(touched):  # a quantized weight's scales and zeros are read through its layout
        q = out.values[name].quant if name in out.values else None
        if q is not None:
            touched.update(r for r in (q.scales, q.zeros) if r)
    out.values = {k: v for k, v in out.values.items() if k in touched or v.kind == INPUT}
    return out
