"""Config -> the unfused Llama graph.

The unfused graph is faithful and executable on its own: every op is one step of the HF
``LlamaForCausalLM`` forward. Fusion passes later change how it is computed, never what.

Step inputs (all packed, no padding):
  tokens[T], positions[T], seq_ids[T]  one entry per token of every sequence in the step
  seq_lens[max_batch]                  each cache slot's sequence length after this step
  last_index[B]                        row of each sequence's last token in the step
  targets[T]                           the token after each token, where known, else -1 (read
                                       only by the on-demand prompt logprobs)
  sample.*[B]                          per-sequence sampling parameters and RNG key
``seq_ids`` names the KV-cache slot a token belongs to, so one op set serves prefill (many
tokens per sequence), decode (one) and chunked prefill alike.
"""

from __future__ import annotations

import math

from .config import ModelConfig
from .graph import INPUT, KV_CACHE, WEIGHT, CacheLayout, Graph

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

    def weight(name: str, shape: tuple, parts: list[str], part_shapes: list[tuple] | None = None, *,
               role: str = "matrix", layer: int | None = None) -> str:
        part_shapes = part_shapes or [shape]
        return g.add_value(name + ".w", shape, dtype, WEIGHT, layer=layer, role=role,
                           parts=[[p, list(s)] for p, s in zip(parts, part_shapes)])

    def act(name: str, shape: tuple, layer: int | None = None, dt: str = dtype, role: str | None = None) -> str:
        return g.add_value(name, shape, dt, layer=layer, role=role)

    def hf(key: str, i: int = 0, p: str = "weight") -> str:
        return HF_NAMES[key].format(i=i, p=p)

    # ---- step inputs ------------------------------------------------------------------------
    for name in ("tokens", "positions", "seq_ids", "targets"):
        g.add_value(name, ("T",), "int32", INPUT)
    # seq_lens is indexed by cache slot (like seq_ids), not by position in the step
    g.add_value("seq_lens", (max_batch,), "int32", INPUT)
    # sample.logprobs: 1 where the step wants the sampled token's logprob (else the sampler skips it)
    for name in ("last_index", "sample.top_k", "sample.step", "sample.logprobs"):
        g.add_value(name, ("B",), "int32", INPUT)
    g.add_value("sample.temperature", ("B",), "float32", INPUT)
    g.add_value("sample.top_p", ("B",), "float32", INPUT)
    g.add_value("sample.seed", ("B",), "int64", INPUT)

    embed = weight("embed", (V, D), [hf("embed")], role="embedding_table")
    x = act("x0", ("T", D))
    g.add_node("embedding", ["tokens", embed], [x])  # x: [T, D]

    heads = dict(num_heads=H, num_kv_heads=KV, head_dim=HD)
    rope_attrs = dict(heads, theta=cfg.rope_theta, scaling=cfg.rope_scaling, layout=cfg.rope_layout)

    def linear(op: str, inp: str, w: str, out: str, width: int, bias: str | None, layer: int) -> str:
        y = act(out, ("T", width), layer)
        g.add_node(op, [inp, w], [y], layer=layer)
        if bias is None:
            return y
        yb = act(out + "_b", ("T", width), layer)
        g.add_node("bias_add", [y, bias], [yb], layer=layer)
        return yb

    for i in range(cfg.num_layers):
        L = f"l{i}."

        def w(key: str, shape: tuple, parts: list[str], part_shapes=None, role: str = "matrix") -> str:
            return weight(L + key, shape, parts, part_shapes, role=role, layer=i)

        # ---- attention block ------------------------------------------------------------------
        w_norm = w("attn_norm", (D,), [hf("attn_norm", i)], role="norm")
        h = act(L + "attn_in", ("T", D), i)
        g.add_node("rmsnorm", [x, w_norm], [h], layer=i, eps=cfg.rms_norm_eps)
        w_qkv = w("qkv", (QKV, D), [hf("q", i), hf("k", i), hf("v", i)], [(H * HD, D), (KV * HD, D), (KV * HD, D)])
        b_qkv = None
        if cfg.attention_bias:
            b_qkv = w("qkv_bias", (QKV,), [hf("q", i, "bias"), hf("k", i, "bias"), hf("v", i, "bias")],
                      [(H * HD,), (KV * HD,), (KV * HD,)], role="bias")
        qkv = linear("qkv_gemm", h, w_qkv, L + "qkv", QKV, b_qkv, i)  # qkv: [T, (H+2KV)*HD]
        qkv_rot = act(L + "qkv_rot", ("T", H + 2 * KV, HD), i)  # [T, H+2KV, HD]
        g.add_node("rope", [qkv, "positions", "seq_ids", "seq_lens"], [qkv_rot], layer=i, **rope_attrs)
        cache = dict(layer=i, layout=CacheLayout("dense"))
        kc = g.add_value(f"kv.l{i}.k", (max_batch, max_seq, KV, HD), dtype, KV_CACHE, **cache)
        vc = g.add_value(f"kv.l{i}.v", (max_batch, max_seq, KV, HD), dtype, KV_CACHE, **cache)
        kc2 = g.add_value(f"kv.l{i}.k.appended", (max_batch, max_seq, KV, HD), dtype, KV_CACHE, **cache, alias=kc)
        vc2 = g.add_value(f"kv.l{i}.v.appended", (max_batch, max_seq, KV, HD), dtype, KV_CACHE, **cache, alias=vc)
        g.add_node("kv_append", [qkv_rot, "positions", "seq_ids", kc, vc], [kc2, vc2], name=L + "kv_append", layer=i,
                   **heads)
        attn = act(L + "attn", ("T", H * HD), i)  # attn: [T, H*HD]
        g.add_node("sdpa", [qkv_rot, kc2, vc2, "positions", "seq_ids"], [attn], layer=i, scale=1.0 / math.sqrt(HD),
                   **heads)
        w_o = w("o", (D, H * HD), [hf("o", i)])
        b_o = w("o_bias", (D,), [hf("o", i, "bias")], role="bias") if cfg.attention_bias else None
        o = linear("o_proj", attn, w_o, L + "o", D, b_o, i)
        x_mid = act(L + "x_mid", ("T", D), i)
        g.add_node("residual", [o, x], [x_mid], layer=i)

        # ---- MLP block ------------------------------------------------------------------------
        w_norm2 = w("ffn_norm", (D,), [hf("ffn_norm", i)], role="norm")
        h2 = act(L + "ffn_in", ("T", D), i)
        g.add_node("rmsnorm", [x_mid, w_norm2], [h2], layer=i, eps=cfg.rms_norm_eps)
        mb = cfg.mlp_bias

        def mlp_bias(key: str, width: int) -> str | None:
            return w(key + "_bias", (width,), [hf(key, i, "bias")], role="bias") if mb else None

        gate = linear("gate_proj", h2, w("gate", (I, D), [hf("gate", i)]), L + "gate", I, mlp_bias("gate", I), i)
        up = linear("up_proj", h2, w("up", (I, D), [hf("up", i)]), L + "up", I, mlp_bias("up", I), i)
        act_ = act(L + "gate_act", ("T", I), i)
        g.add_node("silu", [gate], [act_], layer=i)
        prod = act(L + "swiglu", ("T", I), i)
        g.add_node("mul", [act_, up], [prod], layer=i)
        down = linear("down_proj", prod, w("down", (D, I), [hf("down", i)]), L + "down", D, mlp_bias("down", D), i)
        x = act(L + "x_out", ("T", D), i)
        g.add_node("residual", [down, x_mid], [x], layer=i)

    # The final norm is row-wise, so it runs on each sequence's last row only (HF norms every row
    # and then keeps the last: the same numbers for those rows).
    w_final = weight("final_norm", (D,), [hf("norm")], role="norm")
    last = act("last_hidden", ("B", D))  # last: [B, D]
    g.add_node("gather_last", [x, "last_index"], [last])
    xn = act("final_norm_out", ("B", D))
    g.add_node("rmsnorm", [last, w_final], [xn], eps=cfg.rms_norm_eps)
    w_lm = embed if cfg.tie_word_embeddings else weight("lm_head", (V, D), [hf("lm_head")])
    logits = act("logits", ("B", V), dt="float32", role="logits")  # logits: [B, V] fp32
    g.add_node("lm_head", [xn, w_lm], [logits], out_dtype="float32")
    nxt = act("next_token", ("B",), dt="int32", role="next_token")
    nxt_lp = act("next_logprob", ("B",), dt="float32", role="next_logprob")
    g.add_node(
        "topk_sample",
        [logits, "sample.temperature", "sample.top_k", "sample.top_p", "sample.seed", "sample.step",
         "sample.logprobs"],
        [nxt, nxt_lp],
    )
    # echo: every row's logprob of the token after it (on demand: only steps that fetch it pay)
    token_lp = act("token_logprobs", ("T",), dt="float32", role="token_logprobs")
    g.add_node("token_logprobs", [x, w_final, w_lm, "targets"], [token_lp], eps=cfg.rms_norm_eps, dtype=dtype)
    g.outputs = [logits, nxt, nxt_lp, token_lp]
    return g
