"""Fold a bias add into the GEMM before it, as the GEMM's epilogue.

    # bias_add(gemm(x, W), b) -> gemm(x, W, b)      (gemm: any linear op without a bias)
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node

from .rewrite import Matcher, apply

LINEAR_OPS = ("qkv_gemm", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def fuse_gemm_bias(graph: Graph) -> Graph:
    m = Matcher(graph)
    replaced: dict[int, Node | None] = {}
    for i, node in enumerate(graph.nodes):
        if node.op != "bias_add":
            continue
        gi = m.producer(node.inputs[0], LINEAR_OPS)
        if gi is None or len(graph.nodes[gi].inputs) != 2 or not m.only_user(node.inputs[0], i):
            continue
        gemm = graph.nodes[gi]
        # The biased GEMM writes the bias_add's output name; it sits where the GEMM was.
        replaced[gi] = Node(gemm.op, gemm.inputs + [node.inputs[1]], node.outputs, dict(gemm.attrs), gemm.name)
        replaced[i] = None
    return apply(graph, replaced)
