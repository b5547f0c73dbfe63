"""Fold the residual add (and the projection's bias) that follows a tensor-parallel all-reduce
into the collective itself: the kernel that sums the ranks' partials adds them to the stream.

    # residual(all_reduce(y), r)               -> all_reduce_residual(y, r)
    # residual(bias_add(all_reduce(y), b), r)  -> all_reduce_residual(y, r, b)

The residual add is then gone from the rank graph, as ``fuse_linear_residual`` removes it from a
one-GPU graph, so the RMSNorm after it stays plain and ``fuse_norm_prologue`` folds it into the
next GEMV: a tensor-parallel layer runs the one-GPU layer's kernels plus its two collectives.
The reduced sums must be read by the bias / residual alone. The fused node sits where the
residual add was and keeps its output name; ``dtype`` records where the unfused chain stores
the sum and the biased sum, so the reference rounds where the kernels do.
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node

from .rewrite import Match, Pat, Rule, rewrite

REDUCED = Pat("all_reduce", ("y",), name="reduce")
BIASED = Pat("bias_add", (REDUCED, "b"), name="bias")


def _fused(m: Match, out: Graph) -> dict:
    res = m.node("res")
    inputs = [m["y"], m["r"]] + ([m["b"]] if "b" in m else [])
    fused = Node("all_reduce_residual", inputs, list(res.outputs), {**m.node("reduce").attrs, "dtype": m.graph.values[m["y"]].dtype},
                 m.node("reduce").name, res.layer)
    replaced = {"res": fused, "reduce": None}
    return {**replaced, "bias": None} if "b" in m else replaced


def _rules() -> list[Rule]:
    rules = []
    for reduced in (BIASED, REDUCED):
        rules.append(Rule(Pat("residual", (reduced, "r"), name="res"), _fused))
        rules.append(Rule(Pat("residual", ("r", reduced), name="res"), _fused))
    return rules


def fuse_all_reduce_residual(graph: Graph) -> Graph:
    return rewrite(graph, _rules())
