"""The bandwidth floor ``llamagraph bench`` prints: the bytes one decode step must read."""

import os

from llamagraph.bench import decode_step_bytes
from llamagraph.compiler import compile_graph
from llamagraph.ir import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_step_bytes_counts_weights_once_and_the_kv_cache_read():
    cfg = load_config(os.path.join(ROOT, "examples", "llama-3-8b.json"))
    g = compile_graph(cfg, dtype="bfloat16", max_batch=4, max_seq=256)
    D, V, L, KV, HD = cfg.hidden_size, cfg.vocab_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    per_layer = D * (cfg.num_heads + 2 * KV) * HD + cfg.num_heads * HD * D + 3 * D * cfg.intermediate_size + 2 * D
    weights = 2 * (L * per_layer + D + V * D)  # layers, final norm, lm_head (untied): bf16
    embed_rows = 4 * 2 * D  # the embedding table is only gathered: one row per sequence
    kv = 4 * 100 * 2 * L * KV * HD * 2  # 4 sequences x 100 cached tokens x (K and V) x layers, bf16
    assert decode_step_bytes(g, cfg, 4, 100) == weights + embed_rows + kv
