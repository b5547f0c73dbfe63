"""tools/tuning_ab.py's variants patch what they say, and ``base`` puts the package's tunings back
(the tool's timing needs a GPU; its patches do not)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from llamagraph.codegen import attention, dense


@pytest.fixture
def tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "tuning_ab.py"
    spec = importlib.util.spec_from_file_location("tuning_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    # the package's own functions back (``base`` installs wrappers around them)
    d = mod.DEFAULTS
    dense.gemv_default_tuning, dense._quant_tuning, dense.render = d["tuning"], d["quant"], d["render"]
    attention.DECODE_HEADS_PER_BLOCK = d["heads"]
    attention.decode_cluster, attention.render = d["cluster"], d["attn_render"]


def _shapes():
    q = dense.GemvQuant("int4", 128)
    small = dense.gemv_launch("float16", 2048, 5632, 1, "residual")  # TinyLlama down_proj, batch 1
    gate_up = dense.gemv_launch("float16", 2 * 14336, 4096, 1, "silu_mul", prologue="rmsnorm", quant=q)
    attn = attention.attention_decode_launch(1, 32, 4, 64, 256)[0]  # TinyLlama: 4 KV heads of 8
    src = dense.gemv("float16", 2048, 5632, 1, "residual").source
    return small.block[0] // 32, gate_up.smem, attn.grid[0], src


def test_variants_patch_what_they_name(tool):
    tool.patch("base")
    warps, smem, attn_blocks, src = _shapes()
    assert (warps, smem, attn_blocks) == (16, (4096 // 8 + 4) * 16, 16)
    tool.patch("w8")
    assert _shapes()[0] == 8
    tool.patch("nox")
    assert _shapes()[1] < smem  # one batch's slab, restaged per batch
    tool.patch("gpb4")
    assert _shapes()[2] == 8
    tool.patch("gpb8")
    assert _shapes()[2] == 4
    tool.patch("pf0")
    assert "< 0 ? K" in _shapes()[3]
    tool.patch("pf0gu")
    assert "< 0 ? K" not in _shapes()[3]
    assert "< 0 ? K" in dense.gemv("float16", 2 * 5632, 2048, 1, "silu_mul", prologue="rmsnorm", eps=1e-5).source
    tool.patch("pf0res")
    assert "< 0 ? K" in _shapes()[3]
    tool.patch("qpf0gu")
    q4 = dict(prologue="rmsnorm", eps=1e-5, quant=dense.GemvQuant("int4", 128))
    pre_wait = "prefetch_w(W4, w_scales, w_zeros, col0)"  # (a tiled block's next-tile prefetch stays)
    assert pre_wait not in dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", **q4).source
    assert pre_wait in dense.gemv("float16", 6144, 4096, 1, **q4).source
    ahead = "constexpr bool AHEAD = true &&"
    assert ahead in dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", **q4).source
    tool.patch("half")  # one 8-warp block a SM: 7 of gate/up's 896 tiles a block; o_proj 2 a block
    i4 = q4["quant"]
    assert dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", i4).tiles == -(-896 // dense.SMS)
    assert dense._quant_tuning("float16", 4096, 4096, 1, "residual", i4).tiles == 2
    assert dense._quant_tuning("float16", 4096, 4096, 1, "residual", dense.GemvQuant("int8")).tiles == 1
    tool.patch("half8")
    assert dense._quant_tuning("float16", 4096, 4096, 1, "residual", dense.GemvQuant("int8")).tiles == 2
    tool.patch("noahead")
    assert ahead not in dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", **q4).source
    assert "constexpr bool AHEAD = false &&" in dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", **q4).source
    tool.patch("nold")
    assert "lg_pdl_launch_dependents" not in _shapes()[3] and "lg_pdl_launch_dependents" in src
    tool.patch("pf8k")
    assert "< 8192 ? K" in _shapes()[3] and "< 8192 ? K" not in src
    base_attn = attention.attention_decode_fused("float16", 32, 8, 128, 6144, 256).source
    tool.patch("nocl")
    assert "LG_CLUSTER_Z" not in attention.attention_decode_fused("float16", 32, 8, 128, 6144, 256).source
    tool.patch("late")
    late = attention.attention_decode_fused("float16", 32, 8, 128, 6144, 256).source
    assert late.count("load_batch(kb, pos_t)") == 0 and late.count("load_batch(kb, -1)") == 2
    q = dense.GemvQuant("int4", 128)
    assert dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", q).tag() == "w8u1pxt4"
    for variant, want in (("gu1p", "w4u1pxt4"), ("gu4u2", "w4u2xt4")):
        tool.patch(variant)
        assert dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", q).tag() == want
    tool.patch("w4p")
    assert dense._quant_tuning("float16", 6144, 4096, 1, "none", q).tag() == "w4u2px"
    assert dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", q).tag() == "w8u1pxt4"
    tool.patch("nopers")  # one tile a block, and the LM head's 4 unpipelined steps as before tiles
    assert dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", q).tag() == "w8u1px"
    assert dense._quant_tuning("float16", 128256, 4096, 1, "none", q).tag() == "w4u4x"
    q8 = dense.GemvQuant("int8")
    gu8 = dense._quant_tuning("float16", 2 * 11008, 4096, 1, "silu_mul", q8)
    assert gu8.tiles == 1
    tool.patch("t8gu")
    assert dense._quant_tuning("float16", 2 * 11008, 4096, 1, "silu_mul", q8) == replace(gu8, tiles=3)
    assert dense._quant_tuning("float16", 32000, 4096, 1, "none", q8).tiles == 1
    tool.patch("t8")
    assert dense._quant_tuning("float16", 32000, 4096, 1, "none", q8).tiles == 8
    tool.patch("nocl_late")
    both = attention.attention_decode_fused("float16", 32, 8, 128, 6144, 256).source
    assert "LG_CLUSTER_Z" not in both and both.count("load_batch(kb, -1)") == 2
    qkv = dict(prologue="rmsnorm", eps=1e-5)
    early = dense.gemv("float16", 2560, 2048, 1, **qkv).source
    tool.patch("wlate")
    late = dense.gemv("float16", 2560, 2048, 1, **qkv).source
    assert "EARLY_W = NORM &&" in early and "EARLY_W = false;" in late
    bf = dict(prologue="rmsnorm", eps=1e-5)
    assert "EARLY_W = false;" in dense.gemv("bfloat16", 2 * 5632, 2048, 1, "silu_mul", **bf).source
    tool.patch("bf16early")
    assert "EARLY_W = NORM &&" in dense.gemv("bfloat16", 2 * 5632, 2048, 1, "silu_mul", **bf).source
    tool.patch("base")
    assert _shapes()[:3] == (warps, smem, attn_blocks)
    assert dense.gemv("float16", 2560, 2048, 1, **qkv).source == early
    assert attention.attention_decode_fused("float16", 32, 8, 128, 6144, 256).source == base_attn
