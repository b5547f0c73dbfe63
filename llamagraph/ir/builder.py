"""Config -> the unfused Llama graph.

The unfused graph is faithful and executable on its own: every op is one step of the HF
``LlamaForCausalLM`` forward. Fusion passes later change how it is computed, never what.

Step inputs (all packed, no padding):
  tokens[T], positions[T], seq_ids[T]  one entry per token of every sequence in the step
  seq_lens[max_batch]                  each cache slot's sequence length after this step
  last_index[B]                        row of each sequence's last token in the step
  sample.*[B]                          per-sequence sampling parameters and RNG key
``seq_ids`` names the KV-cache slot a token belongs to, so one op set serves prefill (many
tokens per sequence), decode (one) and chunked prefill alike.
"""

from __future__ import annotations

import math

from .config import ModelConfig
from .graph import INPUT, KV_CACHE, WEIGHT, Graph

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.{p}",
    "k": "model.layers.{i}.self_attn.k_proj.{p}",
    "v": "model.layers.{i}.self_attn.v_proj.{p}",
    "o": "model.layers.{i}.self_attn.o_proj.{p}",
    "gate": "model.layers.{i}.mlp.gate_proj.{p}",
    "up": "model.layers.{i}.mlp.up_proj.{p}",
    "down": "model.layers.{i}.mlp.down_proj.{p}",
}


def build_graph(cfg: ModelConfig, *, dtype: str, max_batch: int, max_seq: int, max_tokens: int) -> Graph:
    D, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, KV, HD = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    QKV = (H + 2 * KV) * HD
    g = Graph(dims={"T": max_tokens, "B": max_batch})
    g.meta = {
        "name": "llama",
        "dtype": dtype,
        "max_batch": max_batch,
        "max_seq": max_seq,
        "max_tokens": max_tokens,
        "config": cfg.to_dict(),
    }

    def weight(name: str, shape: tuple, parts: list[str], part_shapes: list[tuple] | None = None) -> str:
        part_shapes = part_shapes or [shape]
        return g.add_value(name + ".w", shape, dtype, WEIGHT, parts=[[p, list(s)] for p, s in zip(parts, part_shapes)])

    def hf(key: str, i: int = 0, p: str = "weight") -> str:
        return HF_NAMES[key].format(i=i, p=p)

    # ---- step inputs ------------------------------------------------------------------------
    for name in ("tokens", "positions", "seq_ids"):
        g.add_value(name, ("T",), "int32", INPUT)
    # seq_lens is indexed by cache slot (like seq_ids), not by position in the step
    g.add_value("seq_lens", (max_batch,), "int32", INPUT)
    for name in ("last_index", "sample.top_k", "sample.step"):
        g.add_value(name, ("B",), "int32", INPUT)
    g.add_value("sample.temperature", ("B",), "float32", INPUT)
    g.add_value("sample.top_p", ("B",), "float32", INPUT)
    g.add_value("sample.seed", ("B",), "int64", INPUT)

    embed = weight("embed", (V, D), [hf("embed")])
    x = g.add_value("x0", ("T", D), dtype)
    g.add_node("embedding", ["tokens", embed], [x])  # x: [T, D]

    heads = dict(num_heads=H, num_kv_heads=KV, head_dim=HD)
    rope_attrs = dict(heads, theta=cfg.rope_theta, scaling=cfg.rope_scaling, layout=cfg.rope_layout)

    def linear(op: str, inp: str, w: str, out: str, rows_dim, width: int, bias: str | None) -> str:
        y = g.add_value(out, (rows_dim, width), dtype)
        g.add_node(op, [inp, w], [y])
        if bias is None:
            return y
        yb = g.add_value(out + "_b", (rows_dim, width), dtype)
        g.add_node("bias_add", [y, bias], [yb])
        return yb

    for i in range(cfg.num_layers):
        L = f"l{i}."
        # ---- attention block ------------------------------------------------------------------
        w_norm = weight(L + "attn_norm", (D,), [hf("attn_norm", i)])
        h = g.add_value(L + "attn_in", ("T", D), dtype)
        g.add_node("rmsnorm", [x, w_norm], [h], eps=cfg.rms_norm_eps)
        w_qkv = weight(
            L + "qkv", (QKV, D), [hf("q", i), hf("k", i), hf("v", i)], [(H * HD, D), (KV * HD, D), (KV * HD, D)]
        )
        b_qkv = None
        if cfg.attention_bias:
            b_qkv = weight(
                L + "qkv_bias", (QKV,), [hf("q", i, "bias"), hf("k", i, "bias"), hf("v", i, "bias")],
                [(H * HD,), (KV * HD,), (KV * HD,)],
            )
        qkv = linear("qkv_gemm", h, w_qkv, L + "qkv", "T", QKV, b_qkv)  # qkv: [T, (H+2KV)*HD]
        qkv_rot = g.add_value(L + "qkv_rot", ("T", H + 2 * KV, HD), dtype)  # [T, H+2KV, HD]
        g.add_node("rope", [qkv, "positions", "seq_ids", "seq_lens"], [qkv_rot], **rope_attrs)
        kc = g.add_value(f"kv.l{i}.k", (max_batch, max_seq, KV, HD), dtype, KV_CACHE)
        vc = g.add_value(f"kv.l{i}.v", (max_batch, max_seq, KV, HD), dtype, KV_CACHE)
        kc2 = g.add_value(f"kv.l{i}.k.appended", (max_batch, max_seq, KV, HD), dtype, KV_CACHE, alias=kc)
        vc2 = g.add_value(f"kv.l{i}.v.appended", (max_batch, max_seq, KV, HD), dtype, KV_CACHE, alias=vc)
        g.add_node("kv_append", [qkv_rot, "positions", "seq_ids", kc, vc], [kc2, vc2], name=L + "kv_append", **heads)
        attn = g.add_value(L + "attn", ("T", H * HD), dtype)  # attn: [T, H*HD]
        g.add_node("sdpa", [qkv_rot, kc2, vc2, "positions", "seq_ids"], [attn], scale=1.0 / math.sqrt(HD), **heads)
        w_o = weight(L + "o", (D, H * HD), [hf("o", i)])
        b_o = weight(L + "o_bias", (D,), [hf("o", i, "bias")]) if cfg.attention_bias else None
        o = linear("o_proj", attn, w_o, L + "o", "T", D, b_o)
        x_mid = g.add_value(L + "x_mid", ("T", D), dtype)
        g.add_node("residual", [o, x], [x_mid])

        # ---- MLP block ------------------------------------------------------------------------
        w_norm2 = weight(L + "ffn_norm", (D,), [hf("ffn_norm", i)])
        h2 = g.add_value(L + "ffn_in", ("T", D), dtype)
        g.add_node("rmsnorm", [x_mid, w_norm2], [h2], eps=cfg.rms_norm_eps)
        mb = cfg.mlp_bias
        gate = linear("gate_proj", h2, weight(L + "gate", (I, D), [hf("gate", i)]), L + "gate", "T", I,
                      weight(L + "gate_bias", (I,), [hf("gate", i, "bias")]) if mb else None)
        up = linear("up_proj", h2, weight(L + "up", (I, D), [hf("up", i)]), L + "up", "T", I,
                    weight(L + "up_bias", (I,), [hf("up", i, "bias")]) if mb else None)
        act = g.add_value(L + "gate_act", ("T", I), dtype)
        g.add_node("silu", [gate], [act])
        prod = g.add_value(L + "swiglu", ("T", I), dtype)
        g.add_node("mul", [act, up], [prod])
        down = linear("down_proj", prod, weight(L + "down", (D, I), [hf("down", i)]), L + "down", "T", D,
                      weight(L + "down_bias", (D,), [hf("down", i, "bias")]) if mb else None)
        x = g.add_value(L + "x_out", ("T", D), dtype)
        g.add_node("residual", [down, x_mid], [x])

    w_final = weight("final_norm", (D,), [hf("norm")])
    xn = g.add_value("final_norm_out", ("T", D), dtype)
    g.add_node("rmsnorm", [x, w_final], [xn], eps=cfg.rms_norm_eps)
    last = g.add_value("last_hidden", ("B", D), dtype)  # last: [B, D]
    g.add_node("gather_last", [xn, "last_index"], [last])
    w_lm = embed if cfg.tie_word_embeddings else weight("lm_head", (V, D), [hf("lm_head")])
    logits = g.add_value("logits", ("B", V), "float32")  # logits: [B, V] fp32
    g.add_node("lm_head", [last, w_lm], [logits], out_dtype="float32")
    nxt = g.add_value("next_token", ("B",), "int32")
    g.add_node(
        "topk_sample",
        [logits, "sample.temperature", "sample.top_k", "sample.top_p", "sample.seed", "sample.step"],
        [nxt],
    )
    g.outputs = [logits, nxt]
    return g
