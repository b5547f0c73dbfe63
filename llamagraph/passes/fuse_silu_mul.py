"""Fuse SiLU and the gating multiply into one element-wise op.

    # mul(silu(g), u) -> silu_mul(g, u)
    # mul(u, silu(g)) -> silu_mul(g, u)
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node

from .rewrite import Match, Pat, Rule, rewrite

SILU = Pat("silu", ("g",), name="silu")


def _fused(m: Match, out: Graph) -> dict:
    mul = m.node("mul")
    return {"silu": None, "mul": Node("silu_mul", [m["g"], m["u"]], mul.outputs, {}, mul.name, mul.layer)}


def fuse_silu_mul(graph: Graph) -> Graph:
    return rewrite(graph, [Rule(Pat("mul", (SILU, "u"), name="mul"), _fused),
                           Rule(Pat("mul", ("u", SILU), name="mul"), _fused)])
