"""Fuse RoPE and the KV-cache append: rotated K and V go straight into the cache.

    # sdpa(rope(qkv), kv_append(rope(qkv), kc, vc)) -> sdpa(q_rot, rope_kv_append(qkv, kc, vc))

The rotated qkv must be read by the append and the attention alone. Only the rotated queries
are written to the arena ([T, H, D] instead of [T, H+2KV, D]).
"""

from __future__ import annotations

from dataclasses import replace

from llamagraph.ir import Graph, Node

from .rewrite import Match, Pat, Rule, rewrite

ROPE = Pat("rope", ("qkv", "pos", "sid", "lens"), name="rope")
APPEND_K = Pat("kv_append", (ROPE, "pos", "sid", "kc", "vc"), name="append", out=0, exclusive=False)
PATTERN = Pat("sdpa", (ROPE, APPEND_K, replace(APPEND_K, out=1), "pos", "sid"), name="sdpa")


def _fused(m: Match, out: Graph) -> dict:
    rope, append, sdpa = m.node("rope"), m.node("append"), m.node("sdpa")
    T, _, D = m.graph.values[rope.outputs[0]].shape
    H = rope.attrs["num_heads"]
    q_rot = out.fresh_name(f"l{rope.layer}.q_rot" if rope.layer is not None else f"{rope.outputs[0]}.q")
    out.add_value(q_rot, (T, H, D), m.graph.values[rope.outputs[0]].dtype, layer=rope.layer)
    fused = Node("rope_kv_append", [m["qkv"], m["pos"], m["sid"], m["lens"], m["kc"], m["vc"]],
                 [q_rot] + append.outputs, dict(rope.attrs), rope.name, rope.layer)
    return {"rope": fused, "append": None,
            "sdpa": Node("sdpa", [q_rot] + sdpa.inputs[1:], sdpa.outputs, dict(sdpa.attrs), sdpa.name, sdpa.layer)}


def fuse_rope_kv_append(graph: Graph) -> Graph:
    return rewrite(graph, [Rule(PATTERN, _fused)])
