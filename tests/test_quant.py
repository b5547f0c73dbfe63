"""Weight-only int8 / int4 quantization (issue #8) on the CPU: the exact schemes on hand-worked
numbers, the quantize_weights pass, the loader, the reference backend against HF transformers
run with the dequantized weights, and the CLI faces."""

import json
import os

import numpy as np
import pytest

import llamagraph
import quant_oracle
from llamagraph.compiler import compile_graph
from llamagraph.ir import Graph, load_config
from llamagraph.ir.dtypes import to_float32
from llamagraph.ir.quant import dequantize, pack_int4, quantize, quantize_int4, quantize_int8, unpack_int4
from numerics import check_against_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_8B = os.path.join(ROOT, "examples", "llama-3-8b.json")


# ---- the schemes, worked by hand ------------------------------------------------------------------

def test_int8_scheme_by_hand():
    # row 0: max |w| = 127/64, so s = 1/64 exactly; w / s = 127, 2.5, 3.5, -127, 0 and rint rounds
    # half to even: 2.5 -> 2, 3.5 -> 4. Row 1 has zero range: s = 1, q = 0.
    w = np.array([[127 / 64, 2.5 / 64, 3.5 / 64, -127 / 64, 0.0], [0, 0, 0, 0, 0]], np.float32)
    q, s = quantize_int8(w)
    assert q.dtype == np.int8
    assert s.tolist() == [1 / 64, 1.0]
    assert q.tolist() == [[127, 2, 4, -127, 0], [0, 0, 0, 0, 0]]


def test_int4_scheme_by_hand():
    # group 0: min -1, max 2.75 -> s = 3.75 / 15 = 0.25, z = rint(4) = 4; w / s = -4, 0, 2.5, 11
    #   q = clamp(rint(w / s) + z) = 0, 4, 6 (2.5 -> 2), 15
    # group 1: min -0.625, max 3.125 -> s = 0.25, z = rint(2.5) = 2 (half to even);
    #   w / s = -2.5, 12.5, 0, 0 -> q = -2 + 2, 12 + 2, 2, 2 (both halves to even)
    # group 2: zero range -> s = 1; min 3 > 0 so z = clamp(rint(-3), 0, 15) = 0; q = 3
    w = np.array([[-1.0, 0.0, 0.625, 2.75, -0.625, 3.125, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0]], np.float32)
    q, s, z = quantize_int4(w, 4)
    assert s.tolist() == [[0.25, 0.25, 1.0]] and z.tolist() == [[4, 2, 0]]
    assert q[0].tolist() == [0, 4, 6, 15, 0, 14, 2, 2, 3, 3, 3, 3]
    deq = dequantize(pack_int4(q), s, z, "int4", 4)
    assert deq[0, :4].tolist() == [-1.0, 0.0, 0.5, 2.75]


def test_int4_packing_is_low_nibble_first():
    q = np.array([[1, 2, 15, 0]], np.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert unpack_int4(packed).tolist() == q.tolist()


def test_scales_are_rounded_to_the_activation_dtype_before_the_codes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32) * 0.02
    codes, scales, zeros = quantize(w, "int4", 32, "float16")
    assert scales.dtype == np.float16 and zeros.dtype == np.float16
    s = scales.astype(np.float32)
    z = zeros.astype(np.float32)
    q = unpack_int4(codes).astype(np.float32).reshape(8, 2, 32)
    # the stored scale is the one the codes were made with: re-deriving q from it gives the same codes
    again = np.clip(np.rint(w.reshape(8, 2, 32) / s[:, :, None]) + z[:, :, None], 0, 15)
    assert (again == q).all()


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_quantization_error_is_bounded_by_half_a_step(scheme, group):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    codes, scales, zeros = quantize(w, scheme, group, "float32")
    deq = dequantize(codes, scales, zeros, scheme, group)
    step = np.repeat(scales, group, axis=1) if scheme == "int4" else scales[:, None]
    assert (np.abs(deq - w) <= 0.5 * step + 1e-6).all()


# ---- the pass -------------------------------------------------------------------------------------

def _hf_dict(overrides=None) -> dict:
    """A tiny model's HF config.json contents."""
    import models

    return models.hf_config(overrides or "gqa").to_dict()


def _tiny(overrides=None):
    return load_config(_hf_dict(overrides))


def test_pass_quantizes_every_linear_weight_and_the_untied_lm_head():
    cfg = _tiny()
    g = compile_graph(cfg, dtype="float16", quantize="int4", group_size=32)
    quantized = {v.name for v in g.values.values() if v.quant is not None}
    matrices = {v.name for v in compile_graph(cfg, dtype="float16").values.values() if v.role == "matrix"}
    assert quantized == matrices and "lm_head.w" in quantized
    assert any(n.startswith("l1.") and "qkv" in n for n in quantized)
    assert g.values["embed.w"].dtype == "float16" and g.values["embed.w"].quant is None
    for name in quantized:
        v = g.values[name]
        N, K = v.shape
        assert v.dtype == "int4" and v.quant.group_size == 32
        for ref in (v.quant.scales, v.quant.zeros):
            assert g.values[ref].shape == (N, K // 32) and g.values[ref].dtype == "float16"
            assert g.values[ref].attrs["quant_of"] == name
    assert g.meta["passes"][-2:] == ["quantize_weights", "plan_memory"]


def test_tied_lm_head_stays_the_embedding():
    g = compile_graph(_tiny("tied"), dtype="float32", quantize="int8")
    assert g.values["embed.w"].quant is None
    assert not any(name.startswith("lm_head") for name in g.values)
    v = next(v for v in g.values.values() if v.quant is not None)
    assert v.dtype == "int8" and g.values[v.quant.scales].shape == (v.shape[0],)


def test_group_size_minus_one_is_one_group_per_row():
    g = compile_graph(_tiny(), dtype="float32", quantize="int4", group_size=-1)
    for v in g.values.values():
        if v.quant is not None:
            assert v.quant.group_size == v.shape[1]


def test_group_size_not_dividing_k_names_the_weight():
    with pytest.raises(llamagraph.ConfigError, match=r"group_size 48 does not divide K=64 of weight '[a-z0-9.]+'"):
        compile_graph(_tiny(), dtype="float32", quantize="int4", group_size=48)


@pytest.mark.parametrize("bad,match", [("int3", "quantize 'int3' is not one of int8, int4"),
                                       ("INT8", "quantize 'INT8'")])
def test_unknown_scheme_is_one_line(bad, match):
    with pytest.raises(llamagraph.ConfigError, match=match):
        compile_graph(_tiny(), quantize=bad)


def test_quantized_graph_round_trips_through_text_and_json():
    g = compile_graph(_tiny(), dtype="bfloat16", quantize="int4", group_size=64)
    for again in (Graph.from_text(str(g)), Graph.from_json(g.to_json())):
        for name, v in g.values.items():
            w = again.values[name]
            assert (w.dtype, w.quant, w.shape) == (v.dtype, v.quant, v.shape)


def test_llama3_8b_int4_holds_at_most_a_third_of_its_fp16_weight_bytes():
    cfg = load_config(EXAMPLE_8B)
    fp16 = compile_graph(cfg, dtype="float16", max_seq=64).meta["memory"]["weight_bytes"]
    int4 = compile_graph(cfg, dtype="float16", max_seq=64, quantize="int4").meta["memory"]["weight_bytes"]
    int8 = compile_graph(cfg, dtype="float16", max_seq=64, quantize="int8").meta["memory"]["weight_bytes"]
    assert int4 <= 0.33 * fp16, int4 / fp16
    assert 0.5 < int8 / fp16 < 0.55


# ---- loading and the reference backend ----------------------------------------------------------

@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_loaded_weights_are_the_scheme_applied_to_the_checkpoint(hf_model, scheme, group):
    import models
    import torch

    model = hf_model("gqa")
    plan = llamagraph.compile(model, dtype="float32", quantize=scheme, group_size=group)
    ex = plan.executor
    w = ex.weights["l0.o.w"]  # the reference backend holds w' (float32)
    src = models.hf_state_dict(model)["model.layers.0.self_attn.o_proj.weight"]
    want = quant_oracle.dequantized_int8(src) if scheme == "int8" else quant_oracle.dequantized_int4(src, group)
    np.testing.assert_allclose(w, want.numpy(), rtol=0, atol=1e-7)
    assert not np.array_equal(w, src.to(torch.float32).numpy())  # it was quantized


@pytest.mark.parametrize("name", ["gqa", "mqa", "bias", "tied", "rope_llama3"])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", -1)])
def test_fp32_quantized_plan_matches_hf_with_dequantized_weights(hf_model, tmp_path, name, scheme, group):
    model = hf_model(name)
    oracle = quant_oracle.write_dequantized(model, str(tmp_path / "dequantized"), scheme, group or 128)
    check_against_hf(model, backend="reference", dtype="float32", tol=5e-4, hf_dir=oracle,
                     quantize=scheme, group_size=group)


def test_quantized_plan_is_not_the_unquantized_one(hf_model):
    """The oracle comparison above would be empty if the plan ignored quantize: it must differ
    from the float plan by more than the tolerance."""
    model = hf_model("gqa")
    prompt = [[3, 9, 27, 81, 50, 11]]
    base = llamagraph.compile(model, dtype="float32")
    q = llamagraph.compile(model, dtype="float32", quantize="int4", group_size=64)
    err = llamagraph.logits_error(q, base, prompt)
    assert err["rel"] > 5e-4
    assert err["max_abs"] == pytest.approx(float(np.abs(q.run(prompt) - base.run(prompt)).max()), rel=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_quantized_plan_reads_its_dequantized_weights(hf_model, dtype):
    """A 16-bit quantized plan gives the logits of the unquantized plan of the same dtype run on its
    w' (only w' rounded to the dtype differs). Against the fp32 quantized plan no tight bound
    holds: int4 codes made with a scale rounded to bf16 flip by whole steps."""
    model = hf_model("gqa")
    prompt = [[3, 9, 27, 81, 50, 11]]
    q = llamagraph.compile(model, dtype=dtype, quantize="int4", group_size=32)
    plain = compile_graph(load_config(model), dtype=dtype)
    deq = {k: w for k, w in q.executor.weights.items() if k in plain.values}
    assert set(deq) == {v.name for v in plain.values.values() if v.kind == "weight"}
    u = llamagraph.compile(model, deq, dtype=dtype)
    a, b = q.run(prompt), u.run(prompt)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < (5e-3 if dtype == "float16" else 3e-2)


def test_random_weights_are_the_quantized_draws_of_the_float_plan():
    cfg = _tiny()
    base = llamagraph.random_weights(compile_graph(cfg, dtype="float32"), seed=3)
    g = compile_graph(cfg, dtype="float32", quantize="int8")
    qw = llamagraph.random_weights(g, seed=3)
    codes, scales, _ = quantize(base["l0.o.w"], "int8", None, "float32")
    assert np.array_equal(qw["l0.o.w"], codes) and np.array_equal(qw["l0.o.w.scales"], scales)
    assert np.array_equal(qw["l0.attn_norm.w"], base["l0.attn_norm.w"])


def test_weights_dict_takes_floats_or_codes():
    cfg = _tiny()
    g = compile_graph(cfg, dtype="float16", quantize="int4", group_size=32)
    rng = np.random.default_rng(1)
    floats, coded = {}, {}
    for v in g.values.values():
        if v.kind != "weight" or "quant_of" in v.attrs:
            continue
        shape = v.concrete_shape(g.dims)
        w = (1.0 + 0.1 * rng.standard_normal(shape) if v.role == "norm" else 0.05 * rng.standard_normal(shape))
        floats[v.name] = w.astype(np.float32)
        if v.quant is None:
            coded[v.name] = floats[v.name]
        else:
            codes, scales, zeros = quantize(floats[v.name], "int4", 32, "float16")
            coded.update({v.name: codes, v.quant.scales: scales, v.quant.zeros: zeros})
    prompt = [[5, 6, 7]]
    a = llamagraph.compile(cfg, floats, dtype="float16", quantize="int4", group_size=32).run(prompt)
    b = llamagraph.compile(cfg, coded, dtype="float16", quantize="int4", group_size=32).run(prompt)
    np.testing.assert_array_equal(a, b)
    bad = dict(coded)
    del bad["l0.o.w.zeros"]
    with pytest.raises(llamagraph.WeightError, match=r"'l0.o.w' is given as codes, so it needs 'l0.o.w.zeros'"):
        llamagraph.compile(cfg, bad, dtype="float16", quantize="int4", group_size=32)
    bad = dict(coded, **{"l0.o.w": coded["l0.o.w"][:, :-1]})
    with pytest.raises(llamagraph.WeightError, match=r"'l0.o.w' is int4 \[64, 64\]"):
        llamagraph.compile(cfg, bad, dtype="float16", quantize="int4", group_size=32)


def test_scales_widen_exactly(hf_model):
    plan = llamagraph.compile(hf_model("gqa"), dtype="bfloat16", quantize="int8")
    g = plan.graph
    v = g.values["l0.o.w"]
    assert g.values[v.quant.scales].dtype == "bfloat16"
    s16 = to_float32(llamagraph.random_weights(g)[v.quant.scales], "bfloat16")
    assert s16.dtype == np.float32 and (s16 > 0).all()


# ---- the CLI --------------------------------------------------------------------------------------

def _cli(*args, capsys):
    from llamagraph.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compile_report_shows_the_weight_bytes_before_and_after(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(_hf_dict()))
    code, out, _ = _cli("compile", cfg, "--quantize", "int4", "--group-size", "32", "-o", tmp_path / "p", capsys=capsys)
    assert code == 0
    fp16 = compile_graph(_tiny(), dtype="float16").meta["memory"]["weight_bytes"]
    int4 = compile_graph(_tiny(), dtype="float16", quantize="int4", group_size=32).meta["memory"]["weight_bytes"]
    assert "quantization:" in out and f"weights {fp16} -> {int4} bytes" in out
    assert "int4, asymmetric, groups of 32 columns" in out
    plan = llamagraph.load(tmp_path / "p", "random")
    assert {v.dtype for v in plan.graph.values.values() if v.quant is not None} == {"int4"}


def test_group_size_needs_int4(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(_hf_dict()))
    code, _, err = _cli("compile", cfg, "--quantize", "int8", "--group-size", "32", capsys=capsys)
    assert code != 0 and "--group-size: only with --quantize int4" in err and "Traceback" not in err


def test_run_prints_the_logits_error_against_the_unquantized_plan(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(_hf_dict()))
    code, out, err = _cli("run", cfg, "--random-weights", "--backend", "reference", "--quantize", "int8",
                          "--quant-error", "--max-new-tokens", "3", capsys=capsys)
    assert code == 0, err
    assert "info: int8 logits against the unquantized plan" in err and "generated ids:" in out


def test_run_refuses_quantize_for_a_compiled_plan(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(_hf_dict()))
    assert _cli("compile", cfg, "-o", tmp_path / "p", capsys=capsys)[0] == 0
    code, _, err = _cli("run", tmp_path / "p", "--random-weights", "--backend", "reference", "--quantize", "int4",
                        capsys=capsys)
    assert code != 0 and "compile it with --quantize instead" in err


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 128)])
def test_quantized_8b_keeps_the_fused_decode_step(scheme, group):
    """The fusions of the speed issue keep working on quantized weights: the same kernels per
    decode step as the fp16 plan, each GEMV reading its weight's codes and scales."""
    from llamagraph.compiler import compile_plan

    base = compile_plan(EXAMPLE_8B, dtype="float16", max_batch=1, max_seq=128)
    plan = compile_plan(EXAMPLE_8B, dtype="float16", max_batch=1, max_seq=128, quantize=scheme, group_size=group)
    assert plan.kernel_launches("decode") == base.kernel_launches("decode") == 5 * 32 + 4
    assert plan.graph.op_counts() == base.graph.op_counts()
    g = plan.graph
    for launch in plan.phases["decode"]:
        refs = {a.ref for a in launch.args if a.kind == "value"}
        for name in refs:
            q = g.values[name].quant
            if q is not None:  # a quantized weight's launch reads its scales (and zeros) too
                assert q.scales in refs and (q.zeros is None or q.zeros in refs)


# ---- "tile16" code order (opt-in: passes/quantize_weights.CODE_ORDER) --------------------------------

def test_tile16_order_puts_each_blocks_chunk_c_of_16_rows_side_by_side():
    """order_codes stores byte j of row n at (n // 16) * 16 * B + ((j // 16) * 16 + n % 16) * 16 + j % 16
    (the address the decode GEMV and the dequantize kernel compute); unorder_codes inverts it."""
    from llamagraph.ir.quant import order_codes, unorder_codes

    rng = np.random.default_rng(0)
    N, B = 48, 64  # 3 blocks of 16 rows, 4 chunks a row
    codes = rng.integers(0, 256, (N, B), dtype=np.uint8)
    stored = order_codes(codes, "tile16")
    assert stored.shape == (N, B) and stored.flags.c_contiguous
    flat = stored.reshape(-1)
    for n in range(N):
        for j in range(B):
            assert flat[(n // 16) * 16 * B + ((j // 16) * 16 + n % 16) * 16 + j % 16] == codes[n, j]
    assert np.array_equal(unorder_codes(stored, "tile16"), codes)
    assert order_codes(codes, None) is codes and unorder_codes(codes, None) is codes
    with pytest.raises(ValueError, match=r"rows % 16 == 0 .* got codes \[40, 64\]"):
        order_codes(codes[:40], "tile16")
    with pytest.raises(ValueError, match="unknown code order 'tile8'"):
        order_codes(codes, "tile8")


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_pass_orders_codes_only_where_asked_and_16_bit(monkeypatch, scheme):
    import importlib

    qw = importlib.import_module("llamagraph.passes.quantize_weights")
    cfg = _tiny()
    opts = dict(quantize=scheme, **({"group_size": 32} if scheme == "int4" else {}))
    other = dict(quantize="int8") if scheme == "int4" else dict(quantize="int4", group_size=32)
    default = compile_graph(cfg, dtype="float16", **opts)
    assert all(v.quant.code_order is None for v in default.values.values() if v.quant is not None)
    monkeypatch.setitem(qw.CODE_ORDER, scheme, "tile16")
    g = compile_graph(cfg, dtype="float16", **opts)
    ordered = {n: v.shape for n, v in g.values.items() if v.quant is not None and v.quant.code_order == "tile16"}
    assert ordered and all(N % 32 == 0 for N, K in ordered.values())
    assert {n for n, v in g.values.items() if v.quant is not None and v.quant.code_order is None} == {
        n for n, v in g.values.items() if v.quant is not None and v.shape[0] % 32}  # (rows not in 16-row blocks)
    for again in (Graph.from_text(str(g)), Graph.from_json(g.to_json())):  # the order travels with the plan
        assert {n: v.quant for n, v in again.values.items() if v.quant} == {n: v.quant for n, v in g.values.items() if v.quant}
    assert all(v.quant.code_order is None for v in compile_graph(cfg, dtype="float32", **opts).values.values()
               if v.quant)
    assert all(v.quant.code_order is None for v in compile_graph(cfg, dtype="float16", **other).values.values()
               if v.quant)  # (the other scheme keeps its own default)


def test_a_code_order_the_kernels_cannot_read_is_a_graph_error():
    from llamagraph.ir.errors import GraphError
    from llamagraph.ir.verify import verify

    g = compile_graph(_tiny(), dtype="float16", quantize="int4", group_size=32)
    v = next(v for v in g.values.values() if v.quant is not None)
    v.quant = type(v.quant)(**{**v.quant.__dict__, "code_order": "tile8"})
    with pytest.raises(GraphError, match="code order 'tile8' is not one of tile16"):
        verify(g)
    v.quant = type(v.quant)(**{**v.quant.__dict__, "code_order": "tile16"})
    verify(g)  # int4 and int8 codes alike, in whole 16-byte chunks of 16-row blocks
    g8 = compile_graph(_tiny(), dtype="float16", quantize="int8")
    w = g8.values["l0.o.w"]
    w.quant = type(w.quant)(**{**w.quant.__dict__, "code_order": "tile16"})
    verify(g8)
    w.shape = (w.shape[0], 72)  # 72 bytes of int8 codes a row: not whole chunks
    with pytest.raises(GraphError, match=r"code order 'tile16' needs N % 16 == 0 and whole 16-byte chunks of int8 "
                                         r"codes a row, got \[64, 72\]"):
        verify(g8)


def test_the_cuda_executor_uploads_codes_in_their_values_order(monkeypatch):
    """CudaExecutor._device_order (called on every weight array it uploads) orders the codes of a
    "tile16" value and leaves every other array as the loader handed it over (numpy stands in for cupy)."""
    import importlib
    from types import SimpleNamespace

    from llamagraph.ir.quant import order_codes
    from llamagraph.runtime.cuda import CudaExecutor

    monkeypatch.setitem(importlib.import_module("llamagraph.passes.quantize_weights").CODE_ORDER, "int4", "tile16")
    g = compile_graph(_tiny(), dtype="float16", quantize="int4", group_size=32)
    fake = SimpleNamespace(graph=g, cp=np)
    rng = np.random.default_rng(1)
    name = next(n for n, v in g.values.items() if v.quant is not None and v.quant.code_order == "tile16")
    codes = rng.integers(0, 256, g.values[name].shape[:1] + (g.values[name].shape[1] // 2,), dtype=np.uint8)
    assert np.array_equal(CudaExecutor._device_order(fake, name, codes), order_codes(codes, "tile16"))
    scales = g.values[name].quant.scales
    arr = rng.standard_normal(g.values[scales].shape).astype(np.float16)
    assert CudaExecutor._device_order(fake, scales, arr) is arr
    assert CudaExecutor._device_order(fake, "embed.w", arr) is arr
