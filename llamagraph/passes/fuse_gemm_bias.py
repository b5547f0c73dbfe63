"""Fold a bias add into the GEMM before it, as the GEMM's epilogue.

    # bias_add(gemm(x, W), b) -> gemm(x, W, b)      (gemm: any op registered with gemm=True)

The biased GEMM writes the bias add's output and sits where the GEMM was.
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node
from llamagraph.ir.ops import gemm_ops

from .rewrite import Match, Pat, Rule, rewrite


def _fused(m: Match, out: Graph) -> dict:
    gemm, add = m.node("gemm"), m.node("add")
    return {"gemm": Node(gemm.op, [m["x"], m["w"], m["b"]], add.outputs, dict(gemm.attrs), gemm.name, gemm.layer),
            "add": None}


def fuse_gemm_bias(graph: Graph) -> Graph:
    pattern = Pat("bias_add", (Pat(gemm_ops(), ("x", "w"), name="gemm"), "b"), name="add")
    return rewrite(graph, [Rule(pattern, _fused)])
