"""Fuse SiLU and the gating multiply into one element-wise op.

    # mul(silu(g), u) -> silu_mul(g, u)
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node

from .rewrite import Matcher, apply


def fuse_silu_mul(graph: Graph) -> Graph:
    m = Matcher(graph)
    replaced: dict[int, Node | None] = {}
    for i, node in enumerate(graph.nodes):
        if node.op != "mul":
            continue
        for side in (0, 1):
            si = m.producer(node.inputs[side], "silu")
            if si is not None and m.only_user(node.inputs[side], i):
                gate = graph.nodes[si].inputs[0]
                other = node.inputs[1 - side]
                replaced[si] = None
                replaced[i] = Node("silu_mul", [gate, other], node.outputs, {}, node.name)
                break
    return apply(graph, replaced)
