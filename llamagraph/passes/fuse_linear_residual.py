"""Fold the residual add into the projection that feeds it (o_proj, down_proj): the GEMV's
epilogue adds the residual stream and writes the new one in place.

    # residual(gemm(x, W[, b]), r)          -> linear_residual(x, W, r[, b])
    # residual(bias_add(gemm(x, W), b), r)  -> linear_residual(x, W, r, b)

The projection's output must be read by the residual add alone. The fused node sits where the
residual add was and keeps its output name, so later readers of the stream are unchanged;
``dtype`` records the storage dtype the projection is rounded to before the add, as the unfused
graph stores it.
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node, OPS

from .rewrite import Match, Pat, Rule, rewrite

PROJECTIONS = tuple(op for op, d in OPS.items() if d.gemm and op != "lm_head")  # lm_head writes fp32 logits


def _gemm(bias: bool) -> Pat:
    return Pat(PROJECTIONS, ("x", "w", "b") if bias else ("x", "w"), name="gemm")


def _biased() -> Pat:
    return Pat("bias_add", (_gemm(False), "b"), name="bias")


def _fused(m: Match, out: Graph) -> dict:
    res, gemm = m.node("res"), m.node("gemm")
    y = m.graph.values[gemm.outputs[0]]
    if y.dtype != m.graph.values[m["r"]].dtype:
        return {}  # a projection in another dtype than the stream: leave it
    inputs = [m["x"], m["w"], m["r"]] + ([m["b"]] if "b" in m else [])
    fused = Node("linear_residual", inputs, list(res.outputs), {"dtype": y.dtype}, gemm.name, res.layer)
    return {"res": fused, "gemm": None, "bias": None} if "bias" in m.nodes else {"res": fused, "gemm": None}


def _rules() -> list[Rule]:
    rules = []
    for proj in (_biased(), _gemm(True), _gemm(False)):
        rules.append(Rule(Pat("residual", (proj, "r"), name="res"), _fused))
        rules.append(Rule(Pat("residual", ("r", proj), name="res"), _fused))
    return rules


def fuse_linear_residual(graph: Graph) -> Graph:
    return rewrite(graph, _rules())
