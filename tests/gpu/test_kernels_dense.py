"""Dense kernels on a GPU against numpy: every element of every output, on random data.

Outputs are poisoned first (NaN bit patterns) and allocated with spare rows, which must stay
poisoned. bf16 travels as raw uint16 words, rounded to nearest even here on the host.
Tolerances: fp32 relative 1e-5; fp16/bf16 relative-by-norm 1e-2 plus an elementwise bound of
2e-2 of the output's RMS (plus 1e-2 relative, which covers one 16-bit rounding).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from llamagraph.codegen import dense  # noqa: E402
from llamagraph.codegen.lowering import ELEMENTWISE, PREFILL_EPILOGUES  # noqa: E402
from llamagraph.codegen.render import module_source  # noqa: E402
from llamagraph.ir import ops  # noqa: E402
from llamagraph.ir.dtypes import bf16_to_f32, f32_to_bf16  # noqa: E402
from llamagraph.runtime.calls import launch_kernel, linear_cublas  # noqa: E402


# tests/gpu/conftest.py skips these without a CUDA device
pytestmark = pytest.mark.gpu

DTYPES = ("float32", "float16", "bfloat16")
ROWS = (1, 2, 3, 5, 8, 13)
SPARE = 2  # extra poisoned rows after every output


# ---------------------------------------------------------------------------------------------
# host-side storage conversions
# ---------------------------------------------------------------------------------------------

def storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return f32_to_bf16(x)
    return np.asarray(x, np.float32).astype(np.float16 if dtype == "float16" else np.float32)


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(a) if dtype == "bfloat16" else a.astype(np.float32)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to the storage dtype, back in float32: what the kernel really reads."""
    return to_f32(storage(x, dtype), dtype)


def randn(rng, shape, dtype, scale=1.0) -> np.ndarray:
    return rounded(rng.standard_normal(shape).astype(np.float32) * np.float32(scale), dtype)


def dev(x: np.ndarray, dtype: str):
    return cupy.asarray(storage(x, dtype))


def poisoned(shape, dtype: str):
    if dtype == "bfloat16":
        return cupy.full(shape, 0xFFFF, dtype=cupy.uint16)  # a NaN bit pattern
    return cupy.full(shape, np.nan, dtype=cupy.float16 if dtype == "float16" else cupy.float32)


def host(a, dtype: str) -> np.ndarray:
    return to_f32(cupy.asnumpy(a), dtype)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def check(got: np.ndarray, ref: np.ndarray, dtype: str, what: str = "") -> None:
    """got: [rows + SPARE, ...] device result in float32; ref: [rows, ...].

    dtype picks the tolerance: a storage dtype, or "mixed" for 16-bit inputs with fp32 output.
    """
    n = ref.shape[0]
    assert np.isnan(got[n:]).all(), f"{what}: wrote past the last row"
    got = got[:n]
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} elements not written / not finite"
    ref = ref.astype(np.float64)
    diff = np.abs(got - ref)
    norm = np.linalg.norm(ref)
    rel = float(np.linalg.norm(got - ref) / norm) if norm > 0 else float(diff.max())
    if dtype == "float32":
        rtol, atol, rel_tol = 1e-5, 1e-5 * float(np.abs(ref).max()), 1e-5
    elif dtype == "mixed":  # 16-bit inputs, fp32 output: only the fp32 accumulation differs
        rtol, atol, rel_tol = 1e-4, 1e-4 * float(np.abs(ref).max()), 1e-4
    else:
        rms = float(np.sqrt(np.mean(ref * ref)))
        rtol, atol, rel_tol = 1e-2, 2e-2 * rms, 1e-2
    bad = diff > atol + rtol * np.abs(ref)
    assert rel <= rel_tol, f"{what}: relative error by norm {rel:.3g} > {rel_tol}"
    assert not bad.any(), (
        f"{what}: {np.count_nonzero(bad)} elements off, worst {diff.max():.3g} at "
        f"{np.unravel_index(diff.argmax(), diff.shape)} (atol {atol:.3g}, rtol {rtol})"
    )


@functools.lru_cache(maxsize=None)
def _module(source: str):
    return cupy.RawModule(code=source, backend="nvrtc")


def function(kernel):
    """The compiled kernel. Kernels the tests below use come from one module compiled once
    (one NVRTC run instead of ~200); any other kernel compiles on its own."""
    every = _every_kernel()
    if every.get(kernel.name) == kernel:
        return _module(module_source(list(every.values()))).get_function(kernel.name)
    return _module(module_source([kernel])).get_function(kernel.name)


@functools.lru_cache(maxsize=None)
def _every_kernel() -> dict:
    ks = []
    for dtype in DTYPES:
        for N, K, epi, bias, out_dtype in GEMV_SHAPES:
            od = None if dtype == "float32" else out_dtype
            ks.append(dense.gemv(dtype, N, K, 8, epilogue=epi, has_bias=bias, out_dtype=od))
        for rt in sorted({rt for rt, _ in ROW_TILE_CASES}):
            ks += [dense.gemv(dtype, 2 * 136, 520, rt, "silu_mul", True), dense.gemv(dtype, 100, 72, rt)]
        for D in NORM_DIMS:
            ks.append(dense.add_rmsnorm(dtype, D, 1e-5, has_residual=False))
            ks += [dense.add_rmsnorm(dtype, D, 1e-6, has_residual=True, has_bias=b) for b in (False, True)]
        for D in COPY_DIMS:
            ks.append(dense.gather_rows(dtype, D))
        ks += [ew_kernel(tag, dtype, D) for tag in EW for D in EW_DIMS]
    return {k.name: k for k in ks}


NULL = np.uint64(0)


def run(kernel, shape, *args):
    launch_kernel(function(kernel), shape, args)
    cupy.cuda.get_current_stream().synchronize()


# ---------------------------------------------------------------------------------------------
# gemv
# ---------------------------------------------------------------------------------------------

GEMV_SHAPES = [  # (N, K, epilogue, has_bias, out_dtype or None)
    (64, 64, "none", False, None),
    (100, 72, "none", True, None),  # N % 16 != 0 and K % 32 != 0 (ragged tiles)
    (1000, 264, "none", False, None),
    (2 * 136, 520, "silu_mul", True, None),  # 136 outputs: not a multiple of 16
    (2 * 5632, 2048, "silu_mul", False, None),  # TinyLlama gate_up
    (2048, 5632, "none", False, None),  # TinyLlama down
    (4096, 4096, "none", True, None),
    (32000, 2048, "none", False, "float32"),  # lm_head: fp32 logits
]


def gemv_ref(x, w, b, epilogue):
    ins = [x.astype(np.float64), w.astype(np.float64)] + ([b.astype(np.float64)] if b is not None else [])
    return (ops._gate_up_silu_ref if epilogue == "silu_mul" else ops._linear_ref)(ins, {})[0]


@functools.lru_cache(maxsize=8)
def gemv_weights(N, K, dtype, has_bias):
    rng = np.random.default_rng(N * 7 + K)
    w = randn(rng, (N, K), dtype, scale=1.0 / np.sqrt(K))
    b = randn(rng, (N,), dtype) if has_bias else None
    return w, b, dev(w, dtype), (dev(b, dtype) if has_bias else None)


def _gemv_case(dtype, shape, rows, row_tile, tuning=None):
    N, K, epi, has_bias, out_dtype = shape
    if dtype == "float32" and out_dtype == "float32":
        out_dtype = None
    out_dt = out_dtype or dtype
    w, b, w_d, b_d = gemv_weights(N, K, dtype, has_bias)
    rng = np.random.default_rng(rows)
    x = randn(rng, (rows, K), dtype)
    n_out = N // 2 if epi == "silu_mul" else N
    out = poisoned((rows + SPARE, n_out), out_dt)
    k = dense.gemv(dtype, N, K, row_tile, epilogue=epi, has_bias=has_bias, out_dtype=out_dtype, tuning=tuning)
    shape_ = dense.gemv_launch(dtype, N, K, row_tile, epilogue=epi, tuning=tuning)
    run(k, shape_, dev(x, dtype), w_d, b_d if has_bias else NULL, out, rows)
    tol = out_dt if out_dt == dtype else "mixed"
    check(host(out, out_dt), gemv_ref(x, w, b, epi), tol, f"{k.name} rows={rows}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: f"n{s[0]}k{s[1]}{s[2]}{'_b' if s[3] else ''}")
def test_gemv(dtype, shape):
    for rows in ROWS:  # row tile 8: 13 rows take two passes over W
        _gemv_case(dtype, shape, rows, row_tile=8)


ROW_TILE_CASES = [(1, 3), (3, 8), (16, 13), (16, 16), (16, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_tile, rows", ROW_TILE_CASES)
def test_gemv_row_tiles(dtype, row_tile, rows):
    _gemv_case(dtype, (2 * 136, 520, "silu_mul", True, None), rows, row_tile)
    _gemv_case(dtype, (100, 72, "none", False, None), rows, row_tile)


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("warps, unroll", [(4, 2), (8, 8), (16, 1)])
def test_gemv_tunings(dtype, warps, unroll):
    tuning = dense.GemvTuning(warps=warps, unroll=unroll)
    for rows in (1, 5):
        _gemv_case(dtype, (1000, 264, "none", True, None), rows, 8, tuning)
        _gemv_case(dtype, (2 * 5632, 2048, "silu_mul", False, None), rows, 8, tuning)


def test_gemv_zero_rows_writes_nothing():
    out = poisoned((2, 64), "float16")
    w = dev(np.ones((64, 64), np.float32), "float16")
    k = dense.gemv("float16", 64, 64, 8)
    run(k, dense.gemv_launch("float16", 64, 64, 8), w, w, NULL, out, 0)
    assert np.isnan(host(out, "float16")).all()


# ---------------------------------------------------------------------------------------------
# add_rmsnorm
# ---------------------------------------------------------------------------------------------

NORM_DIMS = (64, 100, 2048, 4096, 5632, 8192)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", NORM_DIMS)
def test_rmsnorm_plain(dtype, D):
    rng = np.random.default_rng(D)
    eps = 1e-5
    w = randn(rng, (D,), dtype)
    k = dense.add_rmsnorm(dtype, D, eps, has_residual=False)
    for rows in ROWS:
        y = randn(rng, (rows, D), dtype, scale=3.0)
        out = poisoned((rows + SPARE, D), dtype)
        run(k, dense.add_rmsnorm_launch(dtype, D, rows), dev(y, dtype), NULL, NULL, dev(w, dtype), NULL, out, rows)
        check(host(out, dtype), ops.rmsnorm(y, w, eps), dtype, f"{k.name} rows={rows}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", NORM_DIMS)
@pytest.mark.parametrize("has_bias", (False, True))
@pytest.mark.parametrize("alias", ("none", "y", "r"))
def test_add_rmsnorm(dtype, D, has_bias, alias):
    rng = np.random.default_rng(D + has_bias)
    eps = 1e-6
    w = randn(rng, (D,), dtype)
    bias = randn(rng, (D,), dtype) if has_bias else None
    k = dense.add_rmsnorm(dtype, D, eps, has_residual=True, has_bias=has_bias)
    for rows in ROWS:
        y, r = randn(rng, (rows, D), dtype), randn(rng, (rows, D), dtype, scale=2.0)
        s_ref, n_ref = ops._add_rmsnorm_ref([y, r, w] + ([bias] if has_bias else []), {"eps": eps})
        y_d = cupy.concatenate([dev(y, dtype), poisoned((SPARE, D), dtype)])
        r_d = cupy.concatenate([dev(r, dtype), poisoned((SPARE, D), dtype)])
        s_d = {"none": poisoned((rows + SPARE, D), dtype), "y": y_d, "r": r_d}[alias]
        n_d = poisoned((rows + SPARE, D), dtype)
        b_arg = dev(bias, dtype) if has_bias else NULL
        run(k, dense.add_rmsnorm_launch(dtype, D, rows), y_d, r_d, b_arg, dev(w, dtype), s_d, n_d, rows)
        what = f"{k.name} rows={rows} sum_out aliases {alias}"
        check(host(s_d, dtype), s_ref, dtype, what + " (sum)")
        check(host(n_d, dtype), n_ref, dtype, what + " (norm)")


# ---------------------------------------------------------------------------------------------
# gather_rows (the embedding lookup too)
# ---------------------------------------------------------------------------------------------

COPY_DIMS = (3, 64, 100, 2048, 4096)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", COPY_DIMS)
def test_gather_rows(dtype, D):
    """The embedding lookup (a 1000-row table, up to 64 tokens) and the last-token gather."""
    rng = np.random.default_rng(D + 1)
    x = randn(rng, (1000, D), dtype)
    k = dense.gather_rows(dtype, D)
    for n in ROWS + (64,):
        idx = rng.integers(0, 1000, n).astype(np.int32)
        idx[0], idx[-1] = 999, 0
        out = poisoned((n + SPARE, D), dtype)
        run(k, dense.gather_rows_launch(dtype, D, n), dev(x, dtype), cupy.asarray(idx), out, n)
        got = host(out, dtype)
        assert np.isnan(got[n:]).all()
        np.testing.assert_array_equal(got[:n], x[idx], err_msg=f"{k.name} n={n}")


# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------

EW_DIMS = (3, 64, 100, 5632)


EW = {**ELEMENTWISE, **PREFILL_EPILOGUES}  # tag -> (C expression, how b is read)


def ew_kernel(tag: str, dtype: str, D: int):
    return dense.elementwise(tag, *EW[tag], dtype, D)


def ew_ref(tag, a, b):
    return {
        "bias_add": lambda: a + b[None, :],
        "bias_row": lambda: a + b[None, :],
        "residual": lambda: a + b,
        "silu": lambda: ops.silu(a),
        "mul": lambda: a * b,
        "silu_mul": lambda: ops.silu(a) * b,
        "silu_mul_halves": lambda: ops.silu(a[:, : a.shape[1] // 2]) * a[:, a.shape[1] // 2 :],
    }[tag]()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tag", sorted(EW))
@pytest.mark.parametrize("D", EW_DIMS)
@pytest.mark.parametrize("alias", ("none", "a", "b"))
def test_elementwise(dtype, tag, D, alias):
    operand = EW[tag][1]
    if alias == "b" and operand != "full":
        pytest.skip("out has another shape than b (or there is no b)")
    if alias == "a" and operand == "halves":
        pytest.skip("the halves kernel must not write into its input")
    rng = np.random.default_rng(D)
    k = ew_kernel(tag, dtype, D)
    for rows in ROWS:
        a = randn(rng, (rows, 2 * D if operand == "halves" else D), dtype, scale=3.0)
        b = randn(rng, (D,) if operand == "row" else (rows, D), dtype)
        a_d = cupy.concatenate([dev(a, dtype), poisoned((SPARE, a.shape[1]), dtype)])
        b_d = dev(b, dtype) if operand == "row" else cupy.concatenate([dev(b, dtype), poisoned((SPARE, D), dtype)])
        out = {"none": poisoned((rows + SPARE, D), dtype), "a": a_d, "b": b_d}[alias]
        b_arg = NULL if operand in ("none", "halves") else b_d
        run(k, dense.elementwise_launch(dtype, D, rows), a_d, b_arg, out, rows)
        check(host(out, dtype), ew_ref(tag, a, b), dtype, f"{k.name} rows={rows} out aliases {alias}")


# ---------------------------------------------------------------------------------------------
# cuBLAS prefill linear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, out_dtype", [(d, d) for d in DTYPES] + [("float16", "float32"), ("bfloat16", "float32")])
@pytest.mark.parametrize("N, K", [(96, 64), (1000, 264), (4096, 2048)])
def test_linear_cublas(dtype, out_dtype, N, K):
    rng = np.random.default_rng(N + K)
    w = randn(rng, (N, K), dtype, scale=1.0 / np.sqrt(K))
    w_d = dev(w, dtype)
    for rows in (1, 5, 64, 333):
        x = randn(rng, (rows, K), dtype)
        x_d = dev(x, dtype)
        out = poisoned((rows + SPARE, N), out_dtype)
        linear_cublas(x_d.data.ptr, w_d.data.ptr, out.data.ptr, rows, N, K, dtype, out_dtype)
        cupy.cuda.get_current_stream().synchronize()
        tol = dtype if out_dtype == dtype else "mixed"
        check(host(out, out_dtype), gemv_ref(x, w, None, "none"), tol, f"cublas {dtype}->{out_dtype} rows={rows}")


def test_linear_cublas_then_silu_mul_halves():
    """The prefill SwiGLU: cuBLAS writes [rows, 2I], the halves kernel reads it."""
    dtype, I, K, rows = "bfloat16", 136, 264, 7
    rng = np.random.default_rng(5)
    w = randn(rng, (2 * I, K), dtype, scale=1.0 / np.sqrt(K))
    x = randn(rng, (rows, K), dtype)
    h = cupy.empty((rows, 2 * I), cupy.uint16)
    linear_cublas(dev(x, dtype).data.ptr, dev(w, dtype).data.ptr, h.data.ptr, rows, 2 * I, K, dtype)
    out = poisoned((rows + SPARE, I), dtype)
    k = ew_kernel("silu_mul_halves", dtype, I)
    run(k, dense.elementwise_launch(dtype, I, rows), h, NULL, out, rows)
    check(host(out, dtype), gemv_ref(x, w, None, "silu_mul"), dtype, "cublas + silu_mul_halves")
