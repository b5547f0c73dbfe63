"""The numpy reference backend against HF transformers on random tiny checkpoints."""

import numpy as np
import pytest

import llamagraph
import models
from numerics import PROMPTS, check_against_hf, rel_err

MATRIX = ["mha", "gqa", "mqa", "bias", "tied", "rope_linear", "rope_dynamic", "rope_llama3", "head_dim"]


@pytest.mark.parametrize("name", MATRIX)
def test_fp32_logits_match_hf(hf_model, name):
    check_against_hf(hf_model(name), backend="reference", dtype="float32", tol=1e-4)


def test_chunked_prefill_matches_hf(hf_model):
    # max_tokens 8 splits the 19- and 6-token prompts over several steps
    check_against_hf(hf_model("gqa"), backend="reference", dtype="float32", tol=1e-4, max_tokens=8)


@pytest.mark.parametrize("name", ["meta_compatible", "meta_llama3"])
def test_meta_checkpoint_gives_hf_logits(meta_model, name):
    meta_dir, hf_dir = meta_model(name)
    check_against_hf(meta_dir, backend="reference", dtype="float32", tol=1e-4, hf_dir=hf_dir)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_meta_checkpoint_in_16_bit_close_to_hf(meta_model, dtype):
    """16-bit plans fuse RoPE into the QKV GEMV, whose weight rows the loader puts in rope pair
    order: for a Meta checkpoint the pairs are interleaved (2i, 2i+1)."""
    meta_dir, hf_dir = meta_model("meta_llama3")
    plan = llamagraph.compile(meta_dir, dtype=dtype, max_batch=2, max_seq=32)
    assert plan.graph.op_counts().get("rms_qkv_rope_kv_append")
    assert any(v.attrs.get("row_order", [None] * 4)[3] == "interleaved" for v in plan.graph.values.values())
    ref = models.hf_reference_logits(hf_dir, PROMPTS, [[], []])
    got = plan.run(PROMPTS)
    for b in range(2):
        assert rel_err(got[b], ref[b][0]) < (3e-2 if dtype == "float16" else 6e-2)


def test_sharded_checkpoint(hf_model):
    check_against_hf(hf_model("gqa", max_shard_size="40KB"), backend="reference", dtype="float32", tol=1e-4)


def test_fp16_storage_close_to_hf_fp32(hf_model):
    # fp16 storage rounds every activation; HF runs in fp32 here (its CPU fp16 path differs)
    d = hf_model("gqa")
    plan = llamagraph.compile(d, dtype="float16", max_batch=2, max_seq=32)
    ref = models.hf_reference_logits(d, PROMPTS, [[], []])
    got = plan.run(PROMPTS)
    for b in range(2):
        assert rel_err(got[b], ref[b][0]) < 3e-2


def test_bf16_checkpoint_loads_and_runs(hf_model):
    d = hf_model("gqa", dtype="bfloat16")
    plan = llamagraph.compile(d, dtype="bfloat16", max_batch=2, max_seq=32)
    ref = models.hf_reference_logits(d, PROMPTS, [[], []])  # HF upcasts the bf16 weights to fp32
    got = plan.run(PROMPTS)
    for b in range(2):
        assert rel_err(got[b], ref[b][0]) < 3e-2


def test_greedy_generation_matches_hf(hf_model):
    d = hf_model("gqa")
    plan = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=48)
    outs = plan.generate(PROMPTS, max_new_tokens=16)
    for prompt, out in zip(PROMPTS, outs):
        assert out == models.hf_greedy(d, prompt, 16)


def test_generate_stops_and_samples_reproducibly(hf_model):
    d = hf_model("gqa")
    plan = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=48)
    greedy = plan.generate(PROMPTS, max_new_tokens=10)
    stop = greedy[0][3]
    stopped = plan.generate(PROMPTS, max_new_tokens=10, stop_tokens=[stop])
    assert stopped[0] == greedy[0][: greedy[0].index(stop)]
    a = plan.generate(PROMPTS, 12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = plan.generate(PROMPTS, 12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    c = plan.generate(PROMPTS, 12, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert a == b and a != c
    assert plan.generate(PROMPTS, 12, temperature=1.0, top_k=1, seed=3) == plan.generate(PROMPTS, 12)


def test_random_weights_run_without_checkpoint():
    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
           "vocab_size": 50}
    plan = llamagraph.compile(cfg, "random", dtype="float32", max_seq=8)
    logits = plan.run([[1, 2, 3]])
    assert logits.shape == (1, 50) and np.isfinite(logits).all() and np.abs(logits).max() > 0
