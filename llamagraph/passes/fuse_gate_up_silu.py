"""Fuse the gate and up projections and SiLU*mul into one GEMM with a SwiGLU epilogue.

    # silu_mul(gate_proj(x, Wg[, bg]), up_proj(x, Wu[, bu])) -> gate_up_silu(x, [Wg; Wu][, [bg; bu]])

The concatenated weight is a new value whose parts list the gate rows then the up rows, so
the loader assembles it at load time; the separate weights become dead.
"""

from __future__ import annotations

from llamagraph.ir import WEIGHT, Graph, Node

from .rewrite import Matcher, apply


def _concat_weight(graph: Graph, a: str, b: str, name: str) -> str:
    va, vb = graph.values[a], graph.values[b]
    if name not in graph.values:
        shape = (va.shape[0] + vb.shape[0],) + tuple(va.shape[1:])
        graph.add_value(name, shape, va.dtype, WEIGHT, parts=va.attrs["parts"] + vb.attrs["parts"])
    return name


def fuse_gate_up_silu(graph: Graph) -> Graph:
    m = Matcher(graph)
    out = graph.copy()
    replaced: dict[int, Node | None] = {}
    for i, node in enumerate(graph.nodes):
        if node.op != "silu_mul":
            continue
        gi, ui = m.producer(node.inputs[0], "gate_proj"), m.producer(node.inputs[1], "up_proj")
        if gi is None or ui is None:
            continue
        gate, up = graph.nodes[gi], graph.nodes[ui]
        if gate.inputs[0] != up.inputs[0] or len(gate.inputs) != len(up.inputs):
            continue
        if not (m.only_user(node.inputs[0], i) and m.only_user(node.inputs[1], i)):
            continue
        prefix = gate.inputs[1].rsplit(".", 2)[0]  # "l3.gate.w" -> "l3"
        inputs = [gate.inputs[0], _concat_weight(out, gate.inputs[1], up.inputs[1], f"{prefix}.gate_up.w")]
        if len(gate.inputs) == 3:
            inputs.append(_concat_weight(out, gate.inputs[2], up.inputs[2], f"{prefix}.gate_up_bias.w"))
        first, last = min(gi, ui), max(gi, ui)
        replaced[first] = Node("gate_up_silu", inputs, node.outputs, {}, node.name)
        replaced[last] = None
        replaced[i] = None
    fused = apply(out, replaced)
    return fused
