"""tools/tuning_ab.py's variants patch what they say, and ``base`` puts the package's tunings back
(the tool's timing needs a GPU; its patches do not)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from llamagraph.codegen import dense

I4 = dense.GemvQuant("int4", 128)
I8 = dense.GemvQuant("int8")
Q4 = dict(prologue="rmsnorm", eps=1e-5, quant=I4)


@pytest.fixture
def tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "tuning_ab.py"
    spec = importlib.util.spec_from_file_location("tuning_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    # the package's own functions back (``base`` installs wrappers around them), and its code orders
    dense._quant_tuning, dense.render = mod.DEFAULTS["quant"], mod.DEFAULTS["render"]
    mod.quantize_weights.CODE_ORDER.update(mod.DEFAULTS["code_order"])


def _gate_up_smem():
    return dense.gemv_launch("float16", 2 * 14336, 4096, 1, "silu_mul", prologue="rmsnorm", quant=I4).smem


def _down_src():  # TinyLlama down_proj, batch 1
    return dense.gemv("float16", 2048, 5632, 1, "residual").source


def test_base_is_the_package(tool):
    before = (_gate_up_smem(), _down_src(), dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", I4))
    tool.patch("nox")
    tool.patch("base")
    assert (_gate_up_smem(), _down_src(), dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", I4)) == before


def test_prefetch_and_trigger_variants(tool):
    tool.patch("base")
    src = _down_src()
    assert "< 2048 ? K" in src
    tool.patch("pf0")
    assert "< 0 ? K" in _down_src()
    tool.patch("pf0res")
    assert "< 0 ? K" in _down_src()
    assert "< 0 ? K" not in dense.gemv("float16", 2560, 2048, 1, "rope", prologue="rmsnorm", eps=1e-5,
                                       rope=dense.RopeEpilogue(32, 4, 64, "rotate_half", 2048)).source
    tool.patch("pf0head")
    assert "< 0 ? K" not in _down_src()
    tool.patch("qpf0gu")
    pre_wait = "prefetch_w(W4, w_scales, w_zeros, col0)"  # (a tiled block's next-tile prefetch stays)
    assert pre_wait not in dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", **Q4).source
    assert pre_wait in dense.gemv("float16", 6144, 4096, 1, **Q4).source
    i8 = dict(quant=I8)
    tool.patch("q8pf0res")
    assert pre_wait not in dense.gemv("float16", 4096, 11008, 1, "residual", **i8).source
    assert pre_wait in dense.gemv("float16", 12288, 4096, 1, prologue="rmsnorm", eps=1e-5, **i8).source
    assert pre_wait in dense.gemv("float16", 4096, 11008, 1, "residual", quant=I4).source
    tool.patch("q8pf0")
    assert pre_wait not in dense.gemv("float16", 12288, 4096, 1, prologue="rmsnorm", eps=1e-5, **i8).source
    tool.patch("nold")
    assert "lg_pdl_launch_dependents" not in _down_src() and "lg_pdl_launch_dependents" in src
    early = dict(quant=I4, res_early=True)  # (the lowering asks for it where the plan proves it safe)
    tool.patch("base")
    assert "constexpr bool RES_EARLY = true" in dense.gemv("float16", 4096, 14336, 1, "residual", **early).source
    tool.patch("nore")
    assert "constexpr bool RES_EARLY = false" in dense.gemv("float16", 4096, 14336, 1, "residual", **early).source
    tool.patch("base")
    assert "constexpr bool SC_EARLY = true &&" in dense.gemv("float16", 4096, 11008, 1, "residual", quant=I8).source
    tool.patch("nosc")
    assert "constexpr bool SC_EARLY = false &&" in dense.gemv("float16", 4096, 11008, 1, "residual", quant=I8).source


def test_tile_variants(tool):
    tool.patch("base")
    smem = _gate_up_smem()
    assert smem == (4096 // 8 + 4) * 16
    assert dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", I4).tag() == "w8u1pxt4"
    tool.patch("nox")
    assert _gate_up_smem() < smem  # one batch's slab, restaged per batch
    tool.patch("nopers")  # one tile a block, and the LM head's 4 unpipelined steps as before tiles
    assert dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", I4).tag() == "w8u1px"
    assert dense._quant_tuning("float16", 128256, 4096, 1, "none", I4).tag() == "w4u4x"
    tool.patch("base")
    ahead = "constexpr bool AHEAD = true &&"
    assert ahead in dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", **Q4).source
    tool.patch("noahead")
    src = dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", **Q4).source
    assert ahead not in src and "constexpr bool AHEAD = false &&" in src
    gu8 = dense._quant_tuning("float16", 2 * 11008, 4096, 1, "silu_mul", I8)
    assert gu8.tiles == 1
    tool.patch("t8gu")
    assert dense._quant_tuning("float16", 2 * 11008, 4096, 1, "silu_mul", I8) == replace(gu8, tiles=3)
    assert dense._quant_tuning("float16", 32000, 4096, 1, "none", I8).tiles == 1
    tool.patch("t8")
    assert dense._quant_tuning("float16", 32000, 4096, 1, "none", I8).tiles == 8


def test_joined_variants(tool):
    gu8 = ("float16", 2 * 11008, 4096, 1, "silu_mul", I8)
    assert dense._quant_tuning(*gu8).tiles == 1
    tool.patch("t8gu+q8pf0")  # every part of a joined variant
    assert dense._quant_tuning(*gu8).tiles == 3
    assert "prefetch_w(W4, w_scales, w_zeros, col0)" not in \
        dense.gemv("float16", 12288, 4096, 1, prologue="rmsnorm", eps=1e-5, quant=I8).source
    tool.patch("w8qkv")
    qkv = dense._quant_tuning("float16", 6144, 4096, 1, "rope", I4)  # 384 tiles: 2 a block of 8 warps
    assert (qkv.warps, qkv.tiles) == (8, 2) and dense._quant_tuning("float16", 4096, 4096, 1, "residual", I4).warps == 8
    tool.patch("w8walk")  # only 4-warp grids that walk tiles: the 7B's qkv and the LM heads, not the 8B's qkv
    assert dense._quant_tuning("float16", 6144, 4096, 1, "rope", I4).warps == 4
    for n, ep in ((12288, "rope"), (32000, "none"), (128256, "none")):
        walk = dense._quant_tuning("float16", n, 4096, 1, ep, I4)
        assert (walk.warps, walk.tiles) == (8, -(-n // 16 // (2 * dense.SMS))), (n, walk)
    tool.patch("gu6")  # int4 gate/up only: 896 tiles of the 8B in cdiv(896, 6) = 150 blocks
    gate_up = ("float16", 2 * 14336, 4096, 1, "silu_mul")
    assert dense.gemv_launch(*gate_up, prologue="rmsnorm", quant=I4).grid == (150, 1, 1)
    assert dense._quant_tuning(*gu8).tiles == 6  # (int8 too)
    assert dense._quant_tuning("float16", 6144, 4096, 1, "rope", I4).tiles == 1  # (gate/up only)
    tool.patch("nox+gu5")  # no part replaces another's change
    joined = dense._quant_tuning("float16", 2 * 14336, 4096, 1, "silu_mul", I4)
    assert (joined.tiles, joined.whole_x) == (5, False)
    tool.patch("o2")  # o_proj (K <= N) only, not down_proj
    assert dense.gemv_launch("float16", 4096, 4096, 1, "residual", quant=I4).grid == (128, 1, 1)
    assert dense.gemv_launch("float16", 4096, 14336, 1, "residual", quant=I4).grid == (256, 1, 1)
    tool.patch("base")
    assert dense._quant_tuning(*gu8).tiles == 1
    assert dense.gemv_launch(*gate_up, prologue="rmsnorm", quant=I4).grid == (224, 1, 1)
    assert dense._quant_tuning("float16", 6144, 4096, 1, "rope", I4).warps == 4


def test_tpf0_drops_the_next_tile_prefetch(tool):
    gu = dict(prologue="rmsnorm", eps=1e-5, quant=I4)
    next_tile = "prefetch_w(W4, w_scales, w_zeros, (tile + gridDim.x) * 16)"
    tool.patch("base")
    assert next_tile in dense.gemv("float16", 2 * 11008, 4096, 1, "silu_mul", **gu).source
    tool.patch("tpf0")
    src = dense.gemv("float16", 2 * 11008, 4096, 1, "silu_mul", **gu).source
    assert next_tile not in src and "prefetch_w(W4, w_scales, w_zeros, col0)" in src


def test_ahead2_variants_set_the_tuning_of_tile_walking_int4_gemvs_only(tool):
    gu7, qkv7, head7 = (("float16", 2 * 11008, 4096, 1, "silu_mul"), ("float16", 12288, 4096, 1, "rope"),
                        ("float16", 32000, 4096, 1, "none"))
    down = ("float16", 4096, 11008, 1, "residual")  # one tile a block: no next tile to request
    on = lambda args, q=I4: dense._quant_tuning(*args, q).ahead2  # noqa: E731
    tool.patch("base")
    assert not any(on(a) for a in (gu7, qkv7, head7, down))
    tool.patch("ahead2gu")
    assert on(gu7) and not on(qkv7) and not on(head7)
    tool.patch("ahead2qkv+ahead2head")
    assert not on(gu7) and on(qkv7) and on(head7)
    tool.patch("ahead2")
    assert on(gu7) and on(qkv7) and on(head7) and not on(down) and not on(gu7, I8)  # (int8: one tile a block)
    src = dense.gemv(*gu7, tuning=dense._quant_tuning(*gu7, I4), **Q4).source
    assert "constexpr bool AHEAD2 = AHEAD;" in src
    tool.patch("base")
    assert "AHEAD2" not in dense.gemv(*gu7, **Q4).source  # (the default kernels are as before it)


def test_diagnostic_variants_drop_what_they_say_and_compile(tool):
    from llamagraph.codegen import nvrtc
    from llamagraph.codegen.render import module_source

    gu7 = ("float16", 2 * 11008, 4096, 1, "silu_mul")
    o7 = ("float16", 4096, 4096, 1, "residual")  # one unpipelined batch: batch() stages its own slab
    tool.patch("nosz")
    src = dense.gemv(*gu7, **Q4).source
    assert tool.SCALE_LOAD not in src and tool.ZERO_LOAD not in src and "(unsigned short)0x3C00;" in src
    tool.patch("noz")
    src = dense.gemv(*gu7, **Q4).source
    assert tool.SCALE_LOAD in src and tool.ZERO_LOAD not in src
    tool.patch("noalugu")
    assert "sink(ca, acc);" in dense.gemv(*gu7, **Q4).source
    assert "sink(" not in dense.gemv(*o7, quant=I4).source
    tool.patch("noalu+nosz")
    ks = [dense.gemv(*gu7, **Q4), dense.gemv(*o7, quant=I4)]
    assert all("sink(ca, acc);" in k.source and not tool.BATCH_CALL.search(k.source) for k in ks)
    if nvrtc.available() is None:
        pytest.skip("no CUDA compiler here")
    res = nvrtc.compile_source(module_source(ks), arch="sm_90")
    assert all(res.kernels[k.name].registers > 0 for k in ks)
    tool.patch("base")
    assert tool.BATCH_CALL.search(dense.gemv(*gu7, **Q4).source) and "sink(" not in dense.gemv(*gu7, **Q4).source


def test_ct16_stores_int8_and_int4_codes_tile16_and_base_puts_rows_back(tool):
    import importlib

    qw = importlib.import_module("llamagraph.passes.quantize_weights")
    tool.patch("ct16")
    assert qw.CODE_ORDER == {"int8": "tile16", "int4": "tile16"}
    tool.patch("base")
    assert qw.CODE_ORDER == {"int8": None, "int4": None}


def test_zsum_variants_take_the_int4_gemvs_with_a_whole_staged_row(tool):
    gu7, down7, o7 = (("float16", 2 * 11008, 4096, 1, "silu_mul"), ("float16", 4096, 11008, 1, "residual"),
                      ("float16", 4096, 4096, 1, "residual"))
    zs = lambda args, q=I4: dense._quant_tuning(*args, q).zsum  # noqa: E731
    tool.patch("zsumgu")
    assert zs(gu7) and not zs(down7)
    tool.patch("zsum")
    assert zs(gu7) and zs(down7) and not zs(o7)  # (o_proj: one batch, staged inside it, no whole row)
    assert not zs(gu7, dense.GemvQuant("int4", 64)) and not zs(gu7, I8)  # (groups within a step; int8)
    assert "stage_zsum(" in dense.gemv(*gu7, tuning=dense._quant_tuning(*gu7, I4), **Q4).source
    tool.patch("base")
    assert not zs(gu7) and "zsum" not in dense.gemv(*gu7, **Q4).source


def test_nwpf_asks_l1_for_the_norm_weight_before_the_wait(tool):
    from llamagraph.codegen import nvrtc
    from llamagraph.codegen.render import module_source

    gu7 = ("float16", 2 * 11008, 4096, 1, "silu_mul")
    tool.patch("nwpf")
    src = dense.gemv(*gu7, **Q4).source
    assert src.index("prefetch.global.L1") < src.index(tool.Q_WAIT)
    assert "prefetch.global.L1" not in dense.gemv("float16", 4096, 11008, 1, "residual", quant=I4).source  # (no norm)
    if nvrtc.available() is not None:
        k = dense.gemv(*gu7, **Q4)
        assert nvrtc.compile_source(module_source([k]), arch="sm_90").kernels[k.name].registers > 0
    tool.patch("base")
    assert "prefetch.global.L1" not in dense.gemv(*gu7, **Q4).source


def test_lcn_moves_the_first_codes_behind_the_wait(tool):
    gu7, qkv7 = ("float16", 2 * 11008, 4096, 1, "silu_mul"), ("float16", 12288, 4096, 1, "rope")
    rope7 = dense.RopeEpilogue(32, 32, 128, "rotate_half", 2048)
    first = "    load_codes(ca, 0, warp, t, wrow, wr, w_scales, w_zeros);\n"
    tool.patch("base")
    src = dense.gemv(*gu7, **Q4).source
    assert src.index("\n" + first) < src.index(tool.Q_WAIT)
    tool.patch("lcngu")
    src = dense.gemv(*gu7, **Q4).source
    assert src.index(tool.Q_TRIGGER + first) > 0 and src.count("\n" + first) == 1
    qkv = dense.gemv(*qkv7, rope=rope7, **Q4).source
    assert qkv.index("\n" + first) < qkv.index(tool.Q_WAIT)  # (qkv: as before)
    tool.patch("lcn")
    assert tool.Q_TRIGGER + first in dense.gemv(*qkv7, rope=rope7, **Q4).source


def test_wef_loads_codes_evict_first_and_compiles(tool):
    from llamagraph.codegen import nvrtc
    from llamagraph.codegen.render import module_source

    gu7 = ("float16", 2 * 11008, 4096, 1, "silu_mul")
    tool.patch("wef")
    ks = [dense.gemv(*gu7, **Q4), dense.gemv("float16", 4096, 11008, 1, "residual", quant=I8)]
    assert all(tool.Q_LOAD not in k.source and "L2::evict_first" in k.source for k in ks)
    assert "L2::evict_first" not in dense.gemv("float16", 4096, 11008, 1, "residual").source  # (16-bit W: as before)
    if nvrtc.available() is not None:
        res = nvrtc.compile_source(module_source(ks), arch="sm_90")
        assert all(res.kernels[k.name].registers > 0 for k in ks)
    tool.patch("base")
    assert tool.Q_LOAD in dense.gemv(*gu7, **Q4).source


def test_tpf2_asks_l2_for_the_tile_after_next_too(tool):
    gu = ("float16", 2 * 11008, 4096, 1, "silu_mul")
    tool.patch("tpf2")
    src = dense.gemv(*gu, **Q4).source
    assert tool.NEXT_TILE_PF in src
    assert "if (tile + 2 * (int)gridDim.x < NTILES) prefetch_w(W4, w_scales, w_zeros, (tile + 2 * gridDim.x) * 16);" in src
    tool.patch("base")
    assert "2 * gridDim.x" not in dense.gemv(*gu, **Q4).source


@pytest.mark.parametrize("order", [None, "tile16"])
def test_tpfh_asks_l2_for_half_of_each_next_tile_row(tool, order):
    q = dense.GemvQuant("int4", 128, order)
    gu = ("float16", 2 * 11008, 4096, 1, "silu_mul")
    tool.patch("tpfh")
    src = dense.gemv(*gu, prologue="rmsnorm", eps=1e-5, quant=q).source
    assert "if (tile + (int)gridDim.x < NTILES) prefetch_next(W4, w_scales, w_zeros, (tile + gridDim.x) * 16);" in src
    assert "prefetch_w(W4, w_scales, w_zeros, col0)" in src  # the first tile's, before the wait: whole
    nxt = src[src.index("void prefetch_next("):]
    nxt = nxt[: nxt.index("\n}\n")]
    assert "PF_LINES" not in nxt and nxt.count("PF_NEXT") >= 2 and "constexpr int PF_NEXT = (PF_LINES + 1) / 2;" in src
    from llamagraph.codegen import nvrtc
    from llamagraph.codegen.render import module_source

    if nvrtc.available() is not None:
        k = dense.gemv(*gu, prologue="rmsnorm", eps=1e-5, quant=q)
        res = nvrtc.compile_source(module_source([k]), arch="sm_90")
        assert res.kernels[k.name].spill_stores == 0
    tool.patch("base")
    assert "prefetch_next" not in dense.gemv(*gu, prologue="rmsnorm", eps=1e-5, quant=q).source
