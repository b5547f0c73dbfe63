"""Fuse (bias +) residual + RMSNorm into one op writing the new residual stream and its norm.

    # rmsnorm(residual(bias_add(y, b), r), w) -> add_rmsnorm(y, r, w, b) -> (sum, normed)
    # rmsnorm(residual(y, r), w)              -> add_rmsnorm(y, r, w)    -> (sum, normed)

The residual sum keeps its name, so later residual adds still find it.
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node

from .rewrite import Matcher, apply


def fuse_residual_rmsnorm(graph: Graph) -> Graph:
    m = Matcher(graph)
    replaced: dict[int, Node | None] = {}
    for i, norm in enumerate(graph.nodes):
        if norm.op != "rmsnorm":
            continue
        ri = m.producer(norm.inputs[0], "residual")
        if ri is None or ri in replaced:
            continue
        res = graph.nodes[ri]
        y, r = res.inputs
        inputs = [y, r, norm.inputs[1]]
        bi = m.producer(y, "bias_add")
        if bi is not None and m.only_user(y, ri):
            y_raw, bias = graph.nodes[bi].inputs
            inputs = [y_raw, r, norm.inputs[1], bias]
            replaced[bi] = None
        # The fused node sits where the residual was: every input exists by then, and any
        # reader of the sum between the two old nodes still sees it written.
        replaced[ri] = Node("add_rmsnorm", inputs, [res.outputs[0], norm.outputs[0]], dict(norm.attrs), norm.name)
        replaced[i] = None
    return apply(graph, replaced)
