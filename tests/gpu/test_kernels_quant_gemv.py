"""Quantized GEMVs (int8 / int4 codes) and the prefill dequantize kernel on a GPU, against the ops'
numpy references run with w' = llamagraph.ir.quant.dequantize(codes, scales, zeros).

Every scheme (int8; int4 with groups of 32, 64, 128) in fp16, bf16 and fp32, with every prologue /
epilogue the lowerings fuse: plain (+ bias), silu_mul, rmsnorm prologue with fp32 logits, residual
(also in place over the stream), rope + KV append. Row counts 1, 3, 8 and 16 cross row tiles of 1, 4,
8 and 16. Outputs are poisoned first (NaN) with spare rows that must stay poisoned.

Tolerances: 16-bit activations 3e-2 relative (by norm, and per element against the output's RMS): the
kernels take w' exactly (int8, whole-step int4 groups) or rounded once to the activation dtype
(smaller groups); fp32 1e-5 (w' is exactly the reference's, only the order of the sums differs).
The dequantize kernel must equal dequantize() rounded to the activation dtype bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from llamagraph.codegen import attention, dense  # noqa: E402
from llamagraph.codegen.render import module_source  # noqa: E402
from llamagraph.ir import ops  # noqa: E402
from llamagraph.ir.dtypes import to_float32  # noqa: E402
from llamagraph.ir.layout import rope_pair_order  # noqa: E402
from llamagraph.ir.quant import dequantize, order_codes, quantize  # noqa: E402
from llamagraph.runtime.calls import launch_kernel  # noqa: E402

from .test_kernels_dense import NULL, SPARE, dev, host, poisoned, randn, rounded, storage  # noqa: E402

pytestmark = pytest.mark.gpu

EPS = 1e-5
DTYPES = ("float32", "float16", "bfloat16")
# "int8c16", "int4c16": codes stored "tile16" (llamagraph.ir.quant.order_codes: 16-row blocks chunk-major),
# 16-bit activations and whole 16-column output tiles only
QUANTS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("int8c16", None), ("int4c16", 128)]
ROWS = (1, 3, 8, 16)
# (N, K, epilogue, prologue, bias, out_dtype, row_tile); K = 2560 is 20 int4 steps / 40 int8 steps:
# more than one batch of steps and a ragged last one
CASES = {
    "plain": (100, 256, "none", "none", True, None, 8),  # ragged N, bias
    "silu": (2 * 136, 512, "silu_mul", "none", True, None, 1),  # gate_up_silu
    "rms_silu": (2 * 200, 2560, "silu_mul", "rmsnorm", False, None, 8),  # rms_gate_up_silu
    "rms_logits": (1000, 512, "none", "rmsnorm", False, "float32", 16),  # rms_lm_head: fp32 logits
    "tiny": (2 * 192, 64, "silu_mul", "rmsnorm", True, None, 4),  # K below one int4 step
    # batch-1 decode tiles: int8 pipelines 5 batches of 2 steps (8 warps)
    "rms_silu_decode": (2 * 136, 5120, "silu_mul", "rmsnorm", False, None, 1),
    # an 8th entry: column tiles per block (16-bit only), grid-stride over a ragged share: 13 tiles in 5
    # blocks, 63 tiles in 21; with 3 rows each block walks its tiles once per row tile
    "rms_silu_tiles": (2 * 200, 2560, "silu_mul", "rmsnorm", False, None, 1, 3),
    "rms_logits_tiles": (1000, 512, "none", "rmsnorm", False, "float32", 1, 3),
    # 4 (int8: 4) pipelined batches a tile, an even count: each block requests its next tile's first
    # codes behind the last batch of this one (AHEAD); 13 tiles in 5 blocks
    "rms_silu_ahead": (2 * 200, 4096, "silu_mul", "rmsnorm", False, None, 1, 3),
    # int4's default past the resident 4-warp blocks (529 tiles, 4 blocks a SM): 2 tiles a block, AHEAD
    "rms_logits_ahead": (16 * (4 * dense.SMS + 1), 4096, "none", "rmsnorm", False, "float32", 1),
    # 16 whole output tiles (the "c16" schemes read them; int4: 3 a block, 6 blocks)
    "rms_silu_whole_tiles": (2 * 256, 4096, "silu_mul", "rmsnorm", False, None, 1, 3),
    # GemvTuning.zsum (opt-in; int4 G % 128 == 0): zeros and the magic taken off per step from staged x sums
    "rms_silu_zsum": (2 * 256, 4096, "silu_mul", "rmsnorm", False, None, 1, {"tiles": 3, "zsum": True}),
    "rms_logits_zsum": (16 * (4 * dense.SMS + 1), 4096, "none", "rmsnorm", False, "float32", 1, {"zsum": True}),
    # GemvTuning.ahead2 (opt-in): the next tile's first two batches requested behind this tile's last
    "rms_silu_ahead2": (2 * 200, 4096, "silu_mul", "rmsnorm", False, None, 1, {"tiles": 3, "ahead2": True}),
    "rms_logits_ahead2": (16 * (4 * dense.SMS + 1), 4096, "none", "rmsnorm", False, "float32", 1,
                          {"tiles": 2, "ahead2": True}),
}
# (N, K, bias, row_tile); the row tiles of 1: int4's 8-warp blocks with one batch of codes (K 2560) and
# pipelined batches (K 5120, a ragged third one); int8's pipelined batches of 4 steps
RES_CASES = [(256, 2560, True, 8), (4096, 4096, False, 16), (256, 2560, True, 1), (256, 5120, False, 1),
             (256, 5120, False, 1, 3),  # 16 tiles in 6 blocks
             (256, 4096, False, 1, dense.GemvTuning(8, 2, pipeline=True, whole_x=True, tiles=3, ahead2=True)),
             (256, 5120, False, 1, {"zsum": True})]  # zsum with a ragged last batch (its steps' sums are 0)
ROPE_CASES = [  # (H, KV, HD, K, layout, scaling, bias, row_tile)
    (4, 2, 64, 256, "rotate_half", None, False, 8),
    (8, 2, 128, 512, "interleaved", None, True, 16),
    (4, 4, 32, 128, "rotate_half", {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16},
     True, 4),
    (4, 2, 64, 256, "rotate_half", None, True, 1),  # a batch-1 decode tile, reloading its codes per row
    (4, 2, 64, 256, "rotate_half", None, True, 1, 3),  # 32 tiles in 11 blocks of 3
    # Llama-2-7B's int4 qkv (a grid past the 4-warp slots) as a whole tuning: 8 warps, pipelined batches
    # of 2 steps (K 2560: a ragged second one), x staged once, 32 tiles in 11 blocks of 3
    (4, 2, 64, 2560, "rotate_half", None, False, 1, dense.GemvTuning(8, 2, pipeline=True, whole_x=True, tiles=3)),
    # the same with ahead2 (opt-in), K 4096: two pipelined batches a tile, both of the next tile's requested early
    (4, 2, 64, 4096, "rotate_half", None, False, 1,
     dense.GemvTuning(8, 2, pipeline=True, whole_x=True, tiles=3, ahead2=True)),
    # zsum (opt-in): the qkv of the 7B's tuning with the zeros taken off per step
    (4, 2, 64, 4096, "rotate_half", None, True, 1,
     dense.GemvTuning(8, 2, pipeline=True, whole_x=True, tiles=3, zsum=True)),
]
MAX_BATCH, MAX_SEQ = 3, 40


def _q(scheme, group):
    """The GemvQuant of a QUANTS entry: a "c16" suffix stores the scheme's codes "tile16"."""
    return dense.GemvQuant(scheme.removesuffix("c16"), group, "tile16" if scheme.endswith("c16") else None)


def _fits(group, K, dtype=None, scheme="int8", n_out=16, tiles=()):
    """Whether the GEMV reads this layout: a group size dividing K; "tile16" codes in 16-bit plans
    with whole 16-column tiles; a zsum tuning (in ``tiles``) with int4 groups of whole steps, 16-bit."""
    q = _q(scheme, group)
    zsum = any(t.get("zsum") if isinstance(t, dict) else getattr(t, "zsum", False) for t in tiles)
    if group is not None and K % group:
        return False
    if q.code_order and (dtype == "float32" or n_out % 16):
        return False
    return not zsum or (q.folded and dtype != "float32")


def _skip_unless_fits(group, K, dtype, scheme, n_out, tiles=()):
    if not _fits(group, K, dtype, scheme, n_out, tiles):
        pytest.skip(f"group {group}, K={K}, {dtype}, {scheme}, N_out={n_out}, {tiles}: not a layout the GEMV reads")


TUNINGS: dict[str, dense.GemvTuning] = {}  # kernel name -> a tuning other than the default (its launch needs it)


def _tiled(dtype, q, N, K, rt, epi, pro, bias, tiles):
    """The default tuning with ``tiles`` column tiles a block (or with the fields of a dict), or the
    GemvTuning given (16-bit activations; fp32 has one)."""
    if dtype == "float32" or not tiles or tiles[0] == 1:
        return None
    if isinstance(tiles[0], dense.GemvTuning):
        return tiles[0]
    t = dense.gemv_default_tuning(dtype, N, K, rt, epi, pro, q, bias)
    return replace(t, **tiles[0]) if isinstance(tiles[0], dict) else replace(t, tiles=tiles[0])


def _remember(kernel, tuning):
    if tuning is not None:
        TUNINGS[kernel.name] = tuning
    return kernel


def _case_kernel(dtype, q, N, K, epi, pro, bias, out_dtype, rt, *tiles):
    od = None if dtype == "float32" else out_dtype
    t = _tiled(dtype, q, N, K, rt, epi, pro, bias, tiles)
    return _remember(dense.gemv(dtype, N, K, rt, epi, bias, od, prologue=pro, eps=EPS, quant=q, tuning=t), t)


def _res_kernel(dtype, q, N, K, bias, rt, *tiles, res_early=False):
    t = _tiled(dtype, q, N, K, rt, "residual", "none", bias, tiles)
    return _remember(dense.gemv(dtype, N, K, rt, "residual", bias, quant=q, tuning=t, res_early=res_early), t)


def _rope_spec(H, KV, HD, layout, scaling):
    return dense.RopeEpilogue(H, KV, HD, layout, MAX_SEQ, scaling, 10000.0)


def _rope_kernel(dtype, q, H, KV, HD, K, layout, scaling, bias, rt, *tiles):
    t = _tiled(dtype, q, (H + 2 * KV) * HD, K, rt, "rope", "rmsnorm", bias, tiles)
    return _remember(dense.gemv(dtype, (H + 2 * KV) * HD, K, rt, "rope", bias, prologue="rmsnorm", eps=EPS,
                                rope=_rope_spec(H, KV, HD, layout, scaling), quant=q, tuning=t), t)


def _dequant_shapes():
    return [(100, 256), (64, 2560)]


@functools.lru_cache(maxsize=None)
def _kernels(dt, scheme, group) -> tuple:
    """Every kernel the tests launch for one activation dtype and QUANTS entry."""
    q = _q(scheme, group)
    ks = [_case_kernel(dt, q, *c) for c in CASES.values() if _fits(group, c[1], dt, scheme, _n_out(c[0], c[2]), c[7:])]
    ks += [_res_kernel(dt, q, *c) for c in RES_CASES if _fits(group, c[1], dt, scheme, c[0], c[4:])]
    if dt != "float32":
        ks += [_res_kernel(dt, q, *c, res_early=True) for c in RES_CASES if _fits(group, c[1], dt, scheme, c[0], c[4:])]
        ks += [_rope_kernel(dt, q, *c) for c in ROPE_CASES if _fits(group, c[3], dt, scheme, 16, c[8:])]
    ks += [dense.dequant(dt, N, K, q) for N, K in _dequant_shapes() if _fits(group, K, dt, scheme, N)]
    return tuple({k.name: k for k in ks}.values())


@functools.lru_cache(maxsize=None)
def _module(dt, scheme, group):
    """One program a dtype and QUANTS entry, compiled when a test first launches one of its kernels
    (a -k selection compiles only what it runs)."""
    return cupy.RawModule(code=module_source(list(_kernels(dt, scheme, group))), backend="nvrtc")


def run(kernel, shape, *args):
    where = next(key for key in ((dt, s, g) for dt in DTYPES for s, g in QUANTS) if any(
        k.name == kernel.name for k in _kernels(*key)))
    launch_kernel(_module(*where).get_function(kernel.name), shape, args)
    cupy.cuda.get_current_stream().synchronize()


def _n_out(N, epilogue):
    return N // 2 if epilogue == "silu_mul" else N


def _weight(rng, N, K, dtype, scheme, group):
    """A random weight quantized as the loader does: (device codes, scales, zeros or NULL) and w' (fp32);
    "c16" codes go to the device in "tile16" order, as the CUDA executor uploads them."""
    w = rng.standard_normal((N, K)).astype(np.float32) / np.float32(np.sqrt(K))
    base = scheme.removesuffix("c16")
    codes, scales, zeros = quantize(w, base, group, dtype)
    w_deq = dequantize(codes, to_float32(scales, dtype), None if zeros is None else to_float32(zeros, dtype), base,
                       group)
    stored = order_codes(codes, "tile16") if scheme.endswith("c16") else codes
    dev_args = (cupy.asarray(stored), cupy.asarray(scales), NULL if zeros is None else cupy.asarray(zeros))
    return dev_args, w_deq


def check(got: np.ndarray, ref: np.ndarray, dtype: str, what: str) -> None:
    """got: [rows + SPARE, ...] in float32 (spare rows must be untouched NaN); ref: [rows, ...]."""
    n = ref.shape[0]
    assert np.isnan(got[n:]).all(), f"{what}: wrote past the last row"
    got = got[:n]
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} elements not written / not finite"
    ref = ref.astype(np.float64)
    norm = float(np.linalg.norm(ref))
    rel = float(np.linalg.norm(got - ref)) / norm if norm > 0 else float(np.abs(got).max())
    if dtype == "float32":
        rtol, atol, rel_tol = 1e-5, 1e-5 * float(np.abs(ref).max()), 1e-5
    else:  # 16-bit activations, 16-bit or fp32 outputs
        rms = float(np.sqrt(np.mean(ref * ref)))
        rtol, atol, rel_tol = 3e-2, 3e-2 * rms, 3e-2
    diff = np.abs(got - ref)
    bad = diff > atol + rtol * np.abs(ref)
    assert rel <= rel_tol, f"{what}: relative error by norm {rel:.3g} > {rel_tol}"
    assert not bad.any(), (f"{what}: {np.count_nonzero(bad)} elements off, worst {diff.max():.3g} at "
                           f"{np.unravel_index(diff.argmax(), diff.shape)} (atol {atol:.3g}, rtol {rtol})")


def _params(fits):
    return [pytest.param(dt, s, g, id=f"{dt}-{s}{g or ''}") for dt in DTYPES for s, g in QUANTS if fits(dt, g)]


@pytest.mark.parametrize("dtype,scheme,group", _params(lambda dt, g: True))
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_quantized_gemv(dtype, scheme, group, case):
    N, K, epi, pro, bias, out_dtype, rt, *tiles = CASES[case]
    _skip_unless_fits(group, K, dtype, scheme, _n_out(N, epi), tiles)
    q = _q(scheme, group)
    k = _case_kernel(dtype, q, N, K, epi, pro, bias, out_dtype, rt, *tiles)
    out_dt = dtype if dtype == "float32" else (out_dtype or dtype)
    n_out = N // 2 if epi == "silu_mul" else N
    for rows in ROWS:
        rng = np.random.default_rng(rows * 31 + N + K)
        x = randn(rng, (rows, K), dtype, scale=3.0 if pro == "rmsnorm" else 1.0)  # the norm must rescale
        nw = rounded(1.0 + 0.2 * rng.standard_normal(K).astype(np.float32), dtype)
        b = randn(rng, (N,), dtype) if bias else None
        (codes, scales, zeros), w = _weight(rng, N, K, dtype, scheme, group)
        out = poisoned((rows + SPARE, n_out), out_dt)
        extra = [dev(nw, dtype)] if pro == "rmsnorm" else []
        run(k, dense.gemv_launch(dtype, N, K, rt, epi, TUNINGS.get(k.name), pro, q, bias), dev(x, dtype), codes,
            scales, zeros,
            dev(b, dtype) if bias else NULL, out, rows, *extra)
        attrs = {"eps": EPS, "dtype": dtype}
        if pro == "rmsnorm":
            ins = [x, nw, w] + ([b] if bias else [])
            ref = (ops._rms_gate_up_silu_ref if epi == "silu_mul" else ops._rms_linear_ref)(ins, attrs)[0]
        else:
            ins = [x, w] + ([b] if bias else [])
            ref = (ops._gate_up_silu_ref if epi == "silu_mul" else ops._linear_ref)(ins, attrs)[0]
        check(host(out, out_dt), ref, dtype, f"{k.name} rows={rows}")


@pytest.mark.parametrize("dtype,scheme,group", _params(lambda dt, g: True))
@pytest.mark.parametrize("case", RES_CASES, ids=lambda c: f"n{c[0]}k{c[1]}r{c[3]}"
                         + "".join(t.tag() if isinstance(t, dense.GemvTuning) else f"t{t}" if isinstance(t, int)
                                   else "".join(sorted(t)) for t in c[4:]))
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("res_early", [False, True], ids=["", "res_early"])
def test_quantized_gemv_residual(dtype, scheme, group, case, in_place, res_early):
    """res_early: the first tile's residual elements are read before the wait (one element a thread:
    row tiles up to 8 rows a 4-warp block; larger tiles read after it), the rest after it."""
    N, K, bias, rt, *tiles = case
    _skip_unless_fits(group, K, dtype, scheme, N, tiles)
    if res_early and dtype == "float32":
        pytest.skip("res_early is for 16-bit activations")
    q = _q(scheme, group)
    k = _res_kernel(dtype, q, N, K, bias, rt, *tiles, res_early=res_early)
    for rows in ROWS:
        rng = np.random.default_rng(rows * 17 + N)
        x = randn(rng, (rows, K), dtype)
        b = randn(rng, (N,), dtype) if bias else None
        (codes, scales, zeros), w = _weight(rng, N, K, dtype, scheme, group)
        res = randn(rng, (rows, N), dtype, scale=4.0)
        res_d = dev(np.concatenate([res, np.full((SPARE, N), np.nan, np.float32)]), dtype)
        out = res_d if in_place else poisoned((rows + SPARE, N), dtype)
        run(k, dense.gemv_launch(dtype, N, K, rt, "residual", TUNINGS.get(k.name), quant=q, has_bias=bias), dev(x, dtype),
            codes, scales,
            zeros,
            dev(b, dtype) if bias else NULL, out, rows, res_d)
        ref = ops._linear_residual_ref([x, w, res] + ([b] if bias else []), {"dtype": dtype})[0]
        check(host(out, dtype), ref, dtype, f"{k.name} rows={rows} in_place={in_place}")


@pytest.mark.parametrize("dtype,scheme,group", _params(lambda dt, g: dt != "float32"))
@pytest.mark.parametrize("case", ROPE_CASES,
                         ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}k{c[3]}{c[4]}r{c[7]}"
                         + "".join(t.tag() if isinstance(t, dense.GemvTuning) else f"t{t}" for t in c[8:]))
def test_quantized_gemv_rope_epilogue(dtype, scheme, group, case):
    """W (and its scales / zeros) in rope pair order, quantized as the pass does (rows commute with
    the order); q rotated to q_out, k and v into the caches, positions past the cache dropped."""
    H, KV, HD, K, layout, scaling, bias, rt, *tiles = case
    _skip_unless_fits(group, K, dtype, scheme, (H + 2 * KV) * HD, tiles)
    q = _q(scheme, group)
    k = _rope_kernel(dtype, q, *case)
    N = (H + 2 * KV) * HD
    order = rope_pair_order(H + 2 * KV, HD, layout)
    inv = cupy.asarray(attention.rope_inv_freq_table(HD, 10000.0, scaling))
    for rows in ROWS:
        rng = np.random.default_rng(rows * 13 + N)
        x = randn(rng, (rows, K), dtype, scale=3.0)
        nw = rounded(1.0 + 0.2 * rng.standard_normal(K).astype(np.float32), dtype)
        b = randn(rng, (N,), dtype)[order] if bias else None
        (codes, scales, zeros), w = _weight(rng, N, K, dtype, scheme, group)  # rows already in pair order
        seq_ids = np.arange(rows, dtype=np.int32) % MAX_BATCH
        positions = (np.arange(rows, dtype=np.int32) * 7) % MAX_SEQ
        if rows > 2:
            positions[-1] = MAX_SEQ + 3  # outside the cache: q only
        seq_lens = np.full(MAX_BATCH, 25, np.int32)
        kc = randn(rng, (MAX_BATCH, MAX_SEQ, KV, HD), dtype)
        vc = randn(rng, (MAX_BATCH, MAX_SEQ, KV, HD), dtype)
        kc_d, vc_d = dev(kc, dtype), dev(vc, dtype)
        q_out = poisoned((rows + SPARE, H, HD), dtype)
        run(k, dense.gemv_launch(dtype, N, K, rt, "rope", TUNINGS.get(k.name), "rmsnorm", q, bias), dev(x, dtype),
            codes, scales, zeros, dev(b, dtype) if bias else NULL, q_out, rows, dev(nw, dtype), cupy.asarray(positions),
            cupy.asarray(seq_ids), cupy.asarray(seq_lens), inv, kc_d, vc_d)
        attrs = {"eps": EPS, "dtype": dtype, "num_heads": H, "num_kv_heads": KV, "head_dim": HD, "layout": layout,
                 "theta": 10000.0, "scaling": scaling}
        tail = [b] if bias else []
        wide = np.zeros((MAX_BATCH, MAX_SEQ + 8, KV, HD), np.float32)  # room for the dropped token: q only
        q_ref = ops._rms_qkv_rope_ref([x, nw, w, positions, seq_ids, seq_lens, wide, wide] + tail, attrs)[0]
        kept = positions < MAX_SEQ
        _, k_ref, v_ref = ops._rms_qkv_rope_ref([x[kept], nw, w, positions[kept], seq_ids[kept], seq_lens, kc, vc]
                                                + tail, attrs)
        what = f"{k.name} rows={rows}"
        check(host(q_out, dtype).reshape(rows + SPARE, -1), q_ref.reshape(rows, -1), dtype, what + " q")
        for got, want in ((host(kc_d, dtype), rounded(k_ref, dtype)), (host(vc_d, dtype), rounded(v_ref, dtype))):
            untouched = np.ones((MAX_BATCH, MAX_SEQ), bool)
            untouched[seq_ids[kept], positions[kept]] = False
            np.testing.assert_array_equal(got[untouched], want[untouched], err_msg=what)
            rms = float(np.sqrt(np.mean(want[~untouched] ** 2)))
            np.testing.assert_allclose(got[~untouched], want[~untouched], rtol=3e-2, atol=3e-2 * rms, err_msg=what)


@pytest.mark.parametrize("dtype,scheme,group", _params(lambda dt, g: True))
@pytest.mark.parametrize("shape", _dequant_shapes(), ids=lambda s: f"n{s[0]}k{s[1]}")
def test_dequantize_kernel_is_exact(dtype, scheme, group, shape):
    """The prefill path's w': dequantize() in fp32, rounded once to the activation dtype, bit for bit."""
    N, K = shape
    _skip_unless_fits(group, K, dtype, scheme, N)
    q = _q(scheme, group)
    k = dense.dequant(dtype, N, K, q)
    rng = np.random.default_rng(N + K)
    (codes, scales, zeros), w = _weight(rng, N, K, dtype, scheme, group)
    out = poisoned((N + 1, K), dtype)  # one spare row
    run(k, dense.dequant_launch(N, K), codes, scales, zeros, out)
    got = cupy.asnumpy(out)
    want = storage(w, dtype)
    assert np.array_equal(got[:N].view(np.uint16 if dtype != "float32" else np.uint32),
                          want.view(np.uint16 if dtype != "float32" else np.uint32)), k.name
    assert np.isnan(host(out, dtype)[N:]).all(), f"{k.name}: wrote past the weight"
