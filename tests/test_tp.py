"""Tensor parallelism on the CPU (issue #9): the shard_tensor_parallel pass's rank graph, the
slices every loader cuts (``Shard.take`` / ``layout.assemble``), the simulated ranks of the
reference backend against HF transformers and against the one-rank plan, the errors, and the
lowering of the collectives (launch lists, graph safety, generated source, saved plans).

Expected shapes and slices are worked out here from the config (heads per rank, KV heads held,
vocabulary chunks), not by calling the pass's own helpers.
"""

import math

import numpy as np
import pytest

import llamagraph
import models
from llamagraph.codegen import nvrtc
from llamagraph.codegen.compiled import CompiledPlan, check_capturable
from llamagraph.codegen.launch import NO_PEER_ACCESS
from llamagraph.compiler import build_unfused, compile_plan, graph_after
from llamagraph.ir import KV_CACHE, WEIGHT, ConfigError, InputError, Shard, WeightError, load_config
from llamagraph.ir.layout import assemble
from llamagraph.passes.shard_tensor_parallel import shard_tensor_parallel
from llamagraph.runtime.weights import random_weights
from numerics import DECODE, PROMPTS, check_against_hf, rel_err

# A tiny HF config: head_dim 16, FFN 192 (divisible by 2, 3 and 4), two layers.
BASE = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-5)
SIZES = dict(dtype="float32", max_batch=2, max_seq=32)


def config(**over) -> dict:
    return {**BASE, **over}


def rank_graph(tp: int, **over):
    """The graph right after the shard pass (the unfused rank graph)."""
    return graph_after(config(**over), "shard_tensor_parallel", tp=tp, **SIZES)


def kv_held(kv: int, tp: int) -> int:
    """KV heads a rank holds: its share, or one whole head when there are fewer heads than ranks."""
    return kv // tp if kv >= tp else 1


def users(graph, value: str) -> list:
    return [n for n in graph.nodes if value in n.inputs]


def producer(graph, value: str):
    return next(n for n in graph.nodes if value in n.outputs)


# ---------------------------------------------------------------------------------------------
# the pass: weight shapes and shard descriptions per rank
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv, tp", [(4, 2), (2, 2), (4, 4), (1, 2), (2, 4)],
                         ids=["mha-tp2", "gqa-tp2", "mha-tp4", "mqa-tp2-replicated", "gqa-tp4-replicated"])
def test_weights_caches_and_head_attrs_per_rank(kv, tp):
    g = rank_graph(tp, num_key_value_heads=kv)
    H, HD, D, I, L = 4, 16, 64, 192, 2
    hl, kvl = H // tp, kv_held(kv, tp)
    assert g.meta["tp"] == tp and g.meta["tp_heads"] == [hl, kvl]
    for layer in range(L):
        qkv, o = g.values[f"l{layer}.qkv.w"], g.values[f"l{layer}.o.w"]
        assert qkv.shape == ((hl + 2 * kvl) * HD, D) and qkv.shard == Shard(0, tp, blocks=(H, kv, kv))
        assert [tuple(s) for _, s in qkv.attrs["parts"]] == [(H * HD, D), (kv * HD, D), (kv * HD, D)]  # whole parts
        assert o.shape == (D, hl * HD) and o.shard == Shard(1, tp, blocks=(H,))
        for name in ("gate", "up"):
            w = g.values[f"l{layer}.{name}.w"]
            assert w.shape == (I // tp, D) and w.shard == Shard(0, tp, blocks=(I,))
        down = g.values[f"l{layer}.down.w"]
        assert down.shape == (D, I // tp) and down.shard == Shard(1, tp, blocks=(I,))
        for norm in ("attn_norm", "ffn_norm"):
            assert g.values[f"l{layer}.{norm}.w"].shape == (D,) and g.values[f"l{layer}.{norm}.w"].shard is None
        for cache in ("k", "v"):
            assert g.values[f"kv.l{layer}.{cache}"].shape == (2, 32, kvl, HD)
    assert g.values["embed.w"].shape == (96, D) and g.values["embed.w"].shard is None  # whole on every rank
    heads = [n for n in g.nodes if n.op in ("rope", "kv_append", "sdpa")]
    assert len(heads) == 3 * L
    for n in heads:
        assert (n.attrs["num_heads"], n.attrs["num_kv_heads"]) == (hl, kvl), n
    sdpa = next(n for n in g.nodes if n.op == "sdpa")
    assert g.values[sdpa.outputs[0]].shape[-1] == hl * HD  # attention output: this rank's heads only


def test_biases_split_like_their_gemm_and_row_parallel_biases_stay_whole():
    g = rank_graph(2, attention_bias=True, mlp_bias=True)
    for layer in range(2):
        qkv_b = g.values[f"l{layer}.qkv_bias.w"]
        assert qkv_b.shape == ((2 + 2 * 1) * 16,) and qkv_b.shard == Shard(0, 2, blocks=(4, 2, 2))
        for name in ("gate_bias", "up_bias"):
            assert g.values[f"l{layer}.{name}.w"].shape == (96,)
            assert g.values[f"l{layer}.{name}.w"].shard == Shard(0, 2, blocks=(192,))
        for name in ("o_bias", "down_bias"):  # added once, after the all-reduce
            assert g.values[f"l{layer}.{name}.w"].shape == (64,) and g.values[f"l{layer}.{name}.w"].shard is None


@pytest.mark.parametrize("bias", [False, True])
def test_all_reduce_follows_o_and_down_and_comes_before_their_bias_and_residual(bias):
    g = rank_graph(2, attention_bias=bias, mlp_bias=bias)
    order = {id(n): i for i, n in enumerate(g.nodes)}
    projections = [n for n in g.nodes if n.op in ("o_proj", "down_proj")]
    assert len(projections) == 4 and sum(n.op == "all_reduce" for n in g.nodes) == 4
    for proj in projections:
        (reduce,) = users(g, proj.outputs[0])  # the partial sums are read by the all-reduce alone
        assert reduce.op == "all_reduce" and order[id(reduce)] == order[id(proj)] + 1
        assert g.values[reduce.outputs[0]].shape == g.values[proj.outputs[0]].shape  # [T, D]: whole rows
        (after,) = users(g, reduce.outputs[0])
        if bias:  # the whole bias, added once to the summed rows
            bias_name = {"o_proj": "o_bias", "down_proj": "down_bias"}[proj.op]
            assert after.op == "bias_add" and after.inputs[1] == f"l{proj.layer}.{bias_name}.w"
            (after,) = users(g, after.outputs[0])
        assert after.op == "residual"


def test_the_full_pipeline_folds_the_residual_into_each_all_reduce_and_the_norms_into_the_gemvs():
    """Fusions after the pass: each all-reduce takes the residual add after it (all_reduce_residual,
    reading an o_proj / down_proj's partial sums and the stream), so no residual add or add_rmsnorm
    is left and every norm sits in the prologue of the GEMV that reads it, as at tp 1."""
    plan = compile_plan(config(), tp=2, dtype="float16", max_batch=2, max_seq=32)
    g = plan.graph
    reduces = [n for n in g.nodes if n.op == "all_reduce_residual"]
    assert len(reduces) == 4 and "all_reduce" not in g.op_counts()
    assert sorted(producer(g, n.inputs[0]).op for n in reduces) == ["down_proj"] * 2 + ["o_proj"] * 2
    for n in reduces:
        assert n.attrs == {"ranks": 2, "dtype": "float16"}
        assert g.values[n.inputs[1]].shape == g.values[n.inputs[0]].shape  # the stream it adds
    counts = g.op_counts()
    assert not {"residual", "add_rmsnorm", "rmsnorm", "bias_add"} & set(counts), counts
    assert counts["rms_qkv_rope_kv_append"] == counts["rms_gate_up_silu"] == 2 and counts["rms_lm_head"] == 1
    assert counts["all_gather_vocab"] == 1


def test_a_tp_layer_launches_the_one_gpu_layers_kernels_plus_its_two_all_reduces():
    cfg = config(num_hidden_layers=4)
    one = compile_plan(cfg, dtype="float16", max_batch=2, max_seq=32)
    two = compile_plan(cfg, tp=2, dtype="float16", max_batch=2, max_seq=32)
    # 2 per layer, and the vocab_concat after the gather of the LM head's chunks
    assert two.kernel_launches("decode") == one.kernel_launches("decode") + 2 * 4 + 1


@pytest.mark.parametrize("vocab, tp", [(97, 2), (97, 4), (96, 4)])
def test_lm_head_is_vocabulary_parallel_with_a_padded_last_chunk(vocab, tp):
    g = rank_graph(tp, vocab_size=vocab)
    chunk = math.ceil(vocab / tp)
    (head,) = [n for n in g.nodes if n.op == "lm_head"]
    w = g.values[head.inputs[1]]
    assert w.shape == (chunk, 64) and w.shard == Shard(0, tp, chunk=chunk)
    assert [tuple(s) for _, s in w.attrs["parts"]] == [(vocab, 64)]
    assert g.values[head.outputs[0]].shape[1] == chunk
    (gather,) = users(g, head.outputs[0])
    assert gather.op == "all_gather_vocab" and gather.attrs == {"vocab": vocab, "ranks": tp}
    logits = g.values[gather.outputs[0]]
    assert logits.shape[1] == vocab and logits.name in g.outputs
    assert [n.op for n in users(g, logits.name)] == ["topk_sample"]


def test_tied_lm_head_gets_its_own_sharded_value():
    g = rank_graph(2, tie_word_embeddings=True, vocab_size=97)
    embed = g.values["embed.w"]
    (head,) = [n for n in g.nodes if n.op == "lm_head"]
    w = g.values[head.inputs[1]]
    assert w.name != "embed.w" and w.kind == WEIGHT
    assert w.attrs["parts"] == embed.attrs["parts"]  # the same checkpoint tensor, cut by vocabulary rows
    assert w.shape == (49, 64) and w.shard == Shard(0, 2, chunk=49)
    assert embed.shape == (97, 64) and embed.shard is None
    assert [n.op for n in users(g, "embed.w")] == ["embedding"]


def test_prompt_logprobs_are_dropped_from_a_rank_graph():
    whole = graph_after(config(), "build", **SIZES)
    g = rank_graph(2)
    dropped = [o for n in whole.nodes if n.op == "token_logprobs" for o in n.outputs]
    assert dropped and not any(n.op == "token_logprobs" for n in g.nodes)
    assert not set(dropped) & (set(g.outputs) | set(g.values))


def test_tp1_changes_nothing():
    g = build_unfused(load_config(config()), **SIZES)
    assert "tp" not in g.meta
    assert str(shard_tensor_parallel(g)) == str(g)
    plan = compile_plan(config(), tp=1, **SIZES)
    assert "tp" not in plan.graph.meta and not {"all_reduce", "all_gather_vocab"} & set(plan.graph.op_counts())
    assert all(v.shard is None for v in plan.graph.values.values())


# ---------------------------------------------------------------------------------------------
# Shard.take and assemble: the exact slices, on hand-made arrays
# ---------------------------------------------------------------------------------------------

def rows(arr, *spans):
    """Rows ``[a, b)`` of ``arr`` for each (a, b), stacked."""
    return np.concatenate([arr[a:b] for a, b in spans])


def test_column_parallel_qkv_takes_each_ranks_heads_of_q_k_and_v():
    # 4 q heads and 2 kv heads of head_dim 2, K = 3: row r of q is head r // 2
    q, k, v = (np.arange(n * 3, dtype=np.float32).reshape(n, 3) + off for n, off in ((8, 0), (4, 100), (4, 200)))
    shard = Shard(0, 2, blocks=(4, 2, 2))
    # rank 0: q heads 0, 1 (rows 0-3), kv head 0 (rows 0-1); rank 1: q heads 2, 3, kv head 1
    np.testing.assert_array_equal(shard.take(0, q, 0), q[0:4])
    np.testing.assert_array_equal(shard.take(0, q, 1), q[4:8])
    np.testing.assert_array_equal(shard.take(1, k, 1), k[2:4])
    np.testing.assert_array_equal(shard.take(2, v, 0), v[0:2])
    np.testing.assert_array_equal(assemble({}, [q, k, v], shard, 1), np.concatenate([q[4:8], k[2:4], v[2:4]]))
    whole = np.concatenate([q, k, v])
    np.testing.assert_array_equal(assemble({}, [q, k, v]), whole)  # no shard: the stacked parts


@pytest.mark.parametrize("kv, tp, held", [
    (2, 4, [0, 0, 1, 1]),  # GQA 2 kv heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1
    (1, 2, [0, 0]),  # MQA: every rank holds the one head
    (1, 4, [0, 0, 0, 0]),
])
def test_kv_heads_replicated_when_ranks_outnumber_them(kv, tp, held):
    HD = 2
    k = np.arange(kv * HD * 5, dtype=np.float32).reshape(kv * HD, 5)
    shard = Shard(0, tp, blocks=(4, kv, kv))
    for rank, head in enumerate(held):
        np.testing.assert_array_equal(shard.take(1, k, rank), k[head * HD:(head + 1) * HD])


def test_row_parallel_takes_columns():
    o = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)  # [D, H * HD] with 4 heads of 2
    shard = Shard(1, 2, blocks=(4,))
    np.testing.assert_array_equal(shard.take(0, o, 0), o[:, 0:4])
    np.testing.assert_array_equal(shard.take(0, o, 1), o[:, 4:8])
    down = np.arange(3 * 12, dtype=np.float32).reshape(3, 12)  # [D, I] with I split in single columns
    np.testing.assert_array_equal(Shard(1, 4, blocks=(12,)).take(0, down, 3), down[:, 9:12])


@pytest.mark.parametrize("vocab, tp, spans, pad", [
    (7, 2, [(0, 4), (4, 7)], [0, 1]),
    (7, 4, [(0, 2), (2, 4), (4, 6), (6, 7)], [0, 0, 0, 1]),
    (97, 4, [(0, 25), (25, 50), (50, 75), (75, 97)], [0, 0, 0, 3]),
    (5, 4, [(0, 2), (2, 4), (4, 5), (5, 5)], [0, 0, 1, 2]),  # the last rank holds padding only
])
def test_vocabulary_chunks_with_zero_padding(vocab, tp, spans, pad):
    table = np.arange(vocab * 3, dtype=np.float32).reshape(vocab, 3) + 1  # no zero rows of its own
    chunk = math.ceil(vocab / tp)
    shard = Shard(0, tp, chunk=chunk)
    for rank, ((a, b), p) in enumerate(zip(spans, pad)):
        got = assemble({}, [table], shard, rank)
        assert got.shape == (chunk, 3)
        np.testing.assert_array_equal(got[:b - a], table[a:b])
        np.testing.assert_array_equal(got[b - a:], np.zeros((p, 3), np.float32))


def test_random_weights_of_each_rank_are_slices_of_the_one_rank_weights():
    """The loaders cut rank slices of the same numbers: rank r of the tp 2 graph (MQA: the one KV
    head replicated, odd vocabulary: the last chunk padded) against the unsharded graph's draw."""
    over = dict(num_key_value_heads=1, vocab_size=97, attention_bias=True)
    whole = random_weights(graph_after(config(**over), "build", **SIZES), seed=3)
    g = rank_graph(2, **over)
    HD, H = 16, 4
    for rank in range(2):
        got = random_weights(g, seed=3, rank=rank)
        q_rows = (rank * 2 * HD, (rank + 1) * 2 * HD)  # q heads 2r, 2r + 1
        k_rows, v_rows = (H * HD, (H + 1) * HD), ((H + 1) * HD, (H + 2) * HD)  # the one kv head
        for name in ("l0.qkv.w", "l1.qkv_bias.w"):
            np.testing.assert_array_equal(got[name], rows(whole[name], q_rows, k_rows, v_rows))
        np.testing.assert_array_equal(got["l0.o.w"], whole["l0.o.w"][:, rank * 32:(rank + 1) * 32])
        np.testing.assert_array_equal(got["l1.gate.w"], whole["l1.gate.w"][rank * 96:(rank + 1) * 96])
        np.testing.assert_array_equal(got["l1.down.w"], whole["l1.down.w"][:, rank * 96:(rank + 1) * 96])
        np.testing.assert_array_equal(got["embed.w"], whole["embed.w"])
        head = got["lm_head.w"]
        if rank == 0:
            np.testing.assert_array_equal(head, whole["lm_head.w"][:49])
        else:
            np.testing.assert_array_equal(head[:48], whole["lm_head.w"][49:])
            assert not head[48].any()


# ---------------------------------------------------------------------------------------------
# numerics: the simulated ranks against HF, and against the one-rank plan
# ---------------------------------------------------------------------------------------------

MATRIX = ["mha", "gqa", "mqa", "bias", "tied", "rope_linear", "rope_dynamic", "rope_llama3", "head_dim", "odd_vocab"]


@pytest.mark.parametrize("name", MATRIX)
def test_tp2_fp32_logits_match_hf(hf_model, name):
    check_against_hf(hf_model(name), backend="reference", dtype="float32", tol=1e-4, tp=2)


@pytest.mark.parametrize("name", ["mha", "gqa", "odd_vocab", "tied", "bias"])
def test_tp4_fp32_logits_match_hf(hf_model, name):
    """tp 4: GQA's 2 KV heads (and odd_vocab's, tied's, bias's) replicated over 4 ranks; 97 rows in
    chunks of 25."""
    check_against_hf(hf_model(name), backend="reference", dtype="float32", tol=1e-4, tp=4)


@pytest.mark.parametrize("name", ["meta_compatible", "meta_llama3"])
def test_tp2_meta_checkpoint_gives_hf_logits(meta_model, name):
    meta_dir, hf_dir = meta_model(name)
    check_against_hf(meta_dir, backend="reference", dtype="float32", tol=1e-4, hf_dir=hf_dir, tp=2)


def test_tp2_meta_checkpoint_in_fp16_with_rope_fused_per_rank(meta_model):
    """16-bit plans fuse RoPE into the QKV GEMV with rows in rope pair order: per rank, over the
    rank's heads (Meta's interleaved pairs)."""
    meta_dir, hf_dir = meta_model("meta_llama3")
    plan = llamagraph.compile(meta_dir, dtype="float16", max_batch=2, max_seq=32, tp=2)
    assert plan.graph.op_counts().get("rms_qkv_rope_kv_append")
    paired = [v for v in plan.graph.values.values() if "row_order" in v.attrs]
    assert paired and all(v.attrs["row_order"][1] == 2 + 2 * 1 and v.shard is not None for v in paired)
    ref = models.hf_reference_logits(hf_dir, PROMPTS, [[], []])
    got = plan.run(PROMPTS)
    for b in range(2):
        assert rel_err(got[b], ref[b][0]) < 3e-2


def _steps(plan, n: int = 6) -> list[np.ndarray]:
    out = [plan.run(PROMPTS)]
    for s in range(n):
        out.append(plan.run([[DECODE[0][s]], [DECODE[1][s]]]))
    return out


@pytest.mark.parametrize("tp, over", [
    (2, {}), (4, {}), (2, dict(num_key_value_heads=1, vocab_size=97)), (4, dict(tie_word_embeddings=True)),
    (3, dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96, vocab_size=100)),
])
def test_random_weights_tp_logits_and_greedy_tokens_equal_tp1(tp, over):
    cfg = config(**over)
    sizes = dict(dtype="float32", max_batch=2, max_seq=48)
    one = llamagraph.compile(cfg, "random", seed=5, **sizes)
    many = llamagraph.compile(cfg, "random", seed=5, tp=tp, **sizes)
    assert type(many.executor).__name__ == "TensorParallelReference" and len(many.executor.ranks) == tp
    for k, (a, b) in enumerate(zip(_steps(one), _steps(many))):
        assert np.abs(b - a).max() <= 1e-5 * np.abs(a).max(), f"step {k}"
    one.reset()
    many.reset()
    assert many.generate(PROMPTS, 12) == one.generate(PROMPTS, 12)


@pytest.mark.parametrize("tp", [2, 4])
def test_checkpoint_greedy_tokens_and_logprobs_equal_tp1(hf_model, tp):
    d = hf_model("gqa")
    one = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=48)
    many = llamagraph.compile(d, dtype="float32", max_batch=2, max_seq=48, tp=tp)
    (t1, lp1), (t2, lp2) = one.generate(PROMPTS, 16, logprobs=True), many.generate(PROMPTS, 16, logprobs=True)
    assert t2 == t1 and t1 == [models.hf_greedy(d, p, 16) for p in PROMPTS]
    np.testing.assert_allclose(np.array(lp2), np.array(lp1), rtol=1e-5, atol=1e-5)
    sampled = dict(temperature=0.8, top_k=20, top_p=0.9, seed=11)
    assert many.generate(PROMPTS, 10, **sampled) == one.generate(PROMPTS, 10, **sampled)


def test_tp2_fp16_reference_close_to_tp1(hf_model):
    d = hf_model("bias")
    one = llamagraph.compile(d, dtype="float16", max_batch=2, max_seq=48)
    two = llamagraph.compile(d, dtype="float16", max_batch=2, max_seq=48, tp=2)
    for a, b in zip(_steps(one, 4), _steps(two, 4)):
        for s in range(2):
            assert rel_err(b[s], a[s]) < 1e-2


# ---------------------------------------------------------------------------------------------
# errors: one line naming what does not split
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over, tp, words", [
    (dict(), 3, ["tp 3", "num_attention_heads 4 is not divisible by 3"]),
    (dict(num_attention_heads=24, num_key_value_heads=8, hidden_size=192), 3, ["tp 3", "num_key_value_heads 8"]),
    (dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=128), 8, None),  # kv 4 divides 8: fine
    (dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=96), 6, ["num_key_value_heads 4"]),
    (dict(intermediate_size=190), 4, ["tp 4", "intermediate_size 190 is not divisible by 4"]),
])
def test_shapes_that_do_not_split_are_one_line_config_errors(over, tp, words):
    if words is None:
        compile_plan(config(**over), tp=tp, **SIZES)
        return
    with pytest.raises(ConfigError) as e:
        compile_plan(config(**over), tp=tp, **SIZES)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("tp", [0, -1, "2", 1.5, True, None])
def test_tp_must_be_a_positive_integer(tp):
    with pytest.raises(ConfigError, match=r"^tp must be a positive integer, got "):
        llamagraph.compile(config(), "random", tp=tp, **SIZES)


def test_numpy_integer_tp_is_taken():
    plan = compile_plan(config(), tp=np.int64(2), **SIZES)
    assert plan.graph.meta["tp"] == 2 and type(plan.graph.meta["tp"]) is int


def test_a_gptq_checkpoint_with_tp_is_refused():
    gptq = config(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32, "format": "gptq"})
    with pytest.raises(ConfigError) as e:
        llamagraph.compile(gptq, "random", tp=2, **SIZES)
    assert "\n" not in str(e.value) and "tp 2: this checkpoint is gptq int4" in str(e.value)


def test_a_weights_dict_with_tp_is_refused():
    weights = random_weights(graph_after(config(), None, **SIZES))
    with pytest.raises(WeightError) as e:
        llamagraph.compile(config(), weights, tp=2, **SIZES)
    assert "\n" not in str(e.value) and "tp 2" in str(e.value) and "dict" in str(e.value)


def test_prompt_logprobs_of_a_tp_plan_are_an_input_error():
    plan = llamagraph.compile(config(), "random", tp=2, **SIZES)
    with pytest.raises(InputError, match="tensor-parallel") as e:
        plan.generate(PROMPTS, 2, echo=True, logprobs=True)
    assert "\n" not in str(e.value)
    tokens = plan.generate(PROMPTS, 2, echo=True)  # echo alone still works
    assert [t[:len(p)] for t, p in zip(tokens, PROMPTS)] == PROMPTS


# ---------------------------------------------------------------------------------------------
# lowering: collective launches, graph safety, the generated source, saved plans
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_tp2():
    return compile_plan(config(vocab_size=97, attention_bias=True), tp=2, dtype="float16", max_batch=2, max_seq=32)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_collective_launches_per_o_and_down_and_one_gather(fp16_tp2, phase):
    g, launches = fp16_tp2.graph, fp16_tp2.phases[phase]
    peer = [x for x in launches if x.kind == "peer_kernel"]
    assert len(peer) == 2 * 2  # O and down of both layers
    assert sorted(producer(g, g.nodes[x.node].inputs[0]).op for x in peer) == ["down_proj"] * 2 + ["o_proj"] * 2
    for x in peer:
        node = g.nodes[x.node]
        assert node.op == "all_reduce_residual" and x.fn in fp16_tp2.kernels
        # attention_bias: o_proj's bias is added after the reduce; down_proj has none (a NULL argument)
        bias = node.inputs[2] if producer(g, node.inputs[0]).op == "o_proj" else None
        assert len(node.inputs) == (3 if bias else 2)
        assert [a.ref for a in x.args[:4]] == [node.inputs[0], node.inputs[1], bias, node.outputs[0]]
        assert (x.args[5].kind, x.args[5].ref) == ("workspace", "tp.peers")
        # the peer kernel takes steps of up to 64 rows on a machine with peer access ...
        assert x.runs({"T": 64, "B": 1}) and not x.runs({"T": 65, "B": 1})
        assert not x.runs({"T": 1, "B": 1, NO_PEER_ACCESS: 1})
        # ... and otherwise exactly one NCCL all-reduce of the partials, in place, then the kernel adds them
        mine = [l for l in launches if l.node == x.node]
        for scalars in ({"T": 65, "B": 1}, {"T": 1, "B": 1, NO_PEER_ACCESS: 1}, {"T": 65, "B": 1, NO_PEER_ACCESS: 1}):
            nccl, local = [l for l in mine if l.runs(scalars)]
            assert (nccl.kind, nccl.fn) == ("collective", "allreduce")
            assert nccl.args[0].ref == nccl.args[1].ref == node.inputs[0]
            assert [a.ref for a in nccl.args if a.kind == "const"] == [64, "float16"]  # whole hidden rows
            assert local.kind == "kernel" and local.fn == x.fn and local.args[-1].ref == 1  # local: no peers
    (gather,) = [x for x in launches if x.kind == "collective" and x.fn == "allgather"]
    assert g.nodes[gather.node].op == "all_gather_vocab"
    after = launches[launches.index(gather) + 1]
    assert after.kind == "kernel" and after.fn.startswith("vocab_concat_") and after.node == gather.node
    assert after.fn in fp16_tp2.kernels


def test_peer_mailbox_and_table_workspaces(fp16_tp2):
    mailbox, table = fp16_tp2.workspace("tp.mailbox"), fp16_tp2.workspace("tp.peers")
    assert mailbox.fill == "peer_mailbox" and table.fill == "peer_table" and table.source == "tp.mailbox"
    assert table.nbytes == 8 * (1 + 2)  # this rank, then every rank's mailbox address
    # block epochs, then 2 parity slots per rank of min(64, T) rows of 64 fp16, each 4 bytes beside an epoch
    data = 2 * 2 * min(64, fp16_tp2.graph.dims["T"]) * 64 * 2 * 2
    assert data <= mailbox.nbytes < data + 1024


def test_tp_plan_checks_and_its_decode_is_capturable(fp16_tp2):
    fp16_tp2.check()
    assert "decode" in fp16_tp2.captured
    check_capturable(fp16_tp2, "decode")


@pytest.mark.skipif(nvrtc.available() is None, reason="no NVRTC or nvcc")
def test_tp_plan_source_compiles_for_sm90_with_vocab_concat(fp16_tp2):
    result = nvrtc.compile_source(fp16_tp2.source, "sm_90")
    concat = [k for k in fp16_tp2.kernels if k.startswith("vocab_concat_")]
    assert concat and set(concat) <= set(result.kernels)
    assert set(fp16_tp2.kernels) <= set(result.kernels)


def test_saved_tp_plan_round_trips_and_runs(tmp_path):
    cfg = config(vocab_size=97, num_key_value_heads=1)
    plan = compile_plan(cfg, tp=2, **SIZES)
    plan.save(str(tmp_path / "plan"))
    loaded = CompiledPlan.load(str(tmp_path / "plan"))
    assert loaded.graph.meta["tp"] == 2 and loaded.graph.meta["tp_heads"] == [2, 1]
    assert loaded.graph == plan.graph and loaded.phases == plan.phases
    shards = {n: v.shard for n, v in loaded.graph.values.items() if v.shard is not None}
    assert shards == {n: v.shard for n, v in plan.graph.values.items() if v.shard is not None} and shards
    bound = llamagraph.load(str(tmp_path / "plan"), "random", seed=2)
    fresh = llamagraph.compile(cfg, "random", seed=2, tp=2, **SIZES)
    assert len(bound.executor.ranks) == 2
    np.testing.assert_array_equal(bound.run(PROMPTS), fresh.run(PROMPTS))


def test_kv_cache_per_rank_holds_its_heads_only():
    g = compile_plan(config(num_key_value_heads=4), tp=2, **SIZES).graph
    whole = compile_plan(config(num_key_value_heads=4), **SIZES).graph
    caches = lambda graph: sum(v.nbytes(graph.dims) for v in graph.values.values()  # noqa: E731
                               if v.kind == KV_CACHE and "alias" not in v.attrs)
    assert 2 * caches(g) == caches(whole) == whole.meta["memory"]["kv_cache_bytes"]


def test_tp_runner_cuts_a_launch_list_at_its_collectives():
    """The CUDA runner issues kernels rank by rank up to each collective, then the collective for
    every rank in one NCCL group: its cut of a launch list keeps every launch once, in order."""
    from types import SimpleNamespace

    from llamagraph.runtime.tensor_parallel import _segments

    kinds = ["kernel", "collective", "kernel", "kernel", "peer_kernel", "collective", "kernel"]
    cut = _segments([SimpleNamespace(kind=k) for k in kinds])
    # a peer kernel cuts like an NCCL call: every rank issues it before any rank's next launch
    assert cut == [(0, 1, 1), (2, 4, 4), (5, 5, 5), (6, 7, None)]
    order = [i for first, end, c in cut for i in [*range(first, end), *([c] if c is not None else [])]]
    assert order == list(range(len(kinds)))
    assert _segments([]) == [(0, 0, None)]


# ---------------------------------------------------------------------------------------------
# compile-time quantization with tp: each rank quantizes its own slice
# ---------------------------------------------------------------------------------------------

def test_tp_int4_with_groups_inside_the_slices_is_the_tp1_model():
    """Groups of 32 along K never cross a rank's slice (O's K 32, down's 96 per rank), so every
    rank holds exactly the tp1 plan's codes, scales and zeros for its rows and columns."""
    one = llamagraph.compile(config(), "random", quantize="int4", group_size=32, **SIZES)
    two = llamagraph.compile(config(), "random", quantize="int4", group_size=32, tp=2, **SIZES)
    assert two.graph.values["l0.o.w"].quant.scheme == "int4" and two.graph.values["l0.o.w"].shape == (64, 32)
    a, b = one.run(PROMPTS), two.run(PROMPTS)
    assert rel_err(b[0], a[0]) <= 1e-5 and rel_err(b[1], a[1]) <= 1e-5
    assert two.generate(PROMPTS, 6) == one.generate(PROMPTS, 6)


def test_tp_int8_quantizes_each_rank_slice():
    """Every rank's int8 codes times its row scales give back its own float slice within half a
    step (the scales are over the slice's K, not the whole row's)."""
    quant = compile_plan(config(), tp=2, quantize="int8", **SIZES).graph
    plain = compile_plan(config(), tp=2, **SIZES).graph
    for rank in range(2):
        codes, floats = random_weights(quant, seed=0, rank=rank), random_weights(plain, seed=0, rank=rank)
        for name in ("l0.o.w", "l0.down.w", "l1.qkv.w", "lm_head.w"):
            q = quant.values[name].quant
            deq = codes[name].astype(np.float32) * codes[q.scales].astype(np.float32)[:, None]
            err = np.abs(deq - floats[name])
            assert (err <= codes[q.scales][:, None] * 0.5 * (1 + 1e-4) + 1e-7).all(), (rank, name)
    one = llamagraph.compile(config(), "random", quantize="int8", **SIZES)
    two = llamagraph.compile(config(), "random", quantize="int8", tp=2, **SIZES)
    a, b = one.run(PROMPTS), two.run(PROMPTS)
    assert rel_err(b[0], a[0]) <= 3e-2 and rel_err(b[1], a[1]) <= 3e-2  # finer scales, nearly the same model


def test_tp_int4_group_that_crosses_a_slice_is_one_line():
    with pytest.raises(ConfigError) as e:
        compile_plan(config(), tp=2, quantize="int4", group_size=64, **SIZES)  # O's K per rank is 32
    msg = str(e.value)
    assert "\n" not in msg and "group_size 64 does not divide K=32 (each of 2 ranks' slice)" in msg

