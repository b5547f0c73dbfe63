"""Fuse (bias +) residual + RMSNorm into one op writing the new residual stream and its norm.

    # rmsnorm(residual(bias_add(y, b), r), w) -> add_rmsnorm(y, r, w, b) -> (sum, normed)
    # rmsnorm(residual(y, r), w)              -> add_rmsnorm(y, r, w)    -> (sum, normed)

The residual sum keeps its name, so later residual adds still read it (the residual node is
not exclusive). The fused node sits where the residual was: every input exists by then, and
any reader of the sum between the two old nodes still sees it written.
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node

from .rewrite import Match, Pat, Rule, rewrite


def _residual(y) -> Pat:
    return Pat("residual", (y, "r"), name="res", exclusive=False)


WITH_BIAS = Pat("rmsnorm", (_residual(Pat("bias_add", ("y", "b"), name="bias")), "w"), name="norm")
PLAIN = Pat("rmsnorm", (_residual("y"), "w"), name="norm")


def _fused(m: Match, out: Graph) -> dict:
    res, norm = m.node("res"), m.node("norm")
    inputs = [m["y"], m["r"], m["w"]] + ([m["b"]] if "b" in m else [])
    fused = Node("add_rmsnorm", inputs, [res.outputs[0], norm.outputs[0]], dict(norm.attrs), norm.name, norm.layer)
    return {"res": fused, "norm": None, "bias": None} if "b" in m else {"res": fused, "norm": None}


def fuse_residual_rmsnorm(graph: Graph) -> Graph:
    return rewrite(graph, [Rule(WITH_BIAS, _fused), Rule(PLAIN, _fused)])
