"""Dense kernels: rendering is deterministic, names encode constants, and every variant compiles.

Compilation (NVRTC from the nvidia-cuda-nvrtc wheel, else nvcc) needs no GPU. The GEMV must
not spill: spilled accumulators or W fragments would turn a bandwidth-bound kernel into a
local-memory-bound one.
"""

from __future__ import annotations

import pytest

from llamagraph.codegen import dense, nvrtc
from llamagraph.codegen.launch import Scaled
from llamagraph.codegen.lowering import ELEMENTWISE, PREFILL_EPILOGUES
from llamagraph.codegen.render import module_source
from llamagraph.ir.errors import BackendError

DTYPES = ("float32", "float16", "bfloat16")
# TinyLlama-1.1B: D 2048, I 5632, V 32000, qkv 2560. Llama-2-7B: D 4096, I 11008, qkv 12288.
HIDDEN = (2048, 4096)
GEMV_SHAPES = [  # (N, K, epilogue)
    (2560, 2048, "none"),  # TinyLlama qkv
    (2048, 2048, "none"),  # TinyLlama o_proj
    (2 * 5632, 2048, "silu_mul"),  # TinyLlama gate_up
    (2048, 5632, "none"),  # TinyLlama down
    (32000, 2048, "none"),  # TinyLlama lm_head
    (12288, 4096, "none"),  # Llama-2-7B qkv
    (4096, 4096, "none"),  # Llama-2-7B o_proj
    (2 * 11008, 4096, "silu_mul"),  # Llama-2-7B gate_up
    (4096, 11008, "none"),  # Llama-2-7B down
    (32000, 4096, "none"),  # Llama-2-7B lm_head
    (100, 72, "none"),  # ragged: N % 16 != 0, K % 32 != 0
    (36, 296, "silu_mul"),
]
ROW_TILES = (1, 8, 16)
# the fused GEMVs of a decoder layer and the head, (N, K, prologue, epilogue, rope, out_dtype): TinyLlama, Llama-2-7B
FUSED_SHAPES = [
    (2560, 2048, "rmsnorm", "rope", dense.RopeEpilogue(32, 4, 64, "rotate_half", 2048), None),
    (2048, 2048, "none", "residual", None, None),
    (2 * 5632, 2048, "rmsnorm", "silu_mul", None, None),
    (2048, 5632, "none", "residual", None, None),
    (32000, 2048, "rmsnorm", "none", None, "float32"),
    (12288, 4096, "rmsnorm", "rope", dense.RopeEpilogue(32, 32, 128, "rotate_half", 4096), None),
    (2 * 11008, 4096, "rmsnorm", "silu_mul", None, None),
    (4096, 11008, "none", "residual", None, None),
]
EW = {**ELEMENTWISE, **PREFILL_EPILOGUES}  # every element-wise kernel a plan uses: tag -> (expr, operand)


def ew(tag: str, dtype: str, D: int):
    return dense.elementwise(tag, *EW[tag], dtype, D)


def _kernels(dtype: str) -> list:
    ks = []
    for D in HIDDEN + (5632, 100):
        ks.append(dense.gather_rows(dtype, D))
        ks += [dense.add_rmsnorm(dtype, D, 1e-5, has_residual=False), dense.add_rmsnorm(dtype, D, 1e-6)]
        ks.append(dense.add_rmsnorm(dtype, D, 1e-5, has_residual=True, has_bias=True))
        ks += [ew(tag, dtype, D) for tag in EW]
    for N, K, epi in GEMV_SHAPES:
        if dtype == "float32" and K % 4:
            continue
        for rt in ROW_TILES:
            ks.append(dense.gemv(dtype, N, K, rt, epilogue=epi, has_bias=(N == 12288 or N < 128)))
    ks.append(dense.gemv(dtype, 32000, 4096, 8, out_dtype="float32"))  # lm_head writes fp32 logits
    for N, K, pro, epi, rope, out_dtype in FUSED_SHAPES:
        if dtype == "float32" and epi == "rope":
            continue
        for rt in ROW_TILES:
            ks.append(dense.gemv(dtype, N, K, rt, epi, False, out_dtype if dtype != "float32" else None, prologue=pro,
                                 eps=1e-5, rope=rope))
    return ks


def test_rendering_is_deterministic():
    for dtype in DTYPES:
        a, b = _kernels(dtype), _kernels(dtype)
        assert [k.name for k in a] == [k.name for k in b]
        assert module_source(a).encode() == module_source(b).encode()


def test_names_encode_constants():
    variants = [
        dense.gemv("float16", 4096, 4096, 8),
        dense.gemv("bfloat16", 4096, 4096, 8),
        dense.gemv("float16", 4096, 4096, 4),
        dense.gemv("float16", 4096, 4104, 8),
        dense.gemv("float16", 4104, 4096, 8),
        dense.gemv("float16", 4096, 4096, 8, has_bias=True),
        dense.gemv("float16", 4096, 4096, 8, epilogue="silu_mul"),
        dense.gemv("float16", 4096, 4096, 8, out_dtype="float32"),
        dense.gemv("float16", 4096, 4096, 8, tuning=dense.GemvTuning(warps=4, unroll=4)),
        dense.add_rmsnorm("float16", 4096, 1e-5),
        dense.add_rmsnorm("float16", 4096, 1e-6),
        dense.add_rmsnorm("float16", 4096, 1e-5, has_residual=False),
        dense.add_rmsnorm("float16", 4096, 1e-5, has_bias=True),
        dense.add_rmsnorm("bfloat16", 4096, 1e-5),
        dense.add_rmsnorm("float16", 2048, 1e-5),
        dense.gather_rows("float32", 4096),
        dense.gather_rows("float16", 4096),
        dense.gather_rows("float16", 2048),
    ] + [ew(tag, dt, 4096) for tag in EW for dt in DTYPES]
    names = [k.name for k in variants]
    assert len(set(names)) == len(names), names
    assert all(k.name.isidentifier() for k in variants)
    # the default tuning is implied by the other constants and stays out of the name
    assert dense.gemv("float16", 4096, 11008, 8, has_bias=True).name == "gemv_f16_n4096_k11008_r8_bias"
    assert dense.gemv("float16", 4096, 4096, 8, tuning=dense.gemv_default_tuning("float16", 4096, 4096, 8)).name == (
        "gemv_f16_n4096_k4096_r8"
    )
    assert dense.eps_tag(1e-5) == "1em05" and dense.eps_tag(2.5e-6) == "2p5em06"


def test_gate_up_gemv_asks_l2_for_nothing_before_its_wait():
    # the other 16-bit GEMVs prefetch their first W lines before lg_pdl_wait; gate/up's prefetch cost the
    # 8B decode step 1% (tools/tuning_ab.py pf0gu, docs/ab_h100.txt)
    call = "_impl::prefetch_w(reinterpret_cast<const uint4*>(W), blockIdx.x * 16);"
    gate_up = dense.gemv("float16", 2 * 14336, 4096, 1, "silu_mul", prologue="rmsnorm", eps=1e-5).source
    down = dense.gemv("float16", 4096, 14336, 1, "residual").source
    assert call not in gate_up and call in down
    assert call in dense.gemv("bfloat16", 6144, 4096, 1, prologue="rmsnorm", eps=1e-5).source


def test_source_shows_its_constants():
    k = dense.gemv("bfloat16", 2 * 11008, 4096, 8, epilogue="silu_mul", has_bias=True)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in k.source
    assert "constexpr int N_OUT = 11008;" in k.source and "constexpr int K = 4096;" in k.source
    assert 'extern "C" __global__' in k.source and k.name + "(" in k.source
    n = dense.add_rmsnorm("float16", 4096, 1e-6, has_bias=True)
    assert "1e-06f" in n.source


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dense.gemv("float16", 64, 100, 1), "multiple of 8"),
        (lambda: dense.gemv("float32", 64, 98, 1), "multiple of 4"),
        (lambda: dense.gemv("float16", 63, 64, 1, epilogue="silu_mul"), "even N"),
        (lambda: dense.gemv("float16", 64, 64, 17), "row_tile"),
        (lambda: dense.gemv("float16", 64, 64, 1, epilogue="gelu"), "epilogue"),
        (lambda: dense.gemv("int8", 64, 64, 1), "dtype"),
        (lambda: dense.add_rmsnorm("float16", 64, 1e-5, has_residual=False, has_bias=True), "has_bias"),
        (lambda: dense.elementwise("tanh", "tanhf(a)", "diagonal", "float16", 64), "operand"),
    ],
)
def test_bad_constants_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_batch_one_grid_of_at_most_one_block_a_sm_takes_16_warps():
    """TinyLlama's o_proj and down_proj (N = 2048: 128 blocks) at batch 1 take 16-warp blocks with
    half the unroll; wider grids and larger row tiles keep 8 warps."""
    for N, K, epi in ((2048, 5632, "residual"), (2048, 2048, "residual"), (2 * 2048, 2048, "silu_mul")):
        small = dense.gemv_default_tuning("float16", N, K, 1, epi)
        big = dense.gemv_default_tuning("float16", 2 * N, K, 1, epi)
        assert (small.warps, big.warps) == (16, 8), (N, K, epi)
        assert small.unroll == big.unroll // 2
        assert dense.gemv_launch("float16", N, K, 1, epi).block == (512, 1, 1)
        assert dense.gemv_default_tuning("float16", N, K, 8, epi).warps == 8
    assert dense.gemv_default_tuning("float16", dense.SMS * 16 + 1, 2048, 1).warps == 8  # 133 blocks


def test_launch_shapes():
    assert dense.gemv_launch("float16", 4096, 4096, 8).grid == (256, 1, 1)  # rows loop inside the kernel
    assert dense.gemv_launch("float16", 100, 72, 8).grid == (7, 1, 1)  # 100 columns, 16 per block
    assert dense.gemv_launch("float16", 2 * 11008, 4096, 8, epilogue="silu_mul").grid == (688, 1, 1)
    fp32 = dense.gemv_launch("float32", 100, 64, 8)
    assert fp32.grid[0] * fp32.block[0] // 32 >= 100
    assert dense.add_rmsnorm_launch("float16", 4096, rows=5).grid == (5, 1, 1)
    e = dense.gather_rows_launch("float16", 4096, rows=3)
    assert e.grid[0] * e.block[0] >= 3 * 4096 // 8
    w = dense.elementwise_launch("bfloat16", 100, rows=7)
    assert w.grid[0] * w.block[0] >= 7 * 100


def test_launch_shapes_follow_step_scalars():
    """A row count given as a step scalar leaves the grid symbolic until a step resolves it."""
    for rows in (1, 3, 129):
        sym = dense.elementwise_launch("float16", 4096, rows="T")
        assert sym.grid[0] == Scaled("T", 4096 // 8, dense.EW_THREADS)
        assert sym.at({"T": rows}) == dense.elementwise_launch("float16", 4096, rows=rows)
        assert dense.add_rmsnorm_launch("float16", 4096, "B").at({"B": rows}).grid == (rows, 1, 1)
    assert dense.gather_rows_launch("float16", 64, "B").at({"B": 0}).grid == (1, 1, 1)  # never an empty grid


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'k_a' for 'sm_90'\n"
        "ptxas info    : Function properties for k_a\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'k_b' for 'sm_90'\n"
        "ptxas info    : Function properties for k_b\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 12 registers, used 0 barriers\n"
    )
    res = nvrtc.parse_ptxas_log(log)
    assert res["k_a"] == nvrtc.KernelResources(40, 8, 4, 4096, 16)
    assert res["k_b"] == nvrtc.KernelResources(12, 0, 0, 0, 0)


def test_no_compiler_is_a_backend_error(monkeypatch):
    monkeypatch.setattr(nvrtc, "available", lambda compiler=None: None)
    with pytest.raises(BackendError, match="no CUDA compiler"):
        nvrtc.compile_source('extern "C" __global__ void k() {}')


def _require_compiler():
    which = nvrtc.available()
    if which is None:
        pytest.skip("no CUDA compiler here: pip install nvidia-cuda-nvrtc (or put nvcc on PATH)")
    return which


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_kernels_compile_for_sm90(dtype):
    _require_compiler()
    kernels = _kernels(dtype)
    res = nvrtc.compile_source(module_source(kernels), arch="sm_90")
    assert res.cubin
    for k in kernels:
        assert k.name.encode() in res.cubin, k.name
        assert k.name in res.kernels, f"{k.name} missing from the ptxas log"
        r = res.kernels[k.name]
        assert 0 < r.registers <= 255, (k.name, r)
        if k.name.startswith("gemv_"):
            assert r.spill_stores == 0 and r.spill_loads == 0, (k.name, r)
            if dtype != "float32":  # two 256-thread blocks per SM (launch bounds)
                assert r.registers <= 128, (k.name, r)
        else:
            assert r.spill_stores == 0, (k.name, r)


def test_compile_error_carries_the_log():
    _require_compiler()
    with pytest.raises(nvrtc.CompileError, match="undefined"):
        nvrtc.compile_source('extern "C" __global__ void k() { not_declared = 1; }')


def test_nvcc_and_nvrtc_agree_when_both_exist():
    if not nvrtc.available("nvrtc") or not nvrtc.available("nvcc"):
        pytest.skip("needs both NVRTC and nvcc")
    src = module_source([dense.gemv("float16", 4096, 4096, 8), dense.add_rmsnorm("bfloat16", 4096, 1e-5)])
    a = nvrtc.compile_source(src, compiler="nvrtc")
    b = nvrtc.compile_source(src, compiler="nvcc")
    assert set(a.kernels) == set(b.kernels)
    for name in a.kernels:
        assert a.kernels[name].spill_stores == b.kernels[name].spill_stores == 0
