"""Quantized weights on the CPU side of codegen (issue #8): the int8 / int4 GEMVs and the prefill
dequantize kernel render, name every constant, compile through NVRTC without spills for every
variant a lowering can produce, and quantized plans lower (decode GEMVs read the codes, prefill
dequantizes into the shared scratch that cuBLAS reads); layouts no kernel reads are one-line errors.

Numerics are the GPU tests' business (tests/gpu/test_kernels_quant_gemv.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace

import numpy as np
import pytest

import llamagraph
from llamagraph.codegen import dense, lowering, nvrtc
from llamagraph.codegen.launch import NULL, value, workspace
from llamagraph.codegen.render import module_source
from llamagraph.compiler import compile_plan
from llamagraph.ir.quant import order_codes

DTYPES = ("float16", "bfloat16", "float32")
QUANTS = (dense.GemvQuant("int8"), dense.GemvQuant("int4", 32), dense.GemvQuant("int4", 64),
          dense.GemvQuant("int4", 128))
ROW_TILES = (1, 8, 16)
EPS = 1e-5
ROPE = dense.RopeEpilogue(32, 8, 128, "rotate_half", 2048)
# (N, K, epilogue, prologue, bias, out_dtype): every combination the GEMM lowerings emit
SHAPES = [
    (4096, 4096, "residual", "none", False, None),  # o_proj + residual (Llama-2-7B)
    (4096, 11008, "residual", "none", True, None),  # down + residual: several batches and a ragged last one
    (2 * 11008, 4096, "silu_mul", "rmsnorm", False, None),  # rms_gate_up_silu
    (2 * 5632, 2048, "silu_mul", "none", True, None),  # gate_up_silu, unfused norm
    ((ROPE.H + 2 * ROPE.KV) * ROPE.HD, 4096, "rope", "rmsnorm", True, None),  # rms_qkv_rope_kv_append
    (32000, 4096, "none", "rmsnorm", False, "float32"),  # rms_lm_head / token_logprobs: fp32 logits
    (2560, 2048, "none", "none", True, None),  # unfused qkv_gemm with bias
    (100, 256, "none", "none", True, None),  # ragged N
    (2 * 192, 64, "silu_mul", "rmsnorm", True, None),  # K below one int4 step (tiny models)
]


def _fits(q: dense.GemvQuant, K: int) -> bool:
    return q.scheme == "int8" or K % q.group_size == 0


def _kernel(dtype, q, rt, N, K, epi, pro, bias, out_dtype):
    return dense.gemv(dtype, N, K, rt, epi, bias, out_dtype if dtype != "float32" else None, prologue=pro,
                      eps=EPS if pro == "rmsnorm" else 0.0, rope=ROPE if epi == "rope" else None, quant=q)


def _variants(dtype: str) -> list:
    ks = []
    for q in QUANTS:
        for rt in ROW_TILES:
            for N, K, epi, pro, bias, od in SHAPES:
                if _fits(q, K) and not (epi == "rope" and dtype == "float32"):
                    ks.append(_kernel(dtype, q, rt, N, K, epi, pro, bias, od))
    return ks


def _require_compiler():
    if nvrtc.available() is None:
        pytest.skip("no CUDA compiler here: pip install nvidia-cuda-nvrtc (or put nvcc on PATH)")


@functools.lru_cache(maxsize=None)
def _compiled(dtype: str):
    ks = _variants(dtype)
    return ks, nvrtc.compile_source(module_source(ks), arch="sm_90")


# ---- names and sources ----------------------------------------------------------------------------

def test_names_encode_scheme_and_group():
    ks = [dense.gemv("float16", 4096, 4096, 8, quant=q) for q in QUANTS]
    ks += [dense.gemv("float16", 4096, 4096, 8), dense.gemv("bfloat16", 4096, 4096, 8, quant=QUANTS[1]),
           dense.gemv("float16", 4096, 4096, 8, quant=dense.GemvQuant("int4", 4096))]
    names = [k.name for k in ks]
    assert len(set(names)) == len(names) and all(n.isidentifier() for n in names)
    assert "_i8_" in names[0] and "_i4g32_" in names[1] and "_i4g128_" in names[3] and "_i4g4096_" in names[-1]
    deq = [dense.dequant(dt, 4096, 4096, q) for q in QUANTS for dt in DTYPES]
    assert len({k.name for k in deq}) == len(deq)
    # a quantized kernel's args: scales and zeros right after W
    src = dense.gemv("float16", 4096, 4096, 8, quant=QUANTS[2]).source
    assert "const unsigned char* W, const unsigned short* w_scales, const unsigned short* w_zeros, const unsigned short* bias" in src


def test_rendering_is_deterministic():
    for dtype in DTYPES:
        a, b = _variants(dtype), _variants(dtype)
        assert [k.name for k in a] == [k.name for k in b]
        assert module_source(a).encode() == module_source(b).encode()


def test_sources_show_their_paths():
    """16-bit activations stay on tensor cores; fp32 stays exact on CUDA cores; whole-step int4 groups
    take the scale once per step, smaller ones per code."""
    f16 = dense.gemv("bfloat16", 4096, 4096, 8, quant=dense.GemvQuant("int4", 128)).source
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in f16 and "FOLD = true" in f16
    assert "FOLD = false" in dense.gemv("float16", 4096, 4096, 8, quant=dense.GemvQuant("int4", 64)).source
    fp32 = dense.gemv("float32", 4096, 4096, 8, quant=dense.GemvQuant("int4", 64)).source
    assert "mma.sync" not in fp32 and "__fmul_rn(code(" in fp32
    assert "w_scales[m * N_OUT + col]" in dense.gemv("float16", 4096, 4096, 8, quant=QUANTS[0]).source  # int8: after the sums


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dense.gemv("float16", 64, 96, 1, quant=dense.GemvQuant("int4", 48)), r"group_size 48, K=96: .*% 32"),
        (lambda: dense.gemv("float16", 64, 96, 1, quant=dense.GemvQuant("int4", 64)), r"group_size 64, K=96"),
        (lambda: dense.gemv("float16", 64, 72, 1, quant=dense.GemvQuant("int8")), r"K=72: .*K % 16 == 0"),
        (lambda: dense.gemv("float16", 64, 64, 1, quant=dense.GemvQuant("int8", 32)), "one scale per row"),
        (lambda: dense.gemv("float16", 64, 64, 1, quant=dense.GemvQuant("int3", 32)), "scheme"),
        (lambda: dense.gemv("float16", 64, 64, 1, quant=("int4", 32)), "GemvQuant"),
        (lambda: dense.dequant("float16", 64, 96, dense.GemvQuant("int4", 48)), "group_size 48"),
    ],
)
def test_layouts_no_kernel_reads_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_launch_shapes():
    q = dense.GemvQuant("int4", 128)
    for rt in ROW_TILES:
        k = dense.gemv("float16", 4096, 4096, rt, quant=q)
        shape = dense.gemv_launch("float16", 4096, 4096, rt, quant=q)
        tuning = dense.gemv_default_tuning("float16", 4096, 4096, rt, quant=q)
        # one block per 16 output columns, the x slab as dynamic shared memory (the template asserts its size)
        assert shape.grid == (256, 1, 1) and shape.block == (tuning.warps * 32, 1, 1)
        assert shape.smem == dense.gemv_quant_smem("float16", 4096, rt, tuning, q) > 0
        assert f"== {shape.smem}, " in k.source
    assert dense.gemv_launch("float16", 2 * 11008, 4096, 8, "silu_mul", quant=q).grid == (688, 1, 1)
    assert dense.gemv_launch("float32", 100, 256, 8, quant=q).smem == 0  # CUDA cores: no slab
    d = dense.dequant_launch(100, 256)
    assert d.grid[0] * d.block[0] >= 100 * 256 // 8


def test_batch_one_blocks_stage_their_whole_x_row_once():
    """A row tile of 1 with more than one batch of steps stages the whole x row in shared memory once
    (no barrier between batches), where it fits 48 KB; larger row tiles stage one batch at a time."""
    q = dense.GemvQuant("int4", 128)
    gate_up = (2 * 14336, 4096, "silu_mul", "rmsnorm")  # Llama-3-8B: 4 pipelined batches of 8 steps (8 warps x 1)
    t = dense.gemv_default_tuning("float16", *gate_up[:2], 1, gate_up[2], gate_up[3], q)
    assert t.whole_x and t.pipeline and (t.warps, t.unroll) == (8, 1)
    k = dense.gemv("float16", *gate_up[:2], 1, gate_up[2], prologue=gate_up[3], eps=EPS, quant=q)
    assert "constexpr bool WHOLE = true;" in k.source and "_w8u1" not in k.name  # the default: no tag
    # every column of x: K / 8 units of 16 bytes, plus the row's 4 units of padding
    assert dense.gemv_launch("float16", *gate_up[:2], 1, gate_up[2], prologue=gate_up[3], quant=q).smem == \
        (4096 // 8 + 4) * 16
    rt8 = dense.gemv_default_tuning("float16", *gate_up[:2], 8, gate_up[2], gate_up[3], q)
    assert not rt8.whole_x
    assert "constexpr bool WHOLE = false;" in dense.gemv("float16", *gate_up[:2], 8, gate_up[2], prologue=gate_up[3],
                                                          eps=EPS, quant=q).source
    # one batch (o_proj, 8 warps x 4 steps = the whole row): nothing to save
    assert not dense.gemv_default_tuning("float16", 4096, 4096, 1, "residual", quant=q).whole_x
    # int8 down_proj of Llama-2-7B: K 11008 in 6 batches, 22 KB of x
    t8 = dense.gemv_default_tuning("float16", 4096, 11008, 1, "residual", quant=dense.GemvQuant("int8"))
    assert t8.whole_x and dense.gemv_quant_smem("float16", 11008, 1, t8, dense.GemvQuant("int8")) <= 48 * 1024
    # Llama-3-70B's down_proj: a 57 KB row does not fit
    assert not dense.gemv_default_tuning("float16", 8192, 28672, 1, "residual", quant=q).whole_x
    with pytest.raises(ValueError, match="whole x"):
        dense.gemv("float16", 64, 64, 1, tuning=dense.GemvTuning(8, 2, whole_x=True))


def test_batch_one_grids_past_the_resident_blocks_walk_several_column_tiles():
    """A quantized batch-1 GEMV whose 16-column tiles outnumber the blocks that fit at once (SMS x
    min_blocks) takes several tiles a block: the grid is resident whole and x is staged once."""
    q = dense.GemvQuant("int4", 128)
    slots = dense.SMS * 2  # 8-warp blocks
    t = dense.gemv_default_tuning("float16", 28672, 4096, 1, "silu_mul", "rmsnorm", q)  # Llama-3-8B gate/up
    assert t.tiles == -(-14336 // 16 // slots) and t.tiles > 1
    shape = dense.gemv_launch("float16", 28672, 4096, 1, "silu_mul", prologue="rmsnorm", quant=q)
    assert shape.grid[0] == -(-896 // t.tiles) <= slots
    src = dense.gemv("float16", 28672, 4096, 1, "silu_mul", prologue="rmsnorm", eps=EPS, quant=q).source
    assert "tile += gridDim.x" in src
    # 4 pipelined batches a tile: the next tile's first codes are requested behind this tile's last batch
    assert "constexpr bool AHEAD = true && NB % 2 == 0;" in src and "else if (AHEAD && tile + (int)gridDim.x < NTILES)" in src
    # 4-warp blocks (4 a SM) of the LM head: several tiles, in pipelined batches of 2 steps (4 spill)
    head = dense.gemv_default_tuning("float16", 128256, 4096, 1, "none", "rmsnorm", q)
    assert head.tiles == -(-8016 // (4 * dense.SMS)) and (head.warps, head.unroll, head.pipeline) == (4, 2, True)
    # a qkv grid past the 4-warp slots (Llama-2-7B: 768 tiles) takes 8 warps walking 3 tiles in pipelined
    # batches of 2 steps, x staged once; the 8B's (384 tiles, one a 4-warp block) and the heads keep 4 warps
    qkv7 = dense.gemv_default_tuning("float16", 12288, 4096, 1, "rope", "rmsnorm", q)
    assert qkv7 == dense.GemvTuning(8, 2, pipeline=True, whole_x=True, tiles=3)
    assert dense.gemv_launch("float16", 12288, 4096, 1, "rope", prologue="rmsnorm", quant=q).grid == (256, 1, 1)
    qkv8 = dense.gemv_default_tuning("float16", 6144, 4096, 1, "rope", "rmsnorm", q)
    assert (qkv8.warps, qkv8.tiles) == (4, 1)
    assert dense.gemv_default_tuning("float16", 32000, 4096, 1, "none", "rmsnorm", q).warps == 4
    assert dense.gemv_default_tuning("float16", 12288, 4096, 1, "rope", "rmsnorm", dense.GemvQuant("int8")).tiles == 1
    # a grid that fits, a batch of 8 rows, fp16 weights: one tile a block, no loop in the source
    assert dense.gemv_default_tuning("float16", 4096, 4096, 1, "residual", quant=q).tiles == 1
    assert dense.gemv_default_tuning("float16", 28672, 4096, 8, "silu_mul", "rmsnorm", q).tiles == 1
    assert dense.gemv_default_tuning("float16", 28672, 4096, 1, "silu_mul", "rmsnorm").tiles == 1
    assert "gridDim.x" not in dense.gemv("float16", 4096, 4096, 1, "residual", quant=q).source
    assert "AHEAD" not in dense.gemv("float16", 4096, 4096, 1, "residual", quant=q).source
    with pytest.raises(ValueError, match="several tiles"):
        dense.gemv("float16", 4096, 4096, 1, tuning=dense.GemvTuning(8, 2, tiles=2))



def test_ahead2_is_an_opt_in_of_pipelined_tile_walks_that_compiles():
    """GemvTuning.ahead2 (the next tile's first two batches requested behind this tile's last) is
    off by default, refused where a block has no next tile or no second set of codes, and its
    Llama-2-7B int4 kernels compile for sm_90 (the qkv without spills)."""
    q = dense.GemvQuant("int4", 128)
    rope7 = dense.RopeEpilogue(32, 32, 128, "rotate_half", 2048)
    qkv7 = dict(prologue="rmsnorm", eps=EPS, rope=rope7, quant=q)
    assert not dense.gemv_default_tuning("float16", 12288, 4096, 1, "rope", "rmsnorm", q).ahead2
    assert "AHEAD2" not in dense.gemv("float16", 12288, 4096, 1, "rope", **qkv7).source  # (nor in its source)
    for bad in (dense.GemvTuning(8, 2, pipeline=True, whole_x=True, ahead2=True),
                dense.GemvTuning(8, 2, whole_x=True, tiles=3, ahead2=True)):
        with pytest.raises(ValueError, match="ahead2"):
            dense.gemv("float16", 12288, 4096, 1, "rope", tuning=bad, **qkv7)
    _require_compiler()
    ks = {}
    for dt in ("float16", "bfloat16"):
        for name, (N, K, epi, od) in {"qkv": (12288, 4096, "rope", None), "gate_up": (2 * 11008, 4096, "silu_mul", None),
                                      "head": (32000, 4096, "none", "float32")}.items():
            kw = qkv7 if epi == "rope" else dict(prologue="rmsnorm", eps=EPS, quant=q)
            t = replace(dense.gemv_default_tuning(dt, N, K, 1, epi, "rmsnorm", q), ahead2=True)
            ks[dt, name] = k = dense.gemv(dt, N, K, 1, epi, out_dtype=od, tuning=t, **kw)
            assert "constexpr bool AHEAD2 = AHEAD;" in k.source and k.name.endswith("a2")
    res = nvrtc.compile_source(module_source(list(ks.values())), arch="sm_90")
    for (dt, name), k in ks.items():
        r = res.kernels[k.name]
        assert 0 < r.registers <= 128, (k.name, r)
        if name == "qkv":
            assert r.spill_stores == r.spill_loads == r.stack_bytes == 0, (k.name, r)


# ---- every variant compiles, without spills --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_every_quantized_gemv_compiles_without_spills(dtype):
    _require_compiler()
    ks, res = _compiled(dtype)
    assert len(ks) > 80
    for k in ks:
        r = res.kernels[k.name]
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack_bytes == 0, (k.name, r)
        # the launch bounds' budget: 256 threads x 2 blocks (fp32) or 128 x 4 (16-bit) a SM
        assert 0 < r.registers <= 128, (k.name, r)


def test_dequantize_kernels_compile():
    _require_compiler()
    ks = [dense.dequant(dt, N, K, q) for dt in DTYPES for q in QUANTS for N, K in ((100, 256), (4096, 11008))
          if _fits(q, K)]
    res = nvrtc.compile_source(module_source(ks), arch="sm_90")
    for k in ks:
        assert res.kernels[k.name].spill_stores == 0, k.name


# ---- quantized plans lower ------------------------------------------------------------------------

def _tiny(name: str = "gqa") -> dict:
    import models

    return models.hf_config(name).to_dict()


@pytest.mark.parametrize("scheme,group", [("int4", 64), ("int4", 32), ("int4", -1), ("int8", None)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_quantized_plan_lowers_and_compiles(scheme, group, dtype):
    plan = compile_plan(_tiny(), dtype=dtype, max_batch=2, max_seq=64, quantize=scheme, group_size=group)
    g = plan.graph
    quantized = {n for n, v in g.values.items() if v.quant is not None}
    assert quantized
    tag = "i8" if scheme == "int8" else "i4g"
    dec = [x for x in plan.phases["decode"] if len(x.args) > 1 and x.args[1].ref in quantized]
    # every GEMM of the decode step reads its codes through a quantized GEMV, scales (and zeros) after W
    gemms = [n for n in g.nodes if any(i in quantized for i in n.inputs)]
    assert len({x.node for x in dec}) == len(gemms) > 0
    for x in dec:
        q = g.values[x.args[1].ref].quant
        assert x.fn.startswith("gemv_") and f"_{tag}" in x.fn
        assert x.args[2] == value(q.scales) and x.args[3] == (value(q.zeros) if q.zeros else NULL)
    # prefill above two row tiles: dequantize into the scratch, then cuBLAS reads the scratch
    pre = plan.phases["prefill"]
    for i, x in enumerate(pre):
        if x.kind == "library" and x.args[1].kind == "workspace":
            assert x.args[1] == workspace(lowering.DEQUANT_SCRATCH)
            deq = [y for y in pre[:i] if y.node == x.node and y.fn.startswith("dequant_")]
            assert deq and deq[-1].fn.startswith(f"dequant_{tag}") and deq[-1].args[-1] == x.args[1]
            assert deq[-1].args[0].ref in quantized and deq[-1].args[0].ref in g.nodes[x.node].inputs  # its own W
    assert not [x for x in pre if x.kind == "library" and x.args[1].kind == "value" and x.args[1].ref in quantized]
    # each node reading a quantized weight dequantizes it for its cuBLAS path
    assert {x.node for x in pre if x.fn.startswith("dequant_")} == set(range(len(g.nodes))) & {
        i for i, n in enumerate(g.nodes) if any(v in quantized for v in n.inputs)}
    scratch = plan.workspace(lowering.DEQUANT_SCRATCH)
    itemsize = 4 if dtype == "float32" else 2
    assert scratch.nbytes == max(v.shape[0] * v.shape[1] * itemsize for v in (g.values[n] for n in quantized))
    if nvrtc.available() is not None:
        res = nvrtc.compile_source(plan.source, "sm_90")
        assert set(plan.kernels) <= set(res.kernels)
        assert not {k: r for k, r in res.kernels.items() if r.spill_stores or r.spill_loads}


def test_int8_gate_up_asks_l2_for_no_later_batch_before_its_wait():
    """int8 gate/up GEMVs request their first batch of codes before the PDL wait and nothing more (the
    L2 prefetch of later batches there cost the 7B int8 step 2.8%); int4 gate/up and the other int8
    GEMVs keep it."""
    pre_wait = "prefetch_w(W4, w_scales, w_zeros, col0);"
    rms = dict(prologue="rmsnorm", eps=EPS)
    for dtype in ("float16", "bfloat16"):
        int8 = dense.GemvQuant("int8")
        gu8 = dense.gemv(dtype, 2 * 11008, 4096, 1, "silu_mul", quant=int8, **rms).source
        assert "load_codes(ca, 0" in gu8 and pre_wait not in gu8
        assert pre_wait in dense.gemv(dtype, 2 * 14336, 4096, 1, "silu_mul", quant=dense.GemvQuant("int4", 128), **rms).source
        assert pre_wait in dense.gemv(dtype, 4096, 11008, 1, "residual", quant=int8).source
        assert pre_wait in dense.gemv(dtype, 12288, 4096, 1, quant=int8, **rms).source


def test_quantized_decode_kernels_wait_before_reading_activations():
    """Programmatic dependent launch: before lg_pdl_wait a quantized GEMV reads weights only: it
    requests its first batch of codes (and their scales and zeros) and prefetches later ones; x and
    the output only after the wait. The residual too, but in a kernel built to read it early (its
    launch declares it in ``reads_early``, which the plan's check proves safe)."""
    for scheme, group in (("int4", 32), ("int8", None)):
        plan = compile_plan(_tiny(), dtype="float16", max_batch=2, max_seq=64, quantize=scheme, group_size=group)
        names = {x.fn for x in plan.phases["decode"] if x.fn.startswith("gemv_")}
        assert names and all(f"_{dense.GemvQuant(scheme, group).tag()}_" in n for n in names)
        for name in names:
            entry = plan.source.split(f"{name}(", 2)[-1]
            entry = entry[: entry.index("\n}\n")]
            assert "lg_pdl_wait" not in entry and "[" not in entry[: entry.index("_impl::run(")], name  # run() waits
            impl = plan.source.split(f"namespace {name}_impl {{", 1)[1]
            impl = impl[: impl.index(f"}}  // namespace {name}_impl")]
            body = impl[impl.index("__device__ __forceinline__ void run("):]
            body = body[body.index(") {") + 3:]
            before = body[: body.index("lg_pdl_wait();")]
            before = "\n".join(line.split("//")[0] for line in before.splitlines() if "__shared__" not in line)
            assert "load_codes(ca, 0, " in before, name
            early = name.endswith("_res_re")
            launches = [x for x in plan.phases["decode"] if x.fn == name]
            assert all(bool(x.reads_early) == early for x in launches), name
            if early:  # the residual element is read before the wait, and only where RES_EARLY
                assert re.search(r"if \(RES_EARLY\) \{[^}]*res\[", before), name
                before = re.sub(r"if \(RES_EARLY\) \{[^}]*\}", "", before)
            # no activation pointer (x, res, out, the staged slab) is touched before the wait
            assert not re.search(r"(?<![.\w])(x|x4|res|out|s_rstd|stage|row_rstd|batch)(?!\w)", before), name


def test_a_quantized_lm_head_serves_the_prompt_logprobs():
    """token_logprobs: the decode GEMV reads the LM head's codes; prefill dequantizes it once (when
    the logprobs are wanted) and every chunk's cuBLAS call reads the scratch."""
    plan = compile_plan(_tiny(), dtype="float16", max_batch=4, max_seq=64, max_tokens=200, quantize="int8")
    g = plan.graph
    node = next(i for i, n in enumerate(g.nodes) if n.op == "token_logprobs")
    head = g.nodes[node].inputs[2]
    assert g.values[head].quant is not None
    dec = [x for x in plan.phases["decode"] if x.node == node]
    assert dec[0].fn.startswith("gemv_f16_of32_i8_") and dec[0].args[1] == value(head)
    pre = [x for x in plan.phases["prefill"] if x.node == node]
    assert pre[0].fn.startswith("dequant_i8_f16_") and pre[0].on_demand
    gemms = [x for x in pre if x.kind == "library"]
    chunks = -(-g.dims["T"] // lowering.LOGPROB_CHUNK)
    assert len(gemms) == chunks > 1 and all(x.args[1] == workspace(lowering.DEQUANT_SCRATCH) for x in gemms)
    assert [x.fn for x in pre].count(pre[0].fn) == 1  # dequantized once for all the chunks


def test_a_group_size_no_kernel_reads_is_a_one_line_error():
    """group 16 divides every K of the tiny model, so the pass accepts it; the GEMV reads 32 columns
    of one group at a time and the lowering says so, naming the weight, G and K."""
    with pytest.raises(llamagraph.PlanError) as err:
        compile_plan(_tiny(), dtype="float16", max_batch=1, max_seq=64, quantize="int4", group_size=16)
    msg = str(err.value)
    assert "\n" not in msg and "group_size 16, K=64" in msg and "% 32 == 0" in msg
    assert "%l0." in msg and ".w is int4" in msg


# scheme -> (group size, kernel-name tag, where the dequantize kernel reads a unit's codes, that load's bytes)
TILE16_CASES = {
    "int4": (32, "_i4g32c16_", ("const int j = c / 2;", "reinterpret_cast<const unsigned*>(W)["), 4),
    "int8": (None, "_i8c16_", ("reinterpret_cast<const uint2*>(W)[",), 8),
}


@pytest.mark.parametrize("scheme", sorted(TILE16_CASES))
def test_tile16_codes_lower_to_kernels_that_read_them(monkeypatch, scheme):
    """With int8 or int4 codes stored "tile16" (opt-in) every decode GEMV and prefill dequantize kernel of
    the quantized weights reads that order (c16 in its name, the chunk-major address in its source) and
    the plan compiles; where the GEMV cannot read it (fp32, ragged tiles) it is refused."""
    import importlib

    group, tag, address, unit_bytes = TILE16_CASES[scheme]
    monkeypatch.setitem(importlib.import_module("llamagraph.passes.quantize_weights").CODE_ORDER, scheme, "tile16")
    plan = compile_plan(_tiny(), dtype="float16", max_batch=2, max_seq=64, quantize=scheme,
                        **({"group_size": group} if group else {}))
    g = plan.graph
    ordered = {n for n, v in g.values.items() if v.quant is not None and v.quant.code_order == "tile16"}
    assert ordered
    for phase, prefix in (("decode", "gemv_"), ("prefill", "dequant_")):
        reading = [x for x in plan.phases[phase] if x.fn.startswith(prefix) and x.args[1 if prefix == "gemv_" else 0].ref in ordered]
        assert reading and all(tag in x.fn for x in reading), phase
    src = plan.source
    assert "(ok ? c : 0u) * 16u" in src and "(m * N_OUT + first) * C + (g + 8 * h)" in src  # the GEMV
    assert "* 16 + (int)(n % 16)) * 16 + " in src  # the dequantize kernel
    # the dequantize kernel is the row-order one but for where a unit's code bytes are read: at byte
    # (n / 16) * 16 * B + ((j / 16) * 16 + n % 16) * 16 + j % 16 of B bytes a row, which holds
    # codes[n, j : j + unit_bytes] (j: the unit's first byte of its row)
    rows_src, tiled_src = (k.source.replace(k.name, "NAME") for k in (
        dense.dequant("float16", 64, 256, dense.GemvQuant(scheme, group, order)) for order in (None, "tile16")))
    address = ("tile16", "const lg_i64 at =") + address
    same = [[ln for ln in src.splitlines() if not any(a in ln for a in address)] for src in (rows_src, tiled_src)]
    assert same[0] == same[1] and "f[e] = __fmul_rn(" in tiled_src and rows_src != tiled_src
    B = 256 * unit_bytes // 8  # bytes a row of K = 256 codes
    codes = np.random.default_rng(5).integers(0, 256, (64, B), dtype=np.uint8)
    flat = order_codes(codes, "tile16").reshape(-1)
    for n in (0, 5, 17, 63):
        for c in range(0, 256, 8):
            j = c * unit_bytes // 8
            at = (n // 16) * 16 * B + ((j // 16) * 16 + n % 16) * 16 + j % 16
            assert at % unit_bytes == 0 and np.array_equal(flat[at: at + unit_bytes], codes[n, j: j + unit_bytes])
    q = dense.GemvQuant(scheme, group and 128, "tile16")
    with pytest.raises(ValueError, match="needs 16-bit activations and whole 16-column tiles"):
        dense.gemv("float32", 4096, 4096, 1, quant=q)
    with pytest.raises(ValueError, match="N_out=200"):
        dense.gemv("float16", 400, 4096, 1, "silu_mul", quant=q)
    with pytest.raises(ValueError, match="'tile16' order"):
        dense.GemvQuant(scheme, group, "tile8").check(4096)
    if nvrtc.available() is not None:
        res = nvrtc.compile_source(plan.source, "sm_90")
        assert set(plan.kernels) <= set(res.kernels)
        assert not {k: r for k, r in res.kernels.items() if r.spill_stores or r.spill_loads}


def test_zsum_is_an_opt_in_whose_step_sums_give_the_zero_subtracted_sum():
    """GemvTuning.zsum (opt-in): the mma sums the codes as the magic-exponent values nibbles() makes
    (fp16: 1024 + q for the even columns of each 8-column unit, 1024 + 16 q for the odd ones, whose x
    is staged / 16; bf16: 128 + q), and each step's sum loses MAGIC * A + z * X (A: the staged x
    values summed, X: the x values the codes multiply): the identity, exactly, on random steps. The
    kernels compile; a layout without whole-step groups or a whole staged row is refused."""
    rng = np.random.default_rng(3)
    for magic, scaled in ((1024.0, True), (128.0, False)):
        for _ in range(20):
            q = rng.integers(0, 16, 128).astype(np.float64)
            x = (rng.uniform(0.01, 4.0, 128) * rng.choice([-1, 1], 128)).astype(np.float16).astype(np.float64)
            z = float(rng.integers(0, 16))
            high = (np.arange(128) % 8) % 2 == 1 if scaled else np.zeros(128, bool)
            v = np.where(high, (x / 16).astype(np.float16).astype(np.float64), x)  # the staged values
            codes = np.where(high, magic + 16 * q, magic + q)
            part = float(codes @ v)
            A, X = float(v.sum()), float(np.where(high, 16 * v, v).sum())
            x_eff = np.where(high, 16 * v, v)
            assert part - magic * A - z * X == pytest.approx(float((q - z) @ x_eff), abs=1e-9)
            assert np.array_equal(x_eff, x)  # (x / 16 is exact in fp16 above 2^-10: no subnormals)
    q4 = dense.GemvQuant("int4", 128)
    t = replace(dense.gemv_default_tuning("float16", 2 * 11008, 4096, 1, "silu_mul", "rmsnorm", q4), zsum=True)
    assert not dense.gemv_default_tuning("float16", 2 * 11008, 4096, 1, "silu_mul", "rmsnorm", q4).zsum
    k = dense.gemv("float16", 2 * 11008, 4096, 1, "silu_mul", prologue="rmsnorm", eps=EPS, quant=q4, tuning=t)
    assert "stage_zsum(" in k.source and "MAGIC_F * sums.x" in k.source and k.name.endswith("zs")
    for bad_q, bad_t in ((dense.GemvQuant("int4", 64), t), (q4, replace(t, whole_x=False))):
        with pytest.raises(ValueError, match="zsum is for int4 groups of whole 128-column steps"):
            dense.gemv("float16", 2 * 11008, 4096, 1, "silu_mul", prologue="rmsnorm", eps=EPS, quant=bad_q, tuning=bad_t)
    _require_compiler()
    res = nvrtc.compile_source(module_source([k]), arch="sm_90")
    r = res.kernels[k.name]
    assert 0 < r.registers <= 128 and r.spill_stores == 0, r
