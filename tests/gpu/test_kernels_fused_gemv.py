"""The GEMV's fused prologue and epilogues on a GPU against the ops' numpy references.

- prologue rmsnorm: x -> round(rmsnorm(x) * w) before the product (rms_gate_up_silu, rms_lm_head);
- epilogue residual: out = round(x W^T + b) + res, also in place over res (linear_residual);
- epilogue rope: W in rope pair order; q rotated to q_out, k rotated and v into the caches at
  (seq_ids, positions), nothing written for positions outside the cache (rms_qkv_rope_kv_append).

Outputs are poisoned first (NaN) with spare rows that must stay poisoned; the caches start as
random data, and every slot and position the step does not write must keep it.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from llamagraph.codegen import attention, dense  # noqa: E402
from llamagraph.codegen.render import module_source  # noqa: E402
from llamagraph.ir import ops  # noqa: E402
from llamagraph.ir.layout import rope_pair_order  # noqa: E402

from .test_kernels_dense import NULL, SPARE, check, dev, host, poisoned, randn, rounded  # noqa: E402
from llamagraph.runtime.calls import launch_kernel  # noqa: E402

pytestmark = pytest.mark.gpu

EPS = 1e-5
DTYPES = ("float32", "float16", "bfloat16")
ROWS = (1, 3, 8, 13)

NORM_CASES = [  # (N, K, epilogue, bias, out_dtype, row_tile)
    (2 * 136, 520, "silu_mul", True, None, 8),
    (2 * 5632, 2048, "silu_mul", False, None, 8),
    (32000, 2048, "none", False, "float32", 8),  # the LM head with the final norm
    (1000, 264, "none", False, "float32", 16),
]
# the row tiles of 1: TinyLlama's down_proj and o_proj at batch 1 (16-warp blocks: at most one a SM)
RES_CASES = [(64, 64, False, 8), (100, 72, True, 8), (2048, 5632, False, 8), (4096, 4096, True, 16),
             (2048, 5632, False, 1), (2048, 2048, True, 1)]
ROPE_CASES = [  # (H, KV, HD, K, layout, scaling, bias, row_tile)
    (4, 2, 64, 256, "rotate_half", None, False, 8),
    (8, 2, 128, 512, "interleaved", None, True, 8),
    (32, 8, 128, 4096, "rotate_half", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, False, 16),
    (4, 4, 32, 128, "rotate_half", {"rope_type": "dynamic", "factor": 2.0,
                                    "original_max_position_embeddings": 16}, True, 4),
]
MAX_BATCH, MAX_SEQ = 3, 40


def _norm_kernel(dtype, N, K, epi, bias, out_dtype, rt):
    od = None if dtype == "float32" else out_dtype
    return dense.gemv(dtype, N, K, rt, epi, bias, od, prologue="rmsnorm", eps=EPS)


def _res_kernel(dtype, N, K, bias, rt):
    return dense.gemv(dtype, N, K, rt, "residual", bias, prologue="none")


def _rope_spec(H, KV, HD, layout, scaling):
    return dense.RopeEpilogue(H, KV, HD, layout, MAX_SEQ, scaling, 10000.0)


def _rope_kernel(dtype, H, KV, HD, K, layout, scaling, bias, rt):
    return dense.gemv(dtype, (H + 2 * KV) * HD, K, rt, "rope", bias, prologue="rmsnorm", eps=EPS,
                      rope=_rope_spec(H, KV, HD, layout, scaling))


@functools.lru_cache(maxsize=None)
def _module():
    ks = []
    for dt in DTYPES:
        ks += [_norm_kernel(dt, *c) for c in NORM_CASES]
        ks += [_res_kernel(dt, *c) for c in RES_CASES]
        if dt != "float32":
            ks += [_rope_kernel(dt, *c) for c in ROPE_CASES]
    ks = list({k.name: k for k in ks}.values())
    return cupy.RawModule(code=module_source(ks), backend="nvrtc")


def run(kernel, shape, *args):
    launch_kernel(_module().get_function(kernel.name), shape, args)
    cupy.cuda.get_current_stream().synchronize()


def _inputs(rng, rows, N, K, dtype, bias):
    x = randn(rng, (rows, K), dtype, scale=3.0)  # not unit rows: the norm must rescale them
    w = randn(rng, (N, K), dtype, scale=1.0 / np.sqrt(K))
    nw = rounded(1.0 + 0.2 * rng.standard_normal(K).astype(np.float32), dtype)
    b = randn(rng, (N,), dtype) if bias else None
    return x, w, nw, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: f"n{c[0]}k{c[1]}{c[2]}")
def test_gemv_rmsnorm_prologue(dtype, case):
    N, K, epi, bias, out_dtype, rt = case
    k = _norm_kernel(dtype, *case)
    out_dt = dtype if dtype == "float32" else (out_dtype or dtype)
    for rows in ROWS:
        rng = np.random.default_rng(rows * 31 + N)
        x, w, nw, b = _inputs(rng, rows, N, K, dtype, bias)
        n_out = N // 2 if epi == "silu_mul" else N
        out = poisoned((rows + SPARE, n_out), out_dt)
        run(k, dense.gemv_launch(dtype, N, K, rt, epi), dev(x, dtype), dev(w, dtype),
            dev(b, dtype) if bias else NULL, out, rows, dev(nw, dtype))
        attrs = {"eps": EPS, "dtype": dtype}
        ins = [x, nw, w] + ([b] if bias else [])
        ref = (ops._rms_gate_up_silu_ref if epi == "silu_mul" else ops._rms_linear_ref)(ins, attrs)[0]
        check(host(out, out_dt), ref, out_dt if out_dt == dtype else "mixed", f"{k.name} rows={rows}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RES_CASES, ids=lambda c: f"n{c[0]}k{c[1]}r{c[3]}")
@pytest.mark.parametrize("in_place", [False, True])
def test_gemv_residual_epilogue(dtype, case, in_place):
    N, K, bias, rt = case
    k = _res_kernel(dtype, *case)
    for rows in ROWS:
        rng = np.random.default_rng(rows * 17 + N)
        x, w, _, b = _inputs(rng, rows, N, K, dtype, bias)
        res = randn(rng, (rows, N), dtype, scale=4.0)
        res_d = dev(np.concatenate([res, np.full((SPARE, N), np.nan, np.float32)]), dtype)
        out = res_d if in_place else poisoned((rows + SPARE, N), dtype)
        run(k, dense.gemv_launch(dtype, N, K, rt, "residual"), dev(x, dtype), dev(w, dtype),
            dev(b, dtype) if bias else NULL, out, rows, res_d)
        ref = ops._linear_residual_ref([x, w, res] + ([b] if bias else []), {"dtype": dtype})[0]
        check(host(out, dtype), ref, dtype, f"{k.name} rows={rows} in_place={in_place}")


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}{c[4]}")
def test_gemv_rope_epilogue(dtype, case):
    H, KV, HD, K, layout, scaling, bias, rt = case
    k = _rope_kernel(dtype, *case)
    N = (H + 2 * KV) * HD
    order = rope_pair_order(H + 2 * KV, HD, layout)
    spec = _rope_spec(H, KV, HD, layout, scaling)
    inv = cupy.asarray(attention.rope_inv_freq_table(HD, 10000.0, scaling))
    for rows in ROWS:
        rng = np.random.default_rng(rows * 13 + N)
        x, w, nw, b = _inputs(rng, rows, N, K, dtype, bias)
        # distinct (slot, position) pairs; with 3+ rows the last token is past the cache and must not be written
        seq_ids = np.arange(rows, dtype=np.int32) % MAX_BATCH
        positions = (np.arange(rows, dtype=np.int32) * 7) % MAX_SEQ
        if rows > 2:
            positions[-1] = MAX_SEQ + 3
        seq_lens = np.full(MAX_BATCH, 25, np.int32)
        kc = randn(rng, (MAX_BATCH, MAX_SEQ, KV, HD), dtype)
        vc = randn(rng, (MAX_BATCH, MAX_SEQ, KV, HD), dtype)
        kc_d, vc_d = dev(kc, dtype), dev(vc, dtype)
        q_out = poisoned((rows + SPARE, H, HD), dtype)
        run(k, dense.gemv_launch(dtype, N, K, rt, "rope"), dev(x, dtype), dev(w[order], dtype),
            dev(b[order], dtype) if bias else NULL, q_out, rows, dev(nw, dtype), cupy.asarray(positions),
            cupy.asarray(seq_ids), cupy.asarray(seq_lens), inv, kc_d, vc_d)
        attrs = {"eps": EPS, "dtype": dtype, "num_heads": H, "num_kv_heads": KV, "head_dim": HD, "layout": layout,
                 "theta": 10000.0, "scaling": scaling}
        ins = [x, nw, w[order], positions, seq_ids, seq_lens] + ([b[order]] if bias else [])
        wide = np.zeros((MAX_BATCH, MAX_SEQ + 8, KV, HD), np.float32)  # room for the dropped token: q only
        q_ref = ops._rms_qkv_rope_ref(ins[:6] + [wide, wide] + ins[6:], attrs)[0]
        kept = positions < MAX_SEQ
        ins_kept = [x[kept], nw, w[order], positions[kept], seq_ids[kept], seq_lens, kc, vc] + ins[6:]
        _, k_ref, v_ref = ops._rms_qkv_rope_ref(ins_kept, attrs)
        what = f"{k.name} rows={rows}"
        check(host(q_out, dtype).reshape(rows + SPARE, -1), q_ref.reshape(rows, -1), dtype, what + " q")
        # the whole caches: written rows against the reference, every other row keeps its data
        for got, want in ((host(kc_d, dtype), rounded(k_ref, dtype)), (host(vc_d, dtype), rounded(v_ref, dtype))):
            rms = float(np.sqrt(np.mean(want * want)))
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-2 * rms, err_msg=what)
            untouched = np.ones((MAX_BATCH, MAX_SEQ), bool)
            untouched[seq_ids[kept], positions[kept]] = False
            np.testing.assert_array_equal(got[untouched], want[untouched], err_msg=what)
    assert spec.tag() in k.name
