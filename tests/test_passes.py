"""Golden tests: for each pass, a hand-written `before` graph and the `expected` graph.

Graphs are compared structurally (ops, wiring, types, attrs in schedule order).
"""

import numpy as np
import pytest

from llamagraph.ir import INPUT, KV_CACHE, WEIGHT, Graph, GraphError, verify
from llamagraph.passes.dce import dce
from llamagraph.passes.fuse_gate_up_silu import fuse_gate_up_silu
from llamagraph.passes.fuse_gemm_bias import fuse_gemm_bias
from llamagraph.passes.fuse_residual_rmsnorm import fuse_residual_rmsnorm
from llamagraph.passes.fuse_rope_kv_append import fuse_rope_kv_append
from llamagraph.passes.fuse_silu_mul import fuse_silu_mul
from llamagraph.passes.pipeline import PIPELINE, run_pipeline

D, I = 8, 12


def base() -> Graph:
    g = Graph(dims={"T": 4, "B": 1})
    g.add_value("x", ("T", D), "float32", INPUT)
    g.add_value("r", ("T", D), "float32", INPUT)
    return g


def w(g: Graph, name: str, shape) -> str:
    return g.add_value(name, shape, "float32", WEIGHT, parts=[[name, list(shape)]])


def act(g: Graph, name: str, shape=("T", D)) -> str:
    return g.add_value(name, shape, "float32")


def check(before: Graph, expected: Graph, p) -> Graph:
    verify(before)
    verify(expected)
    after = p(before)
    verify(after)
    assert after.structure() == expected.structure(), f"\nafter:\n{after}\nexpected:\n{expected}"
    return after


def test_fuse_residual_rmsnorm_with_bias():
    before = base()
    wo, bo, wn = w(before, "wo", (D, D)), w(before, "bo", (D,)), w(before, "wn", (D,))
    before.add_node("o_proj", ["x", wo], [act(before, "y")])
    before.add_node("bias_add", ["y", bo], [act(before, "yb")])
    before.add_node("residual", ["yb", "r"], [act(before, "s")])
    before.add_node("rmsnorm", ["s", wn], [act(before, "n")], eps=1e-5)
    before.outputs = ["s", "n"]

    expected = base()
    for name, shape in (("wo", (D, D)), ("bo", (D,)), ("wn", (D,))):
        w(expected, name, shape)
    expected.add_node("o_proj", ["x", "wo"], [act(expected, "y")])
    expected.add_node("add_rmsnorm", ["y", "r", "wn", "bo"], [act(expected, "s"), act(expected, "n")], eps=1e-5)
    expected.outputs = ["s", "n"]
    check(before, expected, fuse_residual_rmsnorm)


def test_fuse_residual_rmsnorm_leaves_lone_norm():
    before = base()
    wn = w(before, "wn", (D,))
    before.add_node("rmsnorm", ["x", wn], [act(before, "n")], eps=1e-5)
    before.outputs = ["n"]
    check(before, before.copy(), fuse_residual_rmsnorm)


def test_fuse_gemm_bias():
    before = base()
    wq, bq = w(before, "wq", (3 * D, D)), w(before, "bq", (3 * D,))
    before.add_node("qkv_gemm", ["x", wq], [act(before, "q", ("T", 3 * D))])
    before.add_node("bias_add", ["q", bq], [act(before, "qb", ("T", 3 * D))])
    before.outputs = ["qb"]

    expected = base()
    w(expected, "wq", (3 * D, D)), w(expected, "bq", (3 * D,))
    expected.add_node("qkv_gemm", ["x", "wq", "bq"], [act(expected, "qb", ("T", 3 * D))])
    expected.outputs = ["qb"]
    check(before, expected, fuse_gemm_bias)


def test_fuse_gemm_bias_skips_when_gemm_output_has_other_readers():
    before = base()
    wq, bq = w(before, "wq", (D, D)), w(before, "bq", (D,))
    before.add_node("o_proj", ["x", wq], [act(before, "q")])
    before.add_node("bias_add", ["q", bq], [act(before, "qb")])
    before.outputs = ["q", "qb"]
    check(before, before.copy(), fuse_gemm_bias)


def swiglu_before(with_bias: bool) -> Graph:
    g = base()
    wg, wu = w(g, "l0.gate.w", (I, D)), w(g, "l0.up.w", (I, D))
    extra = []
    if with_bias:
        extra = [w(g, "l0.gate_bias.w", (I,)), w(g, "l0.up_bias.w", (I,))]
    g.add_node("gate_proj", ["x", wg] + extra[:1], [act(g, "gate", ("T", I))])
    g.add_node("up_proj", ["x", wu] + extra[1:], [act(g, "up", ("T", I))])
    g.add_node("silu", ["gate"], [act(g, "act", ("T", I))])
    g.add_node("mul", ["act", "up"], [act(g, "h", ("T", I))])
    g.outputs = ["h"]
    return g


def test_fuse_silu_mul():
    before = swiglu_before(False)
    expected = base()
    w(expected, "l0.gate.w", (I, D)), w(expected, "l0.up.w", (I, D))
    expected.add_node("gate_proj", ["x", "l0.gate.w"], [act(expected, "gate", ("T", I))])
    expected.add_node("up_proj", ["x", "l0.up.w"], [act(expected, "up", ("T", I))])
    expected.add_node("silu_mul", ["gate", "up"], [act(expected, "h", ("T", I))])
    expected.outputs = ["h"]
    check(before, expected, fuse_silu_mul)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fuse_gate_up_silu(with_bias):
    before = fuse_silu_mul(swiglu_before(with_bias))
    after = fuse_gate_up_silu(before)
    verify(after)
    expected = base()
    w(expected, "l0.gate.w", (I, D)), w(expected, "l0.up.w", (I, D))
    ins = ["x", "l0.gate_up.w"]
    if with_bias:
        w(expected, "l0.gate_bias.w", (I,)), w(expected, "l0.up_bias.w", (I,))
        expected.add_value("l0.gate_up.w", (2 * I, D), "float32", WEIGHT, parts=[["l0.gate.w", [I, D]], ["l0.up.w", [I, D]]])
        expected.add_value("l0.gate_up_bias.w", (2 * I,), "float32", WEIGHT,
                           parts=[["l0.gate_bias.w", [I]], ["l0.up_bias.w", [I]]])
        ins.append("l0.gate_up_bias.w")
    else:
        expected.add_value("l0.gate_up.w", (2 * I, D), "float32", WEIGHT, parts=[["l0.gate.w", [I, D]], ["l0.up.w", [I, D]]])
    expected.add_node("gate_up_silu", ins, [act(expected, "h", ("T", I))])
    expected.outputs = ["h"]
    check(before, expected, fuse_gate_up_silu)
    # the concatenated weight lists gate rows, then up rows
    assert [p[0] for p in after.values["l0.gate_up.w"].attrs["parts"]] == ["l0.gate.w", "l0.up.w"]


def attention_before() -> tuple[Graph, dict]:
    H, KV, HD = 2, 1, 4
    g = Graph(dims={"T": 4, "B": 1})
    for name in ("positions", "seq_ids"):
        g.add_value(name, ("T",), "int32", INPUT)
    g.add_value("seq_lens", (1,), "int32", INPUT)
    g.add_value("qkv", ("T", (H + 2 * KV) * HD), "float32", INPUT)
    for c in ("k", "v"):
        g.add_value(f"kv.{c}", (1, 8, KV, HD), "float32", KV_CACHE)
        g.add_value(f"kv.{c}.appended", (1, 8, KV, HD), "float32", KV_CACHE, alias=f"kv.{c}")
    heads = dict(num_heads=H, num_kv_heads=KV, head_dim=HD)
    rope = dict(heads, theta=10000.0, scaling=None, layout="rotate_half")
    g.add_node("rope", ["qkv", "positions", "seq_ids", "seq_lens"], [act(g, "l0.qkv_rot", ("T", H + 2 * KV, HD))], **rope)
    g.add_node("kv_append", ["l0.qkv_rot", "positions", "seq_ids", "kv.k", "kv.v"], ["kv.k.appended", "kv.v.appended"], **heads)
    g.add_node("sdpa", ["l0.qkv_rot", "kv.k.appended", "kv.v.appended", "positions", "seq_ids"],
               [act(g, "attn", ("T", H * HD))], scale=0.5, **heads)
    g.outputs = ["attn"]
    return g, dict(H=H, KV=KV, HD=HD, heads=heads, rope=rope)


def test_fuse_rope_kv_append():
    before, p = attention_before()
    expected = Graph(dims={"T": 4, "B": 1})
    expected.values = {k: v for k, v in before.copy().values.items() if k not in ("l0.qkv_rot", "attn")}
    act(expected, "l0.q_rot", ("T", p["H"], p["HD"]))
    act(expected, "attn", ("T", p["H"] * p["HD"]))
    expected.add_node("rope_kv_append", ["qkv", "positions", "seq_ids", "seq_lens", "kv.k", "kv.v"],
                      ["l0.q_rot", "kv.k.appended", "kv.v.appended"], **p["rope"])
    expected.add_node("sdpa", ["l0.q_rot", "kv.k.appended", "kv.v.appended", "positions", "seq_ids"], ["attn"],
                      scale=0.5, **p["heads"])
    expected.outputs = ["attn"]
    check(before, expected, fuse_rope_kv_append)


def test_dce_drops_dead_nodes_and_weights_but_keeps_cache_writes():
    before, _ = attention_before()
    wd = w(before, "wdead", (D, D))
    before.add_value("x", ("T", D), "float32", INPUT)
    before.add_node("o_proj", ["x", wd], [act(before, "dead")])
    before.outputs = []  # nothing is read: only the effectful kv_append must stay
    after = dce(before)
    verify(after)
    assert [n.op for n in after.nodes] == ["rope", "kv_append"]
    assert "wdead" not in after.values and "dead" not in after.values
    assert "x" in after.values  # step inputs stay


def test_verifier_rejects_use_before_def():
    g = base()
    wo = w(g, "wo", (D, D))
    act(g, "a")
    act(g, "b")
    g.add_node("o_proj", ["a", wo], ["b"])
    g.add_node("o_proj", ["x", wo], ["a"])
    with pytest.raises(GraphError, match="before it is written"):
        verify(g)


def test_verifier_rejects_wrong_declared_shape():
    g = base()
    wo = w(g, "wo", (D, D))
    g.add_node("o_proj", ["x", wo], [act(g, "y", ("T", D + 1))])
    with pytest.raises(GraphError, match="declared"):
        verify(g)


def test_pipeline_is_ordered_and_dumps_each_pass(tmp_path):
    from llamagraph.ir import build_graph, load_config

    cfg = load_config({"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "vocab_size": 32, "attention_bias": True, "mlp_bias": True})
    g = build_graph(cfg, dtype="float32", max_batch=1, max_seq=8, max_tokens=8)
    fused = run_pipeline(g, dump_dir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_build.txt"] + [f"{k:02d}_{p.__name__}.txt" for k, p in enumerate(PIPELINE, 1)]
    assert "rmsnorm: 5 -> 1" in (tmp_path / "01_fuse_residual_rmsnorm.txt").read_text()
    ops = fused.op_counts()
    for gone in ("residual", "bias_add", "silu", "mul", "rope", "kv_append", "gate_proj", "up_proj"):
        assert gone not in ops
    assert ops["add_rmsnorm"] == 4 and ops["gate_up_silu"] == 2 and ops["rope_kv_append"] == 2


def test_fused_and_unfused_graphs_compute_the_same(tmp_path):
    """Execute both graphs on the reference backend with identical random weights."""
    from llamagraph.ir import load_config
    from llamagraph.runtime.plan import Plan, compile_graph
    from llamagraph.runtime.reference import ReferenceExecutor
    from llamagraph.runtime.weights import random_weights

    cfg = load_config({"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "num_hidden_layers": 2, "vocab_size": 64, "attention_bias": True, "mlp_bias": True})
    results = []
    for passes in (None, []):
        g = compile_graph(cfg, dtype="float32", max_batch=2, max_seq=16, max_tokens=16, passes=passes)
        plan = Plan(g, cfg, ReferenceExecutor(g, random_weights(g, seed=3, scale=0.2)))
        first = plan.run([[1, 2, 3, 4, 5], [7, 8]])
        second = plan.run([[9], [10]])
        results.append((first, second))
    (f1, f2), (u1, u2) = results
    np.testing.assert_allclose(f1, u1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f2, u2, rtol=1e-5, atol=1e-5)
    assert np.abs(f1).max() > 1e-3  # not comparing zeros
