"""Golden tests, TVM style: for each pass a Before graph and the Expected graph, written in the
text IR and compared structurally (ops, wiring, types, attributes, layers; node names aside).
Every fusion also has negative cases: patterns that must not fuse.
"""

import textwrap

import numpy as np
import pytest

from llamagraph.ir import Graph, GraphError, verify
from llamagraph.ir.layout import row_order
from llamagraph.passes.dce import dce
from llamagraph.passes.fuse_all_reduce_residual import fuse_all_reduce_residual
from llamagraph.passes.fuse_gate_up_silu import fuse_gate_up_silu
from llamagraph.passes.fuse_gemm_bias import fuse_gemm_bias
from llamagraph.passes.fuse_linear_residual import fuse_linear_residual
from llamagraph.passes.fuse_norm_prologue import fuse_norm_prologue
from llamagraph.passes.fuse_residual_rmsnorm import fuse_residual_rmsnorm
from llamagraph.passes.fuse_rope_kv_append import fuse_rope_kv_append
from llamagraph.passes.fuse_silu_mul import fuse_silu_mul
from llamagraph.passes.pipeline import PASS_NAMES, PIPELINE, run_pipeline


def parse(text: str) -> Graph:
    g = Graph.from_text(textwrap.dedent(text))
    verify(g)
    return g


def check(p, before: str, expected: str) -> Graph:
    after = p(parse(before))
    verify(after)
    want = parse(expected)
    assert after.structure() == want.structure(), f"\nafter:\n{after}\nexpected:\n{want}"
    return after


def unchanged(p, before: str) -> None:
    check(p, before, before)


HEAD = """
graph (T=4, B=1)
  input %x: f32[T,8]
  input %r: f32[T,8]
"""

# ---------------------------------------------------------------------------------------------
# fuse_residual_rmsnorm
# ---------------------------------------------------------------------------------------------

RESIDUAL_NORM = HEAD + """
  weight @wo: f32[8,8]
  weight @bo: f32[8] {role="bias"}
  weight @wn: f32[8] {role="norm"}
  %y: f32[T,8] = o_proj(%x, @wo) loc(layer=0)
  %yb: f32[T,8] = bias_add(%y, @bo) loc(layer=0)
  %s: f32[T,8] = residual(%yb, %r) loc(layer=0)
  %n: f32[T,8] = rmsnorm(%s, @wn) {eps=1e-05} loc(layer=0)
"""


def test_fuse_residual_rmsnorm_takes_the_bias():
    check(fuse_residual_rmsnorm, RESIDUAL_NORM + "  return %s, %n", HEAD + """
      weight @wo: f32[8,8]
      weight @bo: f32[8] {role="bias"}
      weight @wn: f32[8] {role="norm"}
      %y: f32[T,8] = o_proj(%x, @wo) loc(layer=0)
      %s: f32[T,8], %n: f32[T,8] = add_rmsnorm(%y, %r, @wn, @bo) {eps=1e-05} loc(layer=0)
      return %s, %n
    """)


def test_fuse_residual_rmsnorm_keeps_a_shared_bias_add():
    # the biased value has a second reader: the norm fuses with the residual, the bias add stays
    check(fuse_residual_rmsnorm, RESIDUAL_NORM + """
      %z: f32[T,8] = mul(%yb, %n)
      return %z
    """, HEAD + """
      weight @wo: f32[8,8]
      weight @bo: f32[8] {role="bias"}
      weight @wn: f32[8] {role="norm"}
      %y: f32[T,8] = o_proj(%x, @wo) loc(layer=0)
      %yb: f32[T,8] = bias_add(%y, @bo) loc(layer=0)
      %s: f32[T,8], %n: f32[T,8] = add_rmsnorm(%yb, %r, @wn) {eps=1e-05} loc(layer=0)
      %z: f32[T,8] = mul(%yb, %n)
      return %z
    """)


def test_fuse_residual_rmsnorm_leaves_lone_norm():
    unchanged(fuse_residual_rmsnorm, HEAD + """
      weight @wn: f32[8]
      %n: f32[T,8] = rmsnorm(%x, @wn) {eps=1e-05}
      return %n
    """)


# ---------------------------------------------------------------------------------------------
# fuse_linear_residual
# ---------------------------------------------------------------------------------------------

def test_fuse_linear_residual_takes_the_bias_and_the_add():
    check(fuse_linear_residual, RESIDUAL_NORM + "  return %s, %n", HEAD + """
      weight @wo: f32[8,8]
      weight @bo: f32[8] {role="bias"}
      weight @wn: f32[8] {role="norm"}
      %s: f32[T,8] = linear_residual(%x, @wo, %r, @bo) {dtype="float32"} loc(layer=0, name="y")
      %n: f32[T,8] = rmsnorm(%s, @wn) {eps=1e-05} loc(layer=0)
      return %s, %n
    """)


def test_fuse_linear_residual_either_operand_order_and_no_bias():
    check(fuse_linear_residual, HEAD + """
      weight @wd: f32[8,16]
      input %h: f32[T,16]
      %y: f32[T,8] = down_proj(%h, @wd)
      %s: f32[T,8] = residual(%r, %y)
      return %s
    """, HEAD + """
      weight @wd: f32[8,16]
      input %h: f32[T,16]
      %s: f32[T,8] = linear_residual(%h, @wd, %r) {dtype="float32"} loc(name="y")
      return %s
    """)


def test_fuse_linear_residual_leaves_a_projection_read_elsewhere():
    unchanged(fuse_linear_residual, HEAD + """
      weight @wo: f32[8,8]
      %y: f32[T,8] = o_proj(%x, @wo)
      %s: f32[T,8] = residual(%y, %r)
      %z: f32[T,8] = mul(%y, %s)
      return %z
    """)


# ---------------------------------------------------------------------------------------------
# fuse_all_reduce_residual (tensor-parallel rank graphs)
# ---------------------------------------------------------------------------------------------

def test_fuse_all_reduce_residual_takes_the_bias_and_the_add():
    check(fuse_all_reduce_residual, HEAD + """
      weight @wo: f32[8,8]
      weight @bo: f32[8] {role="bias"}
      weight @wn: f32[8] {role="norm"}
      %y: f32[T,8] = o_proj(%x, @wo) loc(layer=0)
      %t: f32[T,8] = all_reduce(%y) {ranks=2} loc(layer=0, name="sum")
      %tb: f32[T,8] = bias_add(%t, @bo) loc(layer=0)
      %s: f32[T,8] = residual(%tb, %r) loc(layer=0)
      %n: f32[T,8] = rmsnorm(%s, @wn) {eps=1e-05} loc(layer=0)
      return %s, %n
    """, HEAD + """
      weight @wo: f32[8,8]
      weight @bo: f32[8] {role="bias"}
      weight @wn: f32[8] {role="norm"}
      %y: f32[T,8] = o_proj(%x, @wo) loc(layer=0)
      %s: f32[T,8] = all_reduce_residual(%y, %r, @bo) {dtype="float32", ranks=2} loc(layer=0, name="sum")
      %n: f32[T,8] = rmsnorm(%s, @wn) {eps=1e-05} loc(layer=0)
      return %s, %n
    """)


def test_fuse_all_reduce_residual_either_operand_order_and_no_bias():
    check(fuse_all_reduce_residual, HEAD + """
      %t: f32[T,8] = all_reduce(%x) {ranks=4}
      %s: f32[T,8] = residual(%r, %t)
      return %s
    """, HEAD + """
      %s: f32[T,8] = all_reduce_residual(%x, %r) {dtype="float32", ranks=4}
      return %s
    """)


def test_fuse_all_reduce_residual_leaves_sums_read_elsewhere_and_plain_residuals():
    unchanged(fuse_all_reduce_residual, HEAD + """
      %t: f32[T,8] = all_reduce(%x) {ranks=2}
      %s: f32[T,8] = residual(%t, %r)
      %z: f32[T,8] = mul(%t, %s)
      return %z
    """)
    unchanged(fuse_all_reduce_residual, HEAD + """
      %s: f32[T,8] = residual(%x, %r)
      return %s
    """)


# ---------------------------------------------------------------------------------------------
# fuse_norm_prologue
# ---------------------------------------------------------------------------------------------

def test_fuse_norm_prologue_gate_up_and_lm_head():
    check(fuse_norm_prologue, HEAD + """
      weight @wn: f32[8] {role="norm"}
      weight @wgu: f32[32,8]
      weight @wl: f32[50,8]
      %h: f32[T,8] = rmsnorm(%x, @wn) {eps=1e-05}
      %a: f32[T,16] = gate_up_silu(%h, @wgu)
      %h2: f32[T,8] = rmsnorm(%r, @wn) {eps=1e-06}
      %l: f32[T,50] = lm_head(%h2, @wl) {out_dtype="float32"}
      return %a, %l
    """, HEAD + """
      weight @wn: f32[8] {role="norm"}
      weight @wgu: f32[32,8]
      weight @wl: f32[50,8]
      %a: f32[T,16] = rms_gate_up_silu(%x, @wn, @wgu) {dtype="float32", eps=1e-05}
      %l: f32[T,50] = rms_lm_head(%r, @wn, @wl) {dtype="float32", eps=1e-06, out_dtype="float32"}
      return %a, %l
    """)


QKV_ROPE = """
graph (T=4, B=2)
  input %x: f16[T,32]
  input %positions: i32[T]
  input %seq_ids: i32[T]
  input %seq_lens: i32[2]
  weight @wn: f16[32] {role="norm", parts=[["n",[32]]]}
  weight @wq: f16[64,32] {parts=[["q",[32,32]],["k",[16,32]],["v",[16,32]]]}
  cache %kc: f16[2,8,1,16] {layout={"kind":"dense"}}
  cache %vc: f16[2,8,1,16] {layout={"kind":"dense"}}
  %h: f16[T,32] = rmsnorm(%x, @wn) {eps=1e-05}
  %qkv: f16[T,64] = qkv_gemm(%h, @wq)
  %q: f16[T,2,16], %kc2: f16[2,8,1,16] {layout={"kind":"dense"}, alias="kc"}, %vc2: f16[2,8,1,16] {layout={"kind":"dense"}, alias="vc"} = rope_kv_append(%qkv, %positions, %seq_ids, %seq_lens, %kc, %vc) {head_dim=16, layout="rotate_half", num_heads=2, num_kv_heads=1, scaling=null, theta=10000.0} loc(name="rope")
  return %q
"""


def test_fuse_norm_prologue_qkv_rope_pairs_the_weight_rows():
    after = check(fuse_norm_prologue, QKV_ROPE, """
    graph (T=4, B=2)
      input %x: f16[T,32]
      input %positions: i32[T]
      input %seq_ids: i32[T]
      input %seq_lens: i32[2]
      weight @wn: f16[32] {role="norm", parts=[["n",[32]]]}
      weight @wq: f16[64,32] {parts=[["q",[32,32]],["k",[16,32]],["v",[16,32]]]}
      weight @wq.rope_pairs: f16[64,32] {parts=[["q",[32,32]],["k",[16,32]],["v",[16,32]]], row_order=["rope_pairs",4,16,"rotate_half"]}
      cache %kc: f16[2,8,1,16] {layout={"kind":"dense"}}
      cache %vc: f16[2,8,1,16] {layout={"kind":"dense"}}
      %q: f16[T,2,16], %kc2: f16[2,8,1,16] {layout={"kind":"dense"}, alias="kc"}, %vc2: f16[2,8,1,16] {layout={"kind":"dense"}, alias="vc"} = rms_qkv_rope_kv_append(%x, @wn, @wq.rope_pairs, %positions, %seq_ids, %seq_lens, %kc, %vc) {dtype="float16", eps=1e-05, head_dim=16, layout="rotate_half", num_heads=2, num_kv_heads=1, scaling=null, theta=10000.0} loc(name="rope")
      return %q
    """)
    # rows 0-7 of each head: the first elements of pairs 0-7; rows 8-15: their second elements
    assert list(row_order(after.values["wq.rope_pairs"].attrs)[:16]) == list(range(8)) + list(range(8, 16))
    assert list(row_order(after.values["wq.rope_pairs"].attrs)[16:24]) == list(range(16, 24))


def test_rope_pair_order_puts_both_halves_of_8_pairs_in_each_16_rows():
    from llamagraph.ir.layout import rope_pair_order

    # rotate_half pairs (p, p + 16) of a 32-wide head: tile 0 holds pairs 0-7, tile 1 pairs 8-15
    half = [*range(0, 8), *range(16, 24), *range(8, 16), *range(24, 32)]
    assert list(rope_pair_order(2, 32, "rotate_half")) == half + [32 + r for r in half]
    # interleaved pairs (2p, 2p + 1)
    assert list(rope_pair_order(1, 16, "interleaved")) == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    with pytest.raises(ValueError, match="multiple of 16"):
        rope_pair_order(1, 24, "rotate_half")


def test_fuse_norm_prologue_keeps_fp32_qkv_and_a_shared_norm():
    # fp32 GEMVs have no paired-row tile: the QKV path stays
    unchanged(fuse_norm_prologue, QKV_ROPE.replace("f16", "f32"))
    unchanged(fuse_norm_prologue, HEAD + """
      weight @wn: f32[8] {role="norm"}
      weight @wgu: f32[32,8]
      %h: f32[T,8] = rmsnorm(%x, @wn) {eps=1e-05}
      %a: f32[T,16] = gate_up_silu(%h, @wgu)
      %z: f32[T,8] = mul(%h, %x)
      return %a, %z
    """)


# ---------------------------------------------------------------------------------------------
# fuse_gemm_bias
# ---------------------------------------------------------------------------------------------

def test_fuse_gemm_bias():
    check(fuse_gemm_bias, HEAD + """
      weight @wq: f32[24,8]
      weight @bq: f32[24]
      %q: f32[T,24] = qkv_gemm(%x, @wq)
      %qb: f32[T,24] = bias_add(%q, @bq)
      return %qb
    """, HEAD + """
      weight @wq: f32[24,8]
      weight @bq: f32[24]
      %qb: f32[T,24] = qkv_gemm(%x, @wq, @bq)
      return %qb
    """)


def test_fuse_gemm_bias_skips_when_gemm_output_has_other_readers():
    unchanged(fuse_gemm_bias, HEAD + """
      weight @wq: f32[8,8]
      weight @bq: f32[8]
      %q: f32[T,8] = o_proj(%x, @wq)
      %qb: f32[T,8] = bias_add(%q, @bq)
      %z: f32[T,8] = mul(%q, %qb)
      return %z
    """)


def test_fuse_gemm_bias_skips_a_gemm_with_an_epilogue_or_a_bias():
    # gate_up_silu's output is after SwiGLU, and a GEMM that has a bias takes no second one
    unchanged(fuse_gemm_bias, HEAD + """
      weight @wgu: f32[16,8]
      weight @b: f32[8]
      weight @wo: f32[8,8]
      %h: f32[T,8] = gate_up_silu(%x, @wgu)
      %hb: f32[T,8] = bias_add(%h, @b)
      %o: f32[T,8] = o_proj(%hb, @wo, @b)
      %ob: f32[T,8] = bias_add(%o, @b)
      return %ob
    """)


# ---------------------------------------------------------------------------------------------
# fuse_silu_mul
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["%a, %r", "%r, %a"])
def test_fuse_silu_mul_either_side(order):
    check(fuse_silu_mul, HEAD + f"""
      %a: f32[T,8] = silu(%x) loc(layer=2)
      %h: f32[T,8] = mul({order}) loc(layer=2)
      return %h
    """, HEAD + """
      %h: f32[T,8] = silu_mul(%x, %r) loc(layer=2)
      return %h
    """)


def test_fuse_silu_mul_skips_a_shared_silu():
    unchanged(fuse_silu_mul, HEAD + """
      %a: f32[T,8] = silu(%x)
      %h: f32[T,8] = mul(%a, %r)
      %z: f32[T,8] = residual(%h, %a)
      return %z
    """)


# ---------------------------------------------------------------------------------------------
# fuse_gate_up_silu
# ---------------------------------------------------------------------------------------------

def swiglu(bias: bool, up_input: str = "%x") -> str:
    b = """
      weight @l0.gate_bias.w: f32[12] {layer=0, role="bias", parts=[["g.b",[12]]]}
      weight @l0.up_bias.w: f32[12] {layer=0, role="bias", parts=[["u.b",[12]]]}""" if bias else ""
    return HEAD + f"""
      weight @l0.gate.w: f32[12,8] {{layer=0, role="matrix", parts=[["g",[12,8]]]}}
      weight @l0.up.w: f32[12,8] {{layer=0, role="matrix", parts=[["u",[12,8]]]}}{b}
      %gate: f32[T,12] = gate_proj(%x, @l0.gate.w{", @l0.gate_bias.w" if bias else ""}) loc(layer=0)
      %up: f32[T,12] = up_proj({up_input}, @l0.up.w{", @l0.up_bias.w" if bias else ""}) loc(layer=0)
      %h: f32[T,12] = silu_mul(%gate, %up) loc(layer=0)
      return %h
    """


@pytest.mark.parametrize("bias", [False, True])
def test_fuse_gate_up_silu(bias):
    fused_bias = """
      weight @l0.gate_up_bias.w: f32[24] {layer=0, role="bias", parts=[["g.b",[12]],["u.b",[12]]]}""" if bias else ""
    after = check(fuse_gate_up_silu, swiglu(bias), swiglu(bias).split("  %gate")[0] + f"""
      weight @l0.gate_up.w: f32[24,8] {{layer=0, role="matrix", parts=[["g",[12,8]],["u",[12,8]]]}}{fused_bias}
      %h: f32[T,12] = gate_up_silu(%x, @l0.gate_up.w{", @l0.gate_up_bias.w" if bias else ""}) loc(layer=0)
      return %h
    """)
    # the concatenated weight lists gate rows, then up rows: the loader concatenates in this order
    assert [p[0] for p in after.values["l0.gate_up.w"].attrs["parts"]] == ["g", "u"]


def test_fuse_gate_up_silu_needs_one_input():
    unchanged(fuse_gate_up_silu, swiglu(False, up_input="%r"))


def test_fuse_gate_up_silu_waits_for_silu_mul():
    before = swiglu(False).replace("%h: f32[T,12] = silu_mul(%gate, %up) loc(layer=0)",
                                   "%a: f32[T,12] = silu(%gate)\n      %h: f32[T,12] = mul(%a, %up)")
    unchanged(fuse_gate_up_silu, before)


# ---------------------------------------------------------------------------------------------
# fuse_rope_kv_append
# ---------------------------------------------------------------------------------------------

ATTENTION = """
graph (T=4, B=1)
  input %positions: i32[T]
  input %seq_ids: i32[T]
  input %seq_lens: i32[1]
  input %qkv: f32[T,16]
  cache %kv.k: f32[1,8,1,4] {layout={"kind":"dense"}}
  cache %kv.v: f32[1,8,1,4] {layout={"kind":"dense"}}
"""
HEADS = 'head_dim=4, num_heads=2, num_kv_heads=1'
ROPE = f'{HEADS}, layout="rotate_half", scaling=null, theta=10000.0'
CACHES = ('%kv.k.appended: f32[1,8,1,4] {layout={"kind":"dense"}, alias="kv.k"}, '
          '%kv.v.appended: f32[1,8,1,4] {layout={"kind":"dense"}, alias="kv.v"}')
UNFUSED_ATTENTION = ATTENTION + f"""
  %l0.qkv_rot: f32[T,4,4] = rope(%qkv, %positions, %seq_ids, %seq_lens) {{{ROPE}}} loc(layer=0)
  {CACHES} = kv_append(%l0.qkv_rot, %positions, %seq_ids, %kv.k, %kv.v) {{{HEADS}}} loc(layer=0)
  %attn: f32[T,8] = sdpa(%l0.qkv_rot, %kv.k.appended, %kv.v.appended, %positions, %seq_ids) {{{HEADS}, scale=0.5}} loc(layer=0)
"""


def test_fuse_rope_kv_append():
    check(fuse_rope_kv_append, UNFUSED_ATTENTION + "  return %attn", ATTENTION + f"""
      %l0.q_rot: f32[T,2,4], {CACHES} = rope_kv_append(%qkv, %positions, %seq_ids, %seq_lens, %kv.k, %kv.v) {{{ROPE}}} loc(layer=0)
      %attn: f32[T,8] = sdpa(%l0.q_rot, %kv.k.appended, %kv.v.appended, %positions, %seq_ids) {{{HEADS}, scale=0.5}} loc(layer=0)
      return %attn
    """)


def test_fuse_rope_kv_append_skips_rotated_qkv_read_elsewhere():
    unchanged(fuse_rope_kv_append, UNFUSED_ATTENTION + """
      %k: f32[T,4,4] = silu(%l0.qkv_rot)
      return %attn, %k
    """)


# ---------------------------------------------------------------------------------------------
# dce and the verifier
# ---------------------------------------------------------------------------------------------

def test_dce_drops_dead_nodes_and_weights_but_keeps_cache_writes():
    before = parse(UNFUSED_ATTENTION.replace("  %attn", "  # %attn") + """
      input %x: f32[T,8]
      weight @wdead: f32[8,8]
      %dead: f32[T,8] = o_proj(%x, @wdead)
      return
    """)
    after = dce(before)
    verify(after)
    assert [n.op for n in after.nodes] == ["rope", "kv_append"]  # only the effectful append is read by nobody
    assert "wdead" not in after.values and "dead" not in after.values
    assert "x" in after.values  # step inputs stay


def test_verifier_rejects_use_before_def():
    with pytest.raises(GraphError, match="before it is written"):
        parse(HEAD + """
          weight @wo: f32[8,8]
          %b: f32[T,8] = o_proj(%a, @wo)
          %a: f32[T,8] = o_proj(%x, @wo)
          return %b
        """)


def test_verifier_rejects_wrong_declared_shape():
    with pytest.raises(GraphError, match="declared"):
        parse(HEAD + """
          weight @wo: f32[8,8]
          %y: f32[T,9] = o_proj(%x, @wo)
          return %y
        """)


def test_verifier_rejects_a_read_after_an_in_place_update():
    # attention reading the cache *before* the append, scheduled after the append overwrote it
    bad = UNFUSED_ATTENTION.replace("sdpa(%l0.qkv_rot, %kv.k.appended, %kv.v.appended",
                                    "sdpa(%l0.qkv_rot, %kv.k, %kv.v")
    with pytest.raises(GraphError, match=r"overwrites %kv\.[kv] in place before node 2 'attn' reads it"):
        parse(bad + "  return %attn")


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------

def _biased_model(dtype="float32"):
    from llamagraph.ir import build_graph, load_config

    cfg = load_config({"hidden_size": 32, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "vocab_size": 32, "attention_bias": True, "mlp_bias": True})
    return build_graph(cfg, dtype=dtype, max_batch=1, max_seq=8, max_tokens=8)


def _run(graph: Graph, order: list[str]) -> Graph:
    passes = {p.__name__: p for p in PIPELINE}
    for name in order:
        graph = passes[name](graph)
        verify(graph, name)
    return graph


def test_pipeline_is_ordered_and_dumps_each_pass(tmp_path):
    fused = run_pipeline(_biased_model(), dump_dir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".txt")
    assert names == ["00_build.txt"] + [f"{k:02d}_{p.__name__}.txt" for k, p in enumerate(PIPELINE, 1)]
    assert "no change" in (tmp_path / "01_shard_tensor_parallel.txt").read_text()  # tp 1
    assert "no change" in (tmp_path / "02_fuse_all_reduce_residual.txt").read_text()  # tp 1: no all_reduce
    assert "residual: 4 -> 0" in (tmp_path / "03_fuse_linear_residual.txt").read_text()
    assert "rmsnorm: 5 -> 2" in (tmp_path / f"{PASS_NAMES.index('fuse_norm_prologue') + 1:02d}_fuse_norm_prologue.txt").read_text()
    ops = fused.op_counts()
    for gone in ("residual", "bias_add", "silu", "mul", "rope", "kv_append", "gate_proj", "up_proj", "add_rmsnorm",
                 "gate_up_silu", "lm_head"):
        assert gone not in ops
    # fp32: the attention norms stay (no pair-ordered QKV kernel on CUDA cores), the others fold in
    assert ops["linear_residual"] == 4 and ops["rms_gate_up_silu"] == 2 and ops["rms_lm_head"] == 1
    assert ops["rmsnorm"] == 2 and ops["rope_kv_append"] == 2
    f16 = run_pipeline(_biased_model("float16")).op_counts()
    assert f16["rms_qkv_rope_kv_append"] == 2 and not {"rmsnorm", "rope_kv_append", "qkv_gemm"} & set(f16)
    # every dump parses back into the graph it shows
    for k, p in enumerate(PIPELINE, 1):
        text = (tmp_path / f"{k:02d}_{p.__name__}.txt").read_text()
        assert str(Graph.from_text(text)) == text.split("\n\n", 1)[1]


def test_pipeline_order_all_reduce_residual_first_on_a_rank_graph():
    """pipeline.py: in a tp rank graph the all-reduce takes every residual add after it (and the
    bias before that); after the residual+norm fusion only the last layer's would be left."""
    model = _biased_model()
    model.meta["tp"] = 2
    fusions = [n for n in PASS_NAMES if n.startswith("fuse_")]
    assert PASS_NAMES[:2] == ["shard_tensor_parallel", "fuse_all_reduce_residual"]
    right = _run(model, ["shard_tensor_parallel"] + fusions).op_counts()
    late = _run(model, ["shard_tensor_parallel"] + fusions[1:] + fusions[:1]).op_counts()
    assert right["all_reduce_residual"] == 4 and not {"add_rmsnorm", "all_reduce", "residual"} & set(right)
    assert right["rms_gate_up_silu"] == 2  # the norm after each all-reduce folds into the next GEMV
    assert late["add_rmsnorm"] == 3 and late["all_reduce_residual"] == 1 and late["all_reduce"] == 3


def test_pipeline_order_linear_residual_first():
    """pipeline.py: the projection epilogue takes every residual add (and its bias); after the
    residual+norm fusion there would be none left to take."""
    fusions = [n for n in PASS_NAMES if n.startswith("fuse_") and n != "fuse_all_reduce_residual"]
    assert fusions[0] == "fuse_linear_residual"
    right = _run(_biased_model(), fusions).op_counts()
    late = _run(_biased_model(), fusions[1:] + fusions[:1]).op_counts()
    assert right["linear_residual"] == 4 and "add_rmsnorm" not in right
    # late, the residual+norm fusion took every add a norm follows; the last layer's (the final norm
    # runs after the last-row gather) is all that is left for the epilogue
    assert late["add_rmsnorm"] == 3 and late["linear_residual"] == 1


def test_pipeline_order_norm_prologue_after_gate_up_and_rope_fusions():
    fusions = [n for n in PASS_NAMES if n.startswith("fuse_")]
    assert fusions[-1] == "fuse_norm_prologue"
    early = [n for n in fusions if n != "fuse_norm_prologue"]
    early.insert(early.index("fuse_gate_up_silu"), "fuse_norm_prologue")
    right = _run(_biased_model("float16"), fusions).op_counts()
    swapped = _run(_biased_model("float16"), early).op_counts()
    assert right["rms_gate_up_silu"] == right["rms_qkv_rope_kv_append"] == 2
    assert "rms_gate_up_silu" not in swapped and "rms_qkv_rope_kv_append" not in swapped


def test_pipeline_order_residual_norm_before_gemm_bias():
    """pipeline.py: without the projection epilogue, the residual+norm fusion takes the o_proj/down
    biases; swapped, they stay on the GEMMs."""
    fusions = [n for n in PASS_NAMES if n.startswith("fuse_") and n != "fuse_linear_residual"]
    assert fusions.index("fuse_residual_rmsnorm") < fusions.index("fuse_gemm_bias")
    right = _run(_biased_model(), fusions)
    swapped = _run(_biased_model(), ["fuse_gemm_bias", "fuse_residual_rmsnorm"] + fusions[2:])
    inputs = {(g_, n.op): len(n.inputs) for g_, graph in (("right", right), ("swapped", swapped))
              for n in graph.nodes if n.op in ("o_proj", "down_proj", "add_rmsnorm") and n.layer == 0}
    assert inputs[("right", "o_proj")] == inputs[("right", "down_proj")] == 2
    assert inputs[("right", "add_rmsnorm")] == 4  # (y, residual, weight, bias)
    assert inputs[("swapped", "o_proj")] == inputs[("swapped", "down_proj")] == 3
    assert inputs[("swapped", "add_rmsnorm")] == 3


@pytest.mark.parametrize("first,then", [("fuse_silu_mul", "fuse_gate_up_silu"), ("fuse_gemm_bias", "fuse_gate_up_silu")])
def test_pipeline_order_gate_up_silu_last_of_the_mlp_fusions(first, then):
    """pipeline.py: gate/up fusion matches silu_mul over (biased) GEMMs, so it must come after both."""
    assert PASS_NAMES.index(first) < PASS_NAMES.index(then)
    fusions = [n for n in PASS_NAMES if n.startswith("fuse_")]
    right = _run(_biased_model(), fusions)
    early = [n for n in fusions if n != then]
    early.insert(early.index(first), then)
    swapped = _run(_biased_model(), early)
    def swiglu(g):
        return g.op_counts().get("gate_up_silu", 0) + g.op_counts().get("rms_gate_up_silu", 0)
    assert swiglu(right) == 2 and swiglu(swapped) == 0


def test_pipeline_order_dce_after_fusions_and_planner_last():
    assert PASS_NAMES[-3:] == ["dce", "quantize_weights", "plan_memory"]
    fusions = [n for n in PASS_NAMES if n.startswith("fuse_")]
    right = _run(_biased_model(), fusions + ["dce"])
    early = _run(_biased_model(), ["dce"] + fusions)
    assert "l0.gate.w" not in right.values and "l0.gate.w" in early.values  # the split gate weight lingers


def test_fused_and_unfused_graphs_compute_the_same():
    """Execute both graphs on the reference backend with identical random weights."""
    import llamagraph

    cfg = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "vocab_size": 64, "attention_bias": True, "mlp_bias": True}
    results = []
    for passes in (None, []):
        plan = llamagraph.compile(cfg, "random", dtype="float32", max_batch=2, max_seq=16, max_tokens=16,
                                  passes=passes)
        graph = plan.graph
        plan = llamagraph.bind(plan.compiled, llamagraph.random_weights(graph, seed=3, scale=0.2))
        first = plan.run([[1, 2, 3, 4, 5], [7, 8]])
        second = plan.run([[9], [10]])
        results.append((first, second, graph))
    (f1, f2, fg), (u1, u2, ug) = results
    assert len(fg.nodes) < len(ug.nodes)
    np.testing.assert_allclose(f1, u1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f2, u2, rtol=1e-5, atol=1e-5)
    assert np.abs(f1).max() > 1e-3  # not comparing zeros
