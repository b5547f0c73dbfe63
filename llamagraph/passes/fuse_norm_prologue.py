"""Fold each RMSNorm into the prologue of the GEMV that reads it, and the QKV projection's RoPE +
KV append into that GEMV's epilogue: the normed rows never reach memory.

    # gate_up_silu(rmsnorm(x, n), W[, b])  -> rms_gate_up_silu(x, n, W[, b])
    # lm_head(rmsnorm(x, n), W)            -> rms_lm_head(x, n, W)
    # rope_kv_append(qkv_gemm(rmsnorm(x, n), W[, b]), pos, sid, lens, kc, vc)
    #                                      -> rms_qkv_rope_kv_append(x, n, W', pos, sid, lens, kc, vc[, b'])

The normed value (and the qkv projection) must have no other reader. W' and b' are new weight
values: the same checkpoint parts with ``row_order = ["rope_pairs", heads, head_dim, layout]``
(see ``llamagraph.ir.layout``), so every 16 rows of the GEMV's tensor-core tile hold both halves of
8 rotary pairs. That tile exists for 16-bit weights only (fp32 GEMVs run on CUDA cores, one output
column per warp), and needs head_dim % 16 == 0: elsewhere the QKV path stays as it is.
``dtype`` records where the unfused graph stores the normed rows and the qkv projection, so the
references round there as the kernels do.
"""

from __future__ import annotations

from llamagraph.ir import WEIGHT, Graph, Node

from .rewrite import Match, Pat, Rule, rewrite

NORM = Pat("rmsnorm", ("x", "n"), name="norm")
PAIRED_DTYPES = ("float16", "bfloat16")


def _attrs(m: Match) -> dict:
    return {"eps": m.node("norm").attrs["eps"], "dtype": m.graph.values[m.node("norm").outputs[0]].dtype}


def _gate_up(m: Match, out: Graph) -> dict:
    mlp = m.node("mlp")
    inputs = [m["x"], m["n"], m["w"]] + ([m["b"]] if "b" in m else [])
    return {"mlp": Node("rms_gate_up_silu", inputs, mlp.outputs, _attrs(m), mlp.name, mlp.layer), "norm": None}


def _lm_head(m: Match, out: Graph) -> dict:
    head = m.node("head")
    attrs = {**_attrs(m), **head.attrs}
    return {"head": Node("rms_lm_head", [m["x"], m["n"], m["w"]], head.outputs, attrs, head.name, head.layer),
            "norm": None}


def _paired(graph: Graph, name: str, heads: int, head_dim: int, layout: str) -> str:
    """The weight value ``name`` with its rows in rope pair order (a new value, same parts)."""
    v = graph.values[name]
    paired = name[:-2] + ".rope_pairs.w" if name.endswith(".w") else name + ".rope_pairs"
    if paired not in graph.values:
        graph.add_value(paired, v.shape, v.dtype, WEIGHT, layer=v.layer, role=v.role, shard=v.shard,
                        parts=v.attrs["parts"], row_order=["rope_pairs", heads, head_dim, layout])
    return paired


def _qkv_rope(m: Match, out: Graph) -> dict:
    rope = m.node("rope")
    a = rope.attrs
    H, KV, D, layout = a["num_heads"], a["num_kv_heads"], a["head_dim"], a.get("layout", "rotate_half")
    dtype = m.graph.values[m["w"]].dtype
    if dtype not in PAIRED_DTYPES or D % 16 or m.graph.values[m["w"]].quant is not None:
        return {}
    inputs = [m["x"], m["n"], _paired(out, m["w"], H + 2 * KV, D, layout), m["pos"], m["sid"], m["lens"],
              m["kc"], m["vc"]]
    if "b" in m:
        inputs.append(_paired(out, m["b"], H + 2 * KV, D, layout))
    fused = Node("rms_qkv_rope_kv_append", inputs, rope.outputs, {**a, **_attrs(m)}, rope.name, rope.layer)
    return {"rope": fused, "qkv": None, "norm": None}


def _qkv_pattern(bias: bool) -> Pat:
    qkv = Pat("qkv_gemm", (NORM, "w", "b") if bias else (NORM, "w"), name="qkv")
    return Pat("rope_kv_append", (qkv, "pos", "sid", "lens", "kc", "vc"), name="rope")


RULES = [
    Rule(Pat("gate_up_silu", (NORM, "w", "b"), name="mlp"), _gate_up),
    Rule(Pat("gate_up_silu", (NORM, "w"), name="mlp"), _gate_up),
    Rule(Pat("lm_head", (NORM, "w"), name="head"), _lm_head),
    Rule(_qkv_pattern(True), _qkv_rope),
    Rule(_qkv_pattern(False), _qkv_rope),
]


def fuse_norm_prologue(graph: Graph) -> Graph:
    return rewrite(graph, RULES)
