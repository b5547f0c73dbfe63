"""Fuse RoPE and the KV-cache append: rotated K and V go straight into the cache.

    # kv_append(rope(qkv), kc, vc) ; sdpa(rope(qkv), ...) -> rope_kv_append(qkv, kc, vc) -> q_rot ; sdpa(q_rot, ...)

Only the rotated queries are written to the arena ([T, H, D] instead of [T, H+2KV, D]).
"""

from __future__ import annotations

from llamagraph.ir import Graph, Node

from .rewrite import Matcher, apply


def fuse_rope_kv_append(graph: Graph) -> Graph:
    m = Matcher(graph)
    out = graph.copy()
    replaced: dict[int, Node | None] = {}
    for ri, rope in enumerate(graph.nodes):
        if rope.op != "rope":
            continue
        rot = rope.outputs[0]
        readers = m.users.get(rot, [])
        ops = sorted(graph.nodes[j].op for j in readers)
        if ops != ["kv_append", "sdpa"] or rot in m.outputs:
            continue
        ai = next(j for j in readers if graph.nodes[j].op == "kv_append")
        si = next(j for j in readers if graph.nodes[j].op == "sdpa")
        append, sdpa = graph.nodes[ai], graph.nodes[si]
        qkv, positions, seq_ids, seq_lens = rope.inputs
        kc, vc = append.inputs[3], append.inputs[4]
        T, _, D = graph.values[rot].shape
        H = rope.attrs["num_heads"]
        q_rot = out.add_value(rot.replace("qkv_rot", "q_rot"), (T, H, D), graph.values[rot].dtype)
        fused = Node("rope_kv_append", [qkv, positions, seq_ids, seq_lens, kc, vc], [q_rot] + append.outputs,
                     dict(rope.attrs), rope.name)
        replaced[ri] = fused
        replaced[ai] = None
        replaced[si] = Node("sdpa", [q_rot] + sdpa.inputs[1:], sdpa.outputs, dict(sdpa.attrs), sdpa.name)
    return apply(out, replaced)
