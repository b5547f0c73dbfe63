"""Rope + KV append, decode attention and prefill attention on a GPU against the numpy references
of llamagraph.ir.ops, every element of every output, on random data.

Outputs and workspaces are poisoned first (NaN bit patterns); cache rows past each sequence's
last key hold NaN, so a kernel that reads a key it must not read shows up as NaN; cache rows a
kernel must not write are compared bit for bit with what they held before.
Tolerances: fp32 relative 1e-5 (rope) and 1e-4 (attention); fp16/bf16 relative-by-norm 1e-2 plus
an elementwise bound of 1e-2 relative + 2e-2 of the output's RMS.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from llamagraph.codegen import attention as A  # noqa: E402
from llamagraph.codegen.launch import seq_tiles  # noqa: E402
from llamagraph.codegen.render import module_source  # noqa: E402
from llamagraph.ir import ops  # noqa: E402


# tests/gpu/conftest.py skips these without a CUDA device
pytestmark = pytest.mark.gpu

DTYPES = ("float32", "float16", "bfloat16")
NULL = np.uint64(0)
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    # orig 16: the sequences below run past it, so the base grows per slot
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16},
}


# ---------------------------------------------------------------------------------------------
# host-side storage conversions and checks
# ---------------------------------------------------------------------------------------------

def storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage words: float32, float16, or bf16 as uint16 (round to nearest even)."""
    x = np.ascontiguousarray(x, np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    u = x.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bits).astype(np.uint16)


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a).astype(np.float32)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_f32(storage(x, dtype), dtype)


def seeded(*parts) -> np.random.Generator:
    """A generator seeded from the test's parameters, stable across processes."""
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def randn(rng, shape, dtype, scale=1.0) -> np.ndarray:
    return rounded(rng.standard_normal(shape).astype(np.float32) * np.float32(scale), dtype)


def poisoned(shape, dtype: str):
    if dtype == "bfloat16":
        return cupy.full(shape, 0xFFFF, dtype=cupy.uint16)
    return cupy.full(shape, np.nan, dtype=cupy.float16 if dtype == "float16" else cupy.float32)


def host(a, dtype: str) -> np.ndarray:
    return to_f32(cupy.asnumpy(a), dtype)


def assert_close(got: np.ndarray, ref: np.ndarray, dtype: str, rtol32: float, what: str, atol32: float = 0.0):
    """Every element finite and close; fp32: |d| <= rtol*|ref| + (rtol + atol32)*rms(ref)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite elements"
    rms = float(np.sqrt(np.mean(np.square(ref, dtype=np.float64)))) or 1.0
    diff = np.abs(got - ref)
    if dtype == "float32":
        bound = rtol32 * np.abs(ref) + (rtol32 + atol32) * rms
    else:
        norm = float(np.linalg.norm(got - ref) / (np.linalg.norm(ref) or 1.0))
        assert norm <= 1e-2, f"{what}: relative error by norm {norm:.3g} > 1e-2"
        bound = 1e-2 * np.abs(ref) + 2e-2 * rms
    bad = diff > bound
    if bad.any():
        i = np.unravel_index(int(np.argmax(diff - bound)), diff.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements off; worst at {i}: "
                             f"got {got[i]!r}, want {ref[i]!r}")


@functools.lru_cache(maxsize=None)
def _module(kernels: tuple):
    return cupy.RawModule(code=module_source(list(kernels)), backend="nvrtc", options=("--std=c++17",))


def functions(*kernels):
    mod = _module(tuple(kernels))
    return [mod.get_function(k.name) for k in kernels]


def go(fn, launch, args) -> None:
    if launch.smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = launch.smem
    fn(launch.grid, launch.block, args, shared_mem=launch.smem)


def packed(rng, seqs: list[tuple[int, int]], slots: list[int]):
    """Step inputs for sequences given as (first new position, new tokens), one cache slot each."""
    positions = np.concatenate([np.arange(p0, p0 + n) for p0, n in seqs]).astype(np.int32)
    seq_ids = np.concatenate([np.full(n, s) for (_, n), s in zip(seqs, slots)]).astype(np.int32)
    return positions, seq_ids


# ---------------------------------------------------------------------------------------------
# rope + KV append
# ---------------------------------------------------------------------------------------------

ROPE_HEADS = [(4, 2, 64), (8, 1, 128), (2, 2, 32), (3, 1, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(SCALINGS))
@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("mode", ["fused", "rope", "append"])
def test_rope_kv_append(dtype, kind, layout, mode):
    rng = seeded(dtype, kind, layout, mode)
    max_batch, max_seq, theta = 5, 160, 10000.0
    scaling = SCALINGS[kind]
    for H, KV, D in ROPE_HEADS:
        # slots out of order; one prompt, one chunked prefill, decode tokens, one slot left alone
        seqs, slots = [(0, 37), (100, 1), (20, 30), (5, 1), (150, 10)], [3, 0, 4, 1, 2]
        positions, seq_ids = packed(rng, seqs, slots)
        T = len(positions)
        seq_lens = np.zeros(max_batch, np.int32)
        for (p0, n), s in zip(seqs, slots):
            seq_lens[s] = p0 + n
        width = (H + 2 * KV) * D
        src = randn(rng, (T, width) if mode != "append" else (T, H + 2 * KV, D), dtype)
        kc0 = randn(rng, (max_batch, max_seq, KV, D), dtype)
        vc0 = randn(rng, (max_batch, max_seq, KV, D), dtype)
        attrs = dict(num_heads=H, num_kv_heads=KV, head_dim=D, theta=theta, scaling=scaling, layout=layout)
        (fn,) = functions(A.rope_kv_append(dtype, H, KV, D, layout, max_seq, mode, scaling, theta))
        launch = A.rope_kv_append_launch(T, H, KV, D, mode)
        inv = cupy.asarray(A.rope_inv_freq_table(D, theta, scaling))
        d_pos, d_ids, d_lens = cupy.asarray(positions), cupy.asarray(seq_ids), cupy.asarray(seq_lens)
        d_src = cupy.asarray(storage(src, dtype))
        kc, vc = cupy.asarray(storage(kc0, dtype)), cupy.asarray(storage(vc0, dtype))
        # dynamic rope: a 1-ulp difference in an inverse frequency moves an angle by ~pos * 6e-8
        atol = 2.4e-7 * float(positions.max()) if kind == "dynamic" else 0.0
        what = f"{mode} {kind} {layout} {dtype} H{H} KV{KV} D{D}"
        if mode == "rope":
            out = poisoned((T + 2, H + 2 * KV, D), dtype)
            go(fn, launch, (d_src, d_pos, d_ids, d_lens, inv, out, NULL, NULL, np.int32(T)))
            (ref,) = ops._rope_ref([src, positions, seq_ids, seq_lens], attrs)
            got = host(out, dtype)
            assert_close(got[:T], rounded(ref, dtype), dtype, 1e-5, what, atol)
            assert np.isnan(got[T:]).all(), f"{what}: wrote past the last token"
            continue
        if mode == "fused":
            out = poisoned((T + 2, H, D), dtype)
            go(fn, launch, (d_src, d_pos, d_ids, d_lens, inv, out, kc, vc, np.int32(T)))
            ref_q, ref_k, ref_v = ops._rope_kv_append_ref([src.reshape(T, width), positions, seq_ids, seq_lens, kc0, vc0],
                                                          attrs)
            got = host(out, dtype)
            assert_close(got[:T], rounded(ref_q, dtype), dtype, 1e-5, what + " q", atol)
            assert np.isnan(got[T:]).all(), f"{what}: wrote past the last token"
        else:
            go(fn, launch, (d_src, d_pos, d_ids, d_lens, NULL, NULL, kc, vc, np.int32(T)))
            ref_k, ref_v = ops._kv_append_ref([src, positions, seq_ids, kc0, vc0], attrs)
        touched = np.zeros((max_batch, max_seq), bool)
        touched[seq_ids, positions] = True
        for name, cache, before, ref in (("k", kc, kc0, ref_k), ("v", vc, vc0, ref_v)):
            raw_before = storage(before, dtype)
            raw = cupy.asnumpy(cache)
            assert np.array_equal(raw[~touched].view(np.uint8), raw_before[~touched].view(np.uint8)), \
                f"{what}: {name} cache rows outside the step's tokens changed"
            assert_close(to_f32(raw[touched], dtype), rounded(ref[touched], dtype), dtype, 1e-5, f"{what} {name}cache", atol)


@pytest.mark.parametrize("mode", ["fused", "append"])
def test_rope_kv_append_drops_positions_outside_the_cache(mode):
    rng = np.random.default_rng(7)
    dtype, H, KV, D, max_seq = "float32", 4, 2, 64, 32
    positions = np.array([max_seq, 3, -1], np.int32)
    seq_ids = np.array([0, 1, 1], np.int32)
    seq_lens = np.array([max_seq + 1, 4], np.int32)
    T = 3
    src = randn(rng, (T, (H + 2 * KV) * D), dtype)
    kc0, vc0 = randn(rng, (2, max_seq, KV, D), dtype), randn(rng, (2, max_seq, KV, D), dtype)
    (fn,) = functions(A.rope_kv_append(dtype, H, KV, D, "rotate_half", max_seq, mode))
    kc, vc = cupy.asarray(kc0), cupy.asarray(vc0)
    out = poisoned((T, H, D), dtype) if mode == "fused" else NULL
    inv = cupy.asarray(A.rope_inv_freq_table(D, 10000.0, None))
    go(fn, A.rope_kv_append_launch(T, H, KV, D, mode), (cupy.asarray(src), cupy.asarray(positions), cupy.asarray(seq_ids),
                                                          cupy.asarray(seq_lens), inv, out, kc, vc, np.int32(T)))
    kh, vh = cupy.asnumpy(kc), cupy.asnumpy(vc)
    keep = np.ones((2, max_seq), bool)
    keep[1, 3] = False  # the only in-range token
    assert np.array_equal(kh[keep], kc0[keep]) and np.array_equal(vh[keep], vc0[keep])
    np.testing.assert_array_equal(vh[1, 3], src[1].reshape(H + 2 * KV, D)[H + KV:])
    if mode == "fused":
        assert np.isfinite(cupy.asnumpy(out)).all()  # q is still rotated for every token


# ---------------------------------------------------------------------------------------------
# decode attention (split KV)
# ---------------------------------------------------------------------------------------------

# MHA, GQA 4, GQA 8 at D 64, MQA (group 32 split over 4 blocks), odd head dims
DECODE_HEADS = [(8, 8, 128), (32, 8, 128), (16, 2, 64), (32, 1, 128), (4, 2, 96), (6, 3, 80), (4, 1, 32)]


def _attention_case(rng, dtype, H, KV, D, qstride, lengths, max_seq, slots, max_batch):
    """Random q and caches; the cache of each slot holds NaN past its sequence's last key."""
    T = len(lengths)
    positions = np.array([n - 1 for n in lengths], np.int32)
    seq_ids = np.array(slots, np.int32)
    q = randn(rng, (T, qstride), dtype, 2.0)  # larger scores exercise the running max
    kc = randn(rng, (max_batch, max_seq, KV, D), dtype)
    vc = randn(rng, (max_batch, max_seq, KV, D), dtype)
    kc_dev, vc_dev = kc.copy(), vc.copy()
    used = np.zeros(max_batch, bool)
    for n, s in zip(lengths, slots):
        kc_dev[s, n:] = np.nan
        vc_dev[s, n:] = np.nan
        used[s] = True
    kc_dev[~used] = np.nan
    vc_dev[~used] = np.nan
    return q, kc, vc, kc_dev, vc_dev, positions, seq_ids


def _sdpa(q, kc, vc, positions, seq_ids, H, KV, D):
    attrs = dict(num_heads=H, num_kv_heads=KV, head_dim=D, scale=1.0 / math.sqrt(D))
    return ops._sdpa_ref([q.reshape(q.shape[0], -1, D), kc, vc, positions, seq_ids], attrs)[0]


def _run_decode(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids, **chunking):
    T = len(positions)
    split, combine = A.attention_decode(dtype, H, KV, D, qstride, max_seq, **chunking)
    f_split, f_combine = functions(split, combine)
    l_split, l_combine = A.attention_decode_launch(T, H, KV, D, max_seq, **chunking)
    ws = cupy.full(A.attention_decode_workspace_bytes(T, H, D, max_seq, **chunking) // 4, np.nan, cupy.float32)
    out = poisoned((T + 2, H * D), dtype)
    d_pos, d_ids = cupy.asarray(positions), cupy.asarray(seq_ids)
    go(f_split, l_split, (cupy.asarray(storage(q, dtype)), cupy.asarray(storage(kc_dev, dtype)),
                          cupy.asarray(storage(vc_dev, dtype)), d_pos, d_ids, ws, np.int32(T)))
    go(f_combine, l_combine, (ws, d_pos, out, np.int32(T)))
    got = host(out, dtype)
    assert np.isnan(got[T:]).all(), "wrote past the last token"
    return got[:T]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", DECODE_HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
@pytest.mark.parametrize("qkind", ["q", "qkv"])
def test_decode_attention(dtype, heads, qkind):
    H, KV, D = heads
    rng = seeded(dtype, heads, qkind)
    max_seq = 512
    chunk, _ = A.decode_chunking(max_seq)
    lengths = [1, 7, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, max_seq]
    slots = [5, 0, 7, 2, 1, 6, 3]  # slot 4 unused (all NaN)
    qstride = H * D if qkind == "q" else (H + 2 * KV) * D
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _attention_case(rng, dtype, H, KV, D, qstride, lengths, max_seq,
                                                                    slots, 8)
    got = _run_decode(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    ref = _sdpa(q, kc, vc, positions, seq_ids, H, KV, D)
    assert_close(got, rounded(ref, dtype), dtype, 1e-4, f"decode {dtype} H{H} KV{KV} D{D} {qkind}")


def _run_decode_fused(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids, launches=2,
                      **chunking):
    """The one-kernel decode attention, launched ``launches`` times on the same inputs: each launch
    must leave its split counters at 0, or the next would merge early."""
    T = len(positions)
    f_fused = functions(A.attention_decode_fused(dtype, H, KV, D, qstride, max_seq, **chunking))[0]
    l_split, _ = A.attention_decode_launch(T, H, KV, D, max_seq, **chunking)
    ws = cupy.full(A.attention_decode_workspace_bytes(T, H, D, max_seq, **chunking) // 4, np.nan, cupy.float32)
    counters = cupy.zeros(A.attention_decode_counter_bytes(T, H, KV) // 4 + 1, cupy.int32)
    counters[-1] = -7  # past the end: must stay untouched
    d_pos, d_ids = cupy.asarray(positions), cupy.asarray(seq_ids)
    args = (cupy.asarray(storage(q, dtype)), cupy.asarray(storage(kc_dev, dtype)), cupy.asarray(storage(vc_dev, dtype)),
            d_pos, d_ids, ws, counters)
    outs = []
    for _ in range(launches):
        out = poisoned((T + 2, H * D), dtype)
        go(f_fused, l_split, (*args, out, np.int32(T)))
        got = host(out, dtype)
        assert np.isnan(got[T:]).all(), "wrote past the last token"
        assert (cupy.asnumpy(counters[:-1]) == 0).all() and int(counters[-1]) == -7
        outs.append(got[:T])
    return outs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", DECODE_HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
def test_fused_decode_attention_is_bit_identical_to_split_and_combine(dtype, heads):
    """The last split block merges exactly as the combine kernel does, launch after launch."""
    H, KV, D = heads
    rng = seeded(dtype, heads, "fused")
    max_seq = 512
    chunk, _ = A.decode_chunking(max_seq)
    lengths = [1, 7, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, max_seq]
    slots = [5, 0, 7, 2, 1, 6, 3]
    qstride = (H + 2 * KV) * D
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _attention_case(rng, dtype, H, KV, D, qstride, lengths, max_seq,
                                                                    slots, 8)
    pair = _run_decode(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    first, second = _run_decode_fused(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    assert np.array_equal(first, pair) and np.array_equal(second, pair)
    ref = _sdpa(q, kc, vc, positions, seq_ids, H, KV, D)
    assert_close(first, rounded(ref, dtype), dtype, 1e-4, f"fused decode {dtype} H{H} KV{KV} D{D}")


@pytest.mark.parametrize("max_seq", [256, 300, 100, 416])
@pytest.mark.parametrize("heads", [(32, 8, 128), (32, 4, 64)], ids=lambda h: "h{}kv{}d{}".format(*h))
def test_fused_decode_attention_cluster_merge(max_seq, heads):
    """Caches whose splits fit one thread-block cluster (8, 5 of 10, 4 and 1 of 13 splits) merge in
    distributed shared memory, bit-identical to the split and combine pair, launch after launch."""
    H, KV, D = heads
    rng = seeded("float16", heads, max_seq)
    chunk, ms = A.decode_chunking(max_seq)
    cluster = A.decode_cluster(ms)
    lengths = sorted({n for n in (1, 2, chunk, chunk + 1, cluster * chunk - 1, cluster * chunk, cluster * chunk + 1,
                                  max_seq - 1, max_seq) if n <= max_seq})
    slots = list(range(len(lengths)))
    qstride = (H + 2 * KV) * D
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _attention_case(rng, "float16", H, KV, D, qstride, lengths,
                                                                    max_seq, slots, len(slots))
    pair = _run_decode("float16", H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    first, second = _run_decode_fused("float16", H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    assert np.array_equal(first, pair) and np.array_equal(second, pair)
    ref = _sdpa(q, kc, vc, positions, seq_ids, H, KV, D)
    assert_close(first, rounded(ref, "float16"), "float16", 1e-4, f"cluster decode H{H} KV{KV} D{D} s{max_seq}")


def test_fused_decode_attention_long_cache():
    H, KV, D, max_seq = 8, 2, 64, 8192
    rng = np.random.default_rng(12)
    chunk, ms = A.decode_chunking(max_seq)
    lengths = [1, chunk * ms - 1, chunk * ms + 1, 5000, max_seq]
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _attention_case(rng, "float16", H, KV, D, H * D, lengths, max_seq,
                                                                    [0, 1, 2, 3, 4], 5)
    pair = _run_decode("float16", H, KV, D, H * D, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    for got in _run_decode_fused("float16", H, KV, D, H * D, max_seq, q, kc_dev, vc_dev, positions, seq_ids):
        assert np.array_equal(got, pair)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_attention_long_cache_multi_chunk_splits(dtype):
    # max_seq 8192 with at most 64 splits: lengths past 64 * CHUNK use splits of several chunks
    H, KV, D, max_seq = 8, 2, 64, 8192
    rng = np.random.default_rng(11)
    chunk, ms = A.decode_chunking(max_seq)
    assert chunk * ms < max_seq
    lengths = [1, chunk * ms - 1, chunk * ms, chunk * ms + 1, 5000, max_seq]
    slots = [0, 1, 2, 3, 4, 5]
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _attention_case(rng, dtype, H, KV, D, H * D, lengths, max_seq,
                                                                    slots, 6)
    got = _run_decode(dtype, H, KV, D, H * D, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    ref = _sdpa(q, kc, vc, positions, seq_ids, H, KV, D)
    assert_close(got, rounded(ref, dtype), dtype, 1e-4, f"decode long {dtype}")
    # explicit chunking arguments reach both kernels and the workspace
    got = _run_decode(dtype, H, KV, D, H * D, max_seq, q, kc_dev, vc_dev, positions, seq_ids, chunk=128, max_splits=5)
    assert_close(got, rounded(ref, dtype), dtype, 1e-4, f"decode long {dtype} chunk 128 x 5")


def test_decode_attention_replays_in_a_cuda_graph_as_sequences_grow():
    dtype, H, KV, D, max_seq = "float16", 32, 8, 128, 512
    rng = np.random.default_rng(5)
    T, slots = 3, np.array([2, 0, 1], np.int32)
    q = randn(rng, (T, H * D), dtype)
    kc = randn(rng, (3, max_seq, KV, D), dtype)
    vc = randn(rng, (3, max_seq, KV, D), dtype)
    split, combine = A.attention_decode(dtype, H, KV, D, H * D, max_seq)
    f_split, f_combine = functions(split, combine)
    l_split, l_combine = A.attention_decode_launch(T, H, KV, D, max_seq)
    ws = cupy.zeros(A.attention_decode_workspace_bytes(T, H, D, max_seq) // 4, cupy.float32)
    d_q, d_k, d_v = (cupy.asarray(storage(x, dtype)) for x in (q, kc, vc))
    d_pos, d_ids = cupy.zeros(T, cupy.int32), cupy.asarray(slots)
    out = cupy.zeros((T, H * D), cupy.float16)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        go(f_split, l_split, (d_q, d_k, d_v, d_pos, d_ids, ws, np.int32(T)))
        go(f_combine, l_combine, (ws, d_pos, out, np.int32(T)))
        graph = stream.end_capture()
    for lengths in ([1, 2, 3], [64, 65, 63], [200, 7, 512], [300, 130, 129]):
        positions = np.array(lengths, np.int32) - 1
        d_pos.set(positions, stream=stream)
        graph.launch(stream)
        stream.synchronize()
        ref = _sdpa(q, kc, vc, positions, slots, H, KV, D)
        assert_close(host(out, dtype), rounded(ref, dtype), dtype, 1e-4, f"graph replay at lengths {lengths}")


def test_decode_attention_bandwidth_report(record_property):
    """Not a timed assertion: prints the K/V bandwidth of the split kernel for the lead's notes."""
    dtype, D, n_keys = "float16", 128, 4096
    for H, KV, T in ((32, 32, 1), (32, 8, 1), (32, 8, 8)):
        max_seq = n_keys
        split, combine = A.attention_decode(dtype, H, KV, D, H * D, max_seq)
        f_split, f_combine = functions(split, combine)
        l_split, l_combine = A.attention_decode_launch(T, H, KV, D, max_seq)
        q = cupy.random.standard_normal((T, H * D), dtype=cupy.float32).astype(cupy.float16)
        kc = cupy.random.standard_normal((T, max_seq, KV, D), dtype=cupy.float32).astype(cupy.float16)
        vc = cupy.random.standard_normal((T, max_seq, KV, D), dtype=cupy.float32).astype(cupy.float16)
        pos = cupy.full(T, n_keys - 1, cupy.int32)
        ids = cupy.arange(T, dtype=cupy.int32)
        ws = cupy.empty(A.attention_decode_workspace_bytes(T, H, D, max_seq) // 4, cupy.float32)
        out = cupy.empty((T, H * D), cupy.float16)

        def step():
            go(f_split, l_split, (q, kc, vc, pos, ids, ws, np.int32(T)))
            go(f_combine, l_combine, (ws, pos, out, np.int32(T)))

        for _ in range(3):
            step()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        reps = 50
        start.record()
        for _ in range(reps):
            step()
        end.record()
        end.synchronize()
        us = cupy.cuda.get_elapsed_time(start, end) * 1e3 / reps
        nbytes = 2 * T * n_keys * KV * D * 2
        line = f"decode attention H{H} KV{KV} D{D} T{T} keys {n_keys}: {us:.1f} us, K/V {nbytes / us / 1e3:.0f} GB/s"
        print(line)
        record_property(f"decode_bw_h{H}_kv{KV}_t{T}", line)
        assert bool(cupy.isfinite(out).all())


# ---------------------------------------------------------------------------------------------
# prefill attention (tiled, packed sequences; tensor cores for fp16/bf16 with head_dim % 16 == 0)
# ---------------------------------------------------------------------------------------------

# (4, 2, 72): 16-bit storage off the tensor-core path (head dim not a multiple of 16)
PREFILL_HEADS = [(4, 4, 128), (8, 2, 64), (4, 1, 96), (2, 1, 80), (4, 2, 32), (4, 2, 72)]


def _prefill_case(rng, dtype, H, KV, D, qstride, seqs, slots, max_seq, max_batch):
    """Random q and caches for sequences given as (first new position, new tokens): keys before
    the first new position are earlier chunks already in the cache; every cache row past a
    sequence's last key, and every slot no sequence uses, holds NaN."""
    positions, seq_ids = packed(rng, seqs, slots)
    q = randn(rng, (len(positions), qstride), dtype, 2.0)  # larger scores exercise the running max
    kc = randn(rng, (max_batch, max_seq, KV, D), dtype)
    vc = randn(rng, (max_batch, max_seq, KV, D), dtype)
    kc_dev, vc_dev = kc.copy(), vc.copy()
    used = np.zeros(max_batch, bool)
    for (p0, n), s in zip(seqs, slots):
        kc_dev[s, p0 + n:] = np.nan
        vc_dev[s, p0 + n:] = np.nan
        used[s] = True
    kc_dev[~used] = np.nan
    vc_dev[~used] = np.nan
    return q, kc, vc, kc_dev, vc_dev, positions, seq_ids


def _run_prefill(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids, kernel=None, smem=None):
    """The prefill kernel (``attention_prefill``'s unless given) over one packed step; poisoned
    output rows past the step must stay untouched."""
    T = len(positions)
    kernel = kernel or A.attention_prefill(dtype, H, KV, D, qstride, max_seq)
    (fn,) = functions(kernel)
    tiles = seq_tiles(seq_ids, A.attention_prefill_rows(D))
    launch = A.attention_prefill_launch(len(tiles), H, D)
    if smem is not None:
        launch = dataclasses.replace(launch, smem=smem)
    out = poisoned((T + 2, H * D), dtype)
    go(fn, launch, (cupy.asarray(storage(q, dtype)), cupy.asarray(storage(kc_dev, dtype)),
                    cupy.asarray(storage(vc_dev, dtype)), cupy.asarray(positions), cupy.asarray(seq_ids),
                    cupy.asarray(tiles), out, np.int32(len(tiles))))
    got = host(out, dtype)
    assert np.isnan(got[T:]).all(), "wrote past the last row"
    return got[:T]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", PREFILL_HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
@pytest.mark.parametrize("qkind", ["q", "qkv"])
def test_prefill_attention(dtype, heads, qkind):
    H, KV, D = heads
    rng = seeded(dtype, heads, qkind, "prefill")
    max_seq, max_batch = 320, 8
    bq = A.attention_prefill_rows(D)
    # prompts of unequal lengths around the tile size, plus chunked prefills whose earlier keys
    # (positions < first) are already in the cache
    seqs = [(0, 1), (0, bq - 1), (0, bq), (0, bq + 1), (0, 3 * bq + 17), (100, 37), (bq, bq), (250, 70)]
    slots = [6, 0, 3, 1, 7, 2, 5, 4]
    qstride = H * D if qkind == "q" else (H + 2 * KV) * D
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _prefill_case(rng, dtype, H, KV, D, qstride, seqs, slots,
                                                                  max_seq, max_batch)
    got = _run_prefill(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    ref = _sdpa(q, kc, vc, positions, seq_ids, H, KV, D)
    assert_close(got, rounded(ref, dtype), dtype, 1e-4, f"prefill {dtype} H{H} KV{KV} D{D} {qkind}")


# ragged prompts around the 64-row query tiles and the kernel's 32-key warp halves, packed in one
# step; four are later chunks of their sequence (first position > 0, earlier keys from the cache),
# one of them starting off any tile boundary and one ending at the last cache row
RAGGED = [(0, 1), (0, 15), (0, 16), (0, 17), (0, 63), (0, 64), (0, 65), (0, 130), (0, 300),
          (40, 15), (129, 65), (64, 130), (212, 300)]
RAGGED_SLOTS = [3, 0, 12, 5, 1, 7, 9, 2, 11, 4, 6, 10, 8]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_attention_tensor_cores_ragged_chunked(dtype, group, D):
    H = 8
    KV = H // group
    assert A.prefill_uses_mma(dtype, D)
    rng = seeded(dtype, group, D, "prefill ragged")
    max_seq, max_batch = 512, 13
    qstride = (H + 2 * KV) * D if group == 4 else H * D  # q inside the unfused qkv rows, or alone
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _prefill_case(rng, dtype, H, KV, D, qstride, RAGGED,
                                                                  RAGGED_SLOTS, max_seq, max_batch)
    got = _run_prefill(dtype, H, KV, D, qstride, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    ref = _sdpa(q, kc, vc, positions, seq_ids, H, KV, D)
    assert_close(got, rounded(ref, dtype), dtype, 1e-4, f"prefill ragged {dtype} group {group} D{D}")


@pytest.mark.parametrize("D", [64, 128])
def test_prefill_attention_tensor_core_variants(D):
    """The register and pipeline plans the benchmark compares all compute the same attention."""
    dtype, H, KV = "float16", 8, 2
    rng = seeded(D, "prefill variants")
    max_seq, max_batch = 512, 13
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _prefill_case(rng, dtype, H, KV, D, H * D, RAGGED,
                                                                  RAGGED_SLOTS, max_seq, max_batch)
    ref = rounded(_sdpa(q, kc, vc, positions, seq_ids, H, KV, D), dtype)
    for q_regs, min_blocks, stages in ((False, 2, 1), (True, 1, 2), (False, 1, 2), (True, 2, 1)):
        kernel = A.attention_prefill_mma(dtype, H, KV, D, H * D, max_seq, q_regs=q_regs, min_blocks=min_blocks,
                                         stages=stages)
        got = _run_prefill(dtype, H, KV, D, H * D, max_seq, q, kc_dev, vc_dev, positions, seq_ids, kernel=kernel,
                           smem=A.attention_prefill_mma_smem(D, stages))
        assert_close(got, ref, dtype, 1e-4, f"prefill variant {kernel.name}")


def _causal_blas(q, kc, vc, positions, slot, H, KV, D):
    """Causal attention of one sequence's rows with per-head BLAS matmuls (fp32): ``_sdpa_ref``'s
    semantics at a cost a 2048-token prompt can afford; checked against it below."""
    T = len(positions)
    n = int(positions.max()) + 1
    qh = q.reshape(T, -1, D)[:, :H]
    causal = np.arange(n)[None, :] <= positions[:, None]  # [T, n]
    out = np.empty((T, H, D), np.float32)
    for h in range(H):
        k, v = kc[slot, :n, h // (H // KV)], vc[slot, :n, h // (H // KV)]  # [n, D]
        s = np.where(causal, (qh[:, h] @ k.T) * np.float32(1.0 / math.sqrt(D)), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v
    return out.reshape(T, H * D)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_prefill_attention_long_prompt(dtype):
    """A Llama-3-8B layer's attention over a 2048-token prompt (H 32, KV 8, D 128): P is rounded
    to 16 bits for the P.V product over up to 2048 keys, and the error stays within the 16-bit
    bounds (1e-2 relative by norm)."""
    H, KV, D, T = 32, 8, 128, 2048
    rng = seeded(dtype, "prefill long")
    max_seq, max_batch = T, 2
    q, kc, vc, kc_dev, vc_dev, positions, seq_ids = _prefill_case(rng, dtype, H, KV, D, (H + 2 * KV) * D,
                                                                  [(0, T)], [1], max_seq, max_batch)
    got = _run_prefill(dtype, H, KV, D, (H + 2 * KV) * D, max_seq, q, kc_dev, vc_dev, positions, seq_ids)
    ref = _causal_blas(q, kc, vc, positions, 1, H, KV, D)
    rows = np.r_[0:70, 1000:1100, T - 70:T]  # the BLAS reference against the ops reference on some rows
    np.testing.assert_allclose(ref[rows], _sdpa(q[rows], kc, vc, positions[rows], seq_ids[rows], H, KV, D),
                               rtol=1e-4, atol=1e-5)
    assert_close(got, rounded(ref, dtype), dtype, 1e-4, f"prefill 2048 tokens {dtype}")
    # the second half as a later chunk: its first 1024 keys come from the cache
    half = T // 2
    got2 = _run_prefill(dtype, H, KV, D, (H + 2 * KV) * D, max_seq, q[half:], kc_dev, vc_dev, positions[half:],
                        seq_ids[half:])
    assert_close(got2, rounded(ref[half:], dtype), dtype, 1e-4, f"prefill 1024 + 1024 tokens {dtype}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_then_decode_matches_one_pass(dtype):
    """rope_kv_append (fused) over a packed prefill, then a decode step per sequence: every output
    equals the numpy graph of the same step (rope reference, then sdpa reference)."""
    H, KV, D, max_seq, max_batch = 8, 2, 64, 256, 3
    rng = np.random.default_rng(3)
    attrs = dict(num_heads=H, num_kv_heads=KV, head_dim=D, theta=10000.0, scaling=None, layout="rotate_half",
                 scale=1.0 / math.sqrt(D))
    rope = A.rope_kv_append(dtype, H, KV, D, "rotate_half", max_seq, "fused")
    prefill = A.attention_prefill(dtype, H, KV, D, H * D, max_seq)
    split, combine = A.attention_decode(dtype, H, KV, D, H * D, max_seq)
    f_rope, f_prefill, f_split, f_combine = functions(rope, prefill, split, combine)
    inv = cupy.asarray(A.rope_inv_freq_table(D, 10000.0, None))
    kc_ref = np.zeros((max_batch, max_seq, KV, D), np.float32)
    vc_ref = np.zeros_like(kc_ref)
    kc, vc = cupy.asarray(storage(kc_ref, dtype)), cupy.asarray(storage(vc_ref, dtype))
    seq_lens = np.zeros(max_batch, np.int32)
    steps = [([(0, 70), (0, 5), (0, 130)], [1, 2, 0]), ([(70, 1), (5, 1), (130, 1)], [1, 2, 0])]
    for seqs, slots in steps:
        positions, seq_ids = packed(rng, seqs, slots)
        T = len(positions)
        for (p0, n), s in zip(seqs, slots):
            seq_lens[s] = p0 + n
        qkv = randn(rng, (T, (H + 2 * KV) * D), dtype)
        d_pos, d_ids, d_lens = cupy.asarray(positions), cupy.asarray(seq_ids), cupy.asarray(seq_lens)
        q_rot = poisoned((T, H, D), dtype)
        go(f_rope, A.rope_kv_append_launch(T, H, KV, D, "fused"),
           (cupy.asarray(storage(qkv, dtype)), d_pos, d_ids, d_lens, inv, q_rot, kc, vc, np.int32(T)))
        out = poisoned((T, H * D), dtype)
        if T > len(seqs):
            tiles = seq_tiles(seq_ids, A.attention_prefill_rows(D))
            go(f_prefill, A.attention_prefill_launch(len(tiles), H, D),
               (q_rot, kc, vc, d_pos, d_ids, cupy.asarray(tiles), out, np.int32(len(tiles))))
        else:
            ws = cupy.full(A.attention_decode_workspace_bytes(T, H, D, max_seq) // 4, np.nan, cupy.float32)
            l_split, l_combine = A.attention_decode_launch(T, H, KV, D, max_seq)
            go(f_split, l_split, (q_rot, kc, vc, d_pos, d_ids, ws, np.int32(T)))
            go(f_combine, l_combine, (ws, d_pos, out, np.int32(T)))
        ref_q, kc_ref, vc_ref = ops._rope_kv_append_ref([qkv, positions, seq_ids, seq_lens, kc_ref, vc_ref], attrs)
        ref_q, kc_ref, vc_ref = rounded(ref_q, dtype), rounded(kc_ref, dtype), rounded(vc_ref, dtype)
        assert_close(host(q_rot, dtype), ref_q, dtype, 1e-5, "q_rot")
        (ref,) = ops._sdpa_ref([ref_q, kc_ref, vc_ref, positions, seq_ids], attrs)
        assert_close(host(out, dtype), rounded(ref, dtype), dtype, 1e-4, f"attention T={T}")
