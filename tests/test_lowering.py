"""One lowering per op: the registry is complete, each op has one home, every kernel of every
bundled example compiles, and the launch lists say what each phase runs."""

import glob
import io
import os
import tokenize

import pytest

import llamagraph
from llamagraph.codegen import lowering, nvrtc
from llamagraph.codegen.launch import Scaled, workspace
from llamagraph.compiler import compile_plan
from llamagraph.ir import OPS, load_config
from llamagraph.ir.ops import OpDef

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.json")))

needs_compiler = pytest.mark.skipif(nvrtc.available() is None, reason="no NVRTC library or nvcc on this machine")


def test_every_op_has_a_reference_and_exactly_one_lowering():
    assert OPS and set(lowering.LOWERINGS) == set(OPS)
    for name, op in OPS.items():
        assert callable(op.reference) and callable(op.infer), name
        assert lowering.LOWERINGS[name].__module__ == "llamagraph.codegen.lowering", name
    assert "template" not in OpDef.__dataclass_fields__  # kernels are the lowering's business
    with pytest.raises(ValueError, match="already has a lowering"):
        lowering.lowering("rmsnorm")(lambda n, c: None)


def _words(path: str) -> set[str]:
    """Every identifier and string literal of a Python file (comments and docstrings aside)."""
    out: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for tok in tokenize.generate_tokens(io.StringIO(f.read()).readline):
            if tok.type == tokenize.NAME:
                out.add(tok.string)
            elif tok.type == tokenize.STRING and not tok.string.startswith(('"""', "'''")):
                out.add(tok.string.strip("\"'"))
    return out


def test_no_runtime_file_names_an_op():
    files = glob.glob(os.path.join(ROOT, "llamagraph", "runtime", "*.py"))
    assert files
    for path in files:
        named = _words(path) & set(OPS)
        assert not named, f"{os.path.relpath(path, ROOT)} names ops {sorted(named)}"


def test_the_runtime_check_would_catch_an_op_name(tmp_path):
    p = tmp_path / "x.py"
    p.write_text('"""sdpa in a docstring is fine"""\nfamily = {"sdpa": 1}\n')
    assert _words(str(p)) & set(OPS) == {"sdpa"}


@needs_compiler
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_every_kernel_of_every_example_compiles(example, dtype):
    plan = compile_plan(example, dtype=dtype, max_batch=4, max_seq=2048)
    result = nvrtc.compile_source(plan.source, "sm_90")
    assert plan.kernels and set(plan.kernels) <= set(result.kernels), set(plan.kernels) - set(result.kernels)
    spilling = {k: r for k, r in result.kernels.items() if r.spill_stores or r.spill_loads}
    assert not spilling, spilling


def test_launch_lists_per_phase():
    cfg = load_config(EXAMPLES[0])
    plan = compile_plan(cfg, dtype="float16", max_batch=2, max_seq=256)
    g = plan.graph
    dec, pre = plan.phases["decode"], plan.phases["prefill"]
    # every node launches in both phases, one kernel per node in decode (attention too: its last
    # split block merges the splits); the prompt logprobs (echo) launch only on demand, so a plain
    # decode step does not count them
    assert {x.node for x in dec} == {x.node for x in pre} == set(range(len(g.nodes)))
    on_demand = [i for i, n in enumerate(g.nodes) if n.op == "token_logprobs"]
    assert len(on_demand) == 1 and all(x.on_demand == "token_logprobs" for x in dec + pre if x.node == on_demand[0])
    assert plan.kernel_launches("decode") == len(g.nodes) - 1
    assert all(x.kind == "kernel" and (x.when == () or x.on_demand) for x in dec)
    by_op = {g.nodes[x.node].op: x for x in dec}
    # the norms live in the prologue of the GEMV after them, the residual adds in the epilogue of
    # the projection before them, RoPE + KV append in the QKV GEMV's epilogue
    assert "_rms" in by_op["rms_gate_up_silu"].fn and "_silu" in by_op["rms_gate_up_silu"].fn
    assert "_rms" in by_op["rms_qkv_rope_kv_append"].fn and "_rope_" in by_op["rms_qkv_rope_kv_append"].fn
    assert by_op["linear_residual"].fn.endswith("_res") and "_rms" in by_op["rms_lm_head"].fn
    assert not {"rmsnorm", "add_rmsnorm", "rope_kv_append", "qkv_gemm", "o_proj", "down_proj"} & set(by_op)
    # prefill: big row counts take cuBLAS, small ones the GEMV, chosen by the step's rows; the big
    # path norms into scratch, multiplies with cuBLAS, then rotates from the pair-ordered columns
    first_qkv = next(i for i, n in enumerate(g.nodes) if n.op == "rms_qkv_rope_kv_append")
    qkv = [x for x in pre if x.node == first_qkv]
    assert [(x.kind, x.when[0].op) for x in qkv] == [("kernel", "<="), ("kernel", ">"), ("library", ">"), ("kernel", ">")]
    assert qkv[1].fn.startswith("rmsnorm") and qkv[3].fn.startswith("rope_kv_append_fused_pairs")
    attn = [x for x in pre if g.nodes[x.node].op == "sdpa"][0]
    assert attn.fn.startswith("attn_prefill") and attn.shape.grid[0] == Scaled("seq_tiles.r64.n")
    assert plan.workspace("seq_tiles.r64").fill == "seq_tiles"
    # the source is deterministic
    assert plan.source == compile_plan(cfg, dtype="float16", max_batch=2, max_seq=256).source


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_at_most_five_kernels_per_layer_in_a_decode_step(example, dtype):
    """Issue #7: <= 5 launches per decoder layer, plus <= 4 for the embedding, the last rows' gather
    (the final norm's rows), the LM head with the final norm, and sampling."""
    plan = compile_plan(example, dtype=dtype, max_batch=4, max_seq=256)
    g = plan.graph
    per_layer: dict = {}
    for x in plan.phases["decode"]:
        if not x.on_demand:
            per_layer[g.nodes[x.node].layer] = per_layer.get(g.nodes[x.node].layer, 0) + 1
    outside = per_layer.pop(None)
    assert len(per_layer) == g.meta["config"]["num_layers"]
    assert set(per_layer.values()) == {5} and outside == 4, (per_layer, outside)
    assert plan.kernel_launches("decode") == 5 * len(per_layer) + 4


def test_early_launches_wait_for_their_predecessor_in_their_own_code():
    """A launch marked ``early`` may start before the kernel before it finishes (programmatic
    dependent launch): its kernel must call lg_pdl_wait() before its first read of another
    kernel's output. Every decode launch is early; the flag survives the plan's JSON."""
    from llamagraph.codegen.launch import launch_from_dict, launch_to_dict

    plan = compile_plan(EXAMPLES[0], dtype="float16", max_batch=2, max_seq=256)
    dec = [x for x in plan.phases["decode"] if not x.on_demand]
    assert dec and all(x.early for x in dec)
    for name in {x.fn for x in dec}:
        body = plan.source.split(f"{name}(", 2)[-1]  # the kernel's definition follows its last mention
        entry = body[: body.index("\n}\n")]
        wait = entry.index("lg_pdl_wait();")
        # nothing but weight prefetches before the wait: no other pointer is dereferenced
        before = entry[entry.index("{") + 1: wait]
        if name.startswith("attn_decode"):
            # decode attention reads the step's positions and slots and the keys cached before the token's
            # own ahead of its wait (safe: test_codegen_attention's test of lg_pdl_launch_dependents says
            # why); never q, its own key, or anything it writes
            assert "load_batch(kb, pos_t)" in before and "key != skip" in before, name
            assert not any(w in before for w in ("qrow", "out[", "ws +", "counters", "atomic")), name
            continue
        assert "_impl::run" not in before and "[" not in before.replace("reinterpret_cast<const uint4*>(W)", ""), name
    assert all(launch_from_dict(launch_to_dict(x)) == x for x in plan.phases["decode"] + plan.phases["prefill"])
    assert not any(x.early for x in plan.phases["prefill"] if x.kind == "library")


def test_lowerings_read_value_dtypes_not_a_global_one():
    """Each kernel is specialised on the dtype of the values it touches: the logits are fp32 in
    every plan, whatever the plan's activation dtype."""
    plan = compile_plan(EXAMPLES[0], dtype="bfloat16", max_batch=1, max_seq=128)
    g = plan.graph
    lm = [x for x in plan.phases["decode"] if g.nodes[x.node].op == "rms_lm_head"][0]
    assert "_bf16_of32_" in lm.fn
    g.meta["dtype"] = "float32"  # the metadata is a summary for reports; lowering never reads it
    assert lowering.lower_graph(g).kernels == lowering.lower_graph(plan.graph).kernels


def test_a_quantized_weight_lowers_to_the_gemv_that_reads_its_codes():
    """A weight's layout picks the kernel: the int8 O projection decodes through the int8 GEMV (its
    scales right after W in the args) and prefill through dequantize + cuBLAS on the scratch; a
    layout no kernel reads is a one-line error naming the weight, its group size and K."""
    from llamagraph.ir import Quant

    plan = llamagraph.compile_plan(EXAMPLES[0], dtype="float16", max_batch=1, max_seq=64)
    g = plan.graph
    w = g.values["l0.o.w"]
    N, K = w.shape
    g.add_value("l0.o.w.scales", (N,), "float16", "weight", layer=0, role="scales", quant_of="l0.o.w")
    w.dtype, w.quant = "int8", Quant("int8", "l0.o.w.scales")
    low = lowering.lower_graph(g)
    node = next(i for i, n in enumerate(g.nodes) if n.name == "l0.o")
    (dec,) = [x for x in low.phases["decode"] if x.node == node]
    assert dec.fn.startswith("gemv_f16_i8_") and [a.ref for a in dec.args[1:4]] == ["l0.o.w", "l0.o.w.scales", None]
    pre = [x for x in low.phases["prefill"] if x.node == node]
    deq = next(x for x in pre if x.fn.startswith("dequant_i8_f16_"))
    gemm = next(x for x in pre if x.kind == "library")
    assert pre.index(deq) < pre.index(gemm) and gemm.args[1] == deq.args[-1] == workspace(lowering.DEQUANT_SCRATCH)
    assert next(ws for ws in low.workspaces if ws.name == lowering.DEQUANT_SCRATCH).nbytes >= N * K * 2

    g.add_value("l0.o.w.zeros", (N, 2), "float16", "weight", layer=0, role="zeros", quant_of="l0.o.w")
    w.dtype, w.quant = "int4", Quant("int4", "l0.o.w.scales", K // 2 + 16, "l0.o.w.zeros")
    with pytest.raises(llamagraph.PlanError, match=rf"^linear_residual 'l0\.o': %l0\.o\.w is int4 group_size "
                                                    rf"{K // 2 + 16}, K={K}: .*group_size % 32 == 0[^\n]*$"):
        lowering.lower_graph(g)
