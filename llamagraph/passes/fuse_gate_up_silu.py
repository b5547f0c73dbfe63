"""Fuse the gate and up projections and SiLU*mul into one GEMM with a SwiGLU epilogue.

    # silu_mul(gate_proj(x, Wg[, bg]), up_proj(x, Wu[, bu])) -> gate_up_silu(x, [Wg; Wu][, [bg; bu]])

Both projections must read the same x. The concatenated weight is a new value whose parts list
the gate rows then the up rows, so the loader assembles it at load time; the separate weights
become dead. The fused node sits where the earlier projection was.
"""

from __future__ import annotations

from llamagraph.ir import WEIGHT, Graph, Node
from llamagraph.ir.graph import stacked_shard

from .rewrite import Match, Pat, Rule, rewrite


def _concat_weight(graph: Graph, a: str, b: str, what: str) -> str:
    va, vb = graph.values[a], graph.values[b]
    name = f"l{va.layer}.{what}.w" if va.layer is not None else f"{what}.w"
    if name not in graph.values:
        shape = (va.shape[0] + vb.shape[0],) + tuple(va.shape[1:])
        graph.add_value(name, shape, va.dtype, WEIGHT, layer=va.layer, role=va.role,
                        parts=va.attrs["parts"] + vb.attrs["parts"], shard=stacked_shard(va.shard, vb.shard))
    return name


def _fused(m: Match, out: Graph) -> dict:
    inputs = [m["x"], _concat_weight(out, m["wg"], m["wu"], "gate_up")]
    if "bg" in m:
        inputs.append(_concat_weight(out, m["bg"], m["bu"], "gate_up_bias"))
    act = m.node("act")
    first, second = sorted(("gate", "up"), key=lambda c: m.nodes[c])
    fused = Node("gate_up_silu", inputs, act.outputs, {}, act.name, act.layer)
    return {first: fused, second: None, "act": None}


def _pattern(bias: bool) -> Pat:
    gate = Pat("gate_proj", ("x", "wg", "bg") if bias else ("x", "wg"), name="gate")
    up = Pat("up_proj", ("x", "wu", "bu") if bias else ("x", "wu"), name="up")
    return Pat("silu_mul", (gate, up), name="act")


def fuse_gate_up_silu(graph: Graph) -> Graph:
    return rewrite(graph, [Rule(_pattern(True), _fused), Rule(_pattern(False), _fused)])
