"""Attention-side kernels (rope + KV append, decode / prefill attention, sampling): rendering is
deterministic, names encode every constant, every variant compiles for sm_90, and the kernels
that decide decode speed do not spill.

Compilation (NVRTC from the nvidia-cuda-nvrtc wheel, else nvcc) needs no GPU. Numerics are
checked on a GPU in tests/gpu/test_kernels_attention.py and tests/gpu/test_sampling.py.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest

from llamagraph.codegen import attention as A
from llamagraph.codegen import nvrtc
from llamagraph.codegen.launch import Scaled, seq_tiles
from llamagraph.codegen.sample import sample, sample_launch
from llamagraph.codegen.render import module_source
from llamagraph.ir import ops

DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("rotate_half", "interleaved")
MODES = ("fused", "rope", "append")
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "dynamic": {"rope_type": "dynamic", "factor": 2.5, "original_max_position_embeddings": 2048},
}
# (H, KV, D): Llama-2-7B (MHA), Llama-3-8B (GQA 4), Llama-3.2-1B (GQA 4, D 64), TinyLlama (GQA 8),
# MQA with a group of 32 (split over 4 blocks), Llama-3-70B (GQA 8), odd head dims
HEADS = [(32, 32, 128), (32, 8, 128), (32, 8, 64), (32, 4, 64), (32, 1, 128), (64, 8, 128), (8, 2, 96), (4, 2, 80),
         (4, 4, 32)]
MAX_SEQ = 4096
VOCABS = (128256, 32000, 50, 101)


def _rope_kernels(dtype: str) -> list:
    ks = []
    for H, KV, D in [(32, 8, 128), (32, 32, 64), (4, 1, 32)]:
        for layout in LAYOUTS:
            for mode in MODES:
                for scaling in SCALINGS.values():
                    ks.append(A.rope_kv_append(dtype, H, KV, D, layout, MAX_SEQ, mode, scaling, 500000.0))
    return ks


def _decode_kernels(dtype: str) -> list:
    ks = []
    for H, KV, D in HEADS:
        for qstride in (H * D, (H + 2 * KV) * D):
            ks += A.attention_decode(dtype, H, KV, D, qstride, MAX_SEQ)
    ks += A.attention_decode(dtype, 32, 8, 128, 32 * 128, 131072)  # long cache: chunks of several CHUNKs
    return ks


# prefill adds head dims off the tensor-core path (72: not a multiple of 16) and at its end (256)
PREFILL_HEADS = HEADS + [(4, 2, 72), (8, 1, 256)]


def _prefill_kernels(dtype: str) -> list:
    return [A.attention_prefill(dtype, H, KV, D, qs, MAX_SEQ)
            for H, KV, D in PREFILL_HEADS for qs in (H * D, (H + 2 * KV) * D)]


def _prefill_mma_variants() -> list:
    """The tensor-core kernel's non-default register and pipeline plans (the benchmark compares them)."""
    return [A.attention_prefill_mma(dtype, 32, 8, D, 32 * D, MAX_SEQ, q_regs=qr, min_blocks=mb, stages=st)
            for dtype in ("float16", "bfloat16") for D in (64, 128)
            for qr, mb, st in ((False, 2, 1), (True, 1, 2), (False, 1, 2))]


def _all(dtype: str) -> list:
    return _rope_kernels(dtype) + _decode_kernels(dtype) + _prefill_kernels(dtype)


def _samplers() -> list:
    return [sample(V) for V in VOCABS]


def _module(dtype: str) -> list:
    """Every variant of one dtype (the sampler, which has no storage dtype, rides with float32)."""
    return _all(dtype) + (_samplers() if dtype == "float32" else [])


@functools.lru_cache(maxsize=None)
def _compiled(dtype: str):
    """One compile per dtype, shared by the tests below."""
    if nvrtc.available() is None:
        return None
    return nvrtc.compile_source(module_source(_module(dtype)), arch="sm_90", options=("--std=c++17",))


def _resources(dtype: str) -> dict:
    res = _compiled(dtype)
    if res is None:
        pytest.skip("no CUDA compiler (NVRTC wheel or nvcc)")
    return res.kernels


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

def test_rendering_is_deterministic():
    for dtype in DTYPES:
        a, b = _all(dtype), _all(dtype)
        assert [k.name for k in a] == [k.name for k in b]
        assert module_source(a).encode() == module_source(b).encode()
    assert module_source([sample(V) for V in VOCABS]) == module_source([sample(V) for V in VOCABS])


def test_names_are_distinct_per_constants():
    # every distinct source has its own name and every name one source (module_source enforces the latter)
    kernels = [k for dtype in DTYPES for k in _all(dtype)] + [sample(V) for V in VOCABS]
    by_name: dict[str, str] = {}
    for k in kernels:
        assert by_name.setdefault(k.name, k.source) == k.source, k.name
    by_source = {}
    for name, src in by_name.items():
        assert by_source.setdefault(src, name) == name, f"{name} and {by_source[src]} render the same code"
    # each constant shows in the name
    base = dict(dtype="float16", H=32, KV=8, D=128, layout="rotate_half", max_seq=4096, mode="fused",
                rope_scaling=SCALINGS["dynamic"], theta=10000.0)
    variants = [dict(base, **change) for change in (
        {}, {"dtype": "bfloat16"}, {"H": 16}, {"KV": 4}, {"D": 64}, {"layout": "interleaved"}, {"max_seq": 2048},
        {"mode": "rope"}, {"theta": 500000.0}, {"rope_scaling": dict(SCALINGS["dynamic"], factor=4.0)},
        {"rope_scaling": dict(SCALINGS["dynamic"], original_max_position_embeddings=4096)}, {"rope_scaling": None},
    )]
    names = [A.rope_kv_append(**v).name for v in variants]
    assert len(set(names)) == len(names), names
    split_names = {A.attention_decode(*args)[0].name for args in [
        ("float16", 32, 8, 128, 4096, 4096), ("float32", 32, 8, 128, 4096, 4096), ("float16", 32, 4, 128, 4096, 4096),
        ("float16", 32, 8, 64, 2048, 4096), ("float16", 32, 8, 128, 6144, 4096), ("float16", 32, 8, 128, 4096, 2048),
        ("float16", 32, 8, 128, 4096, 4096, 128),
    ]}
    assert len(split_names) == 7
    assert len({sample(V).name for V in VOCABS}) == len(VOCABS)


def test_static_rope_ignores_theta_in_code_and_name():
    # static rope types read inv_freq from the host table, so theta does not change the kernel
    a = A.rope_kv_append("float16", 32, 8, 128, "rotate_half", 4096, "fused", None, 10000.0)
    b = A.rope_kv_append("float16", 32, 8, 128, "rotate_half", 4096, "fused", SCALINGS["llama3"], 500000.0)
    assert a == b
    # append mode never rotates: layout and rope type do not matter
    c = A.rope_kv_append("float32", 4, 2, 64, "rotate_half", 256, "append", SCALINGS["dynamic"])
    d = A.rope_kv_append("float32", 4, 2, 64, "interleaved", 256, "append", None)
    assert c == d


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError):
        A.rope_kv_append("float16", 32, 8, 128, "sideways", 4096, "fused")
    with pytest.raises(ValueError):
        A.rope_kv_append("float16", 32, 8, 128, "rotate_half", 4096, "both")
    with pytest.raises(ValueError):
        A.rope_kv_append("int8", 32, 8, 128, "rotate_half", 4096, "fused")
    with pytest.raises(ValueError):
        A.attention_decode("float16", 32, 6, 128, 4096, 4096)  # H % KV != 0
    with pytest.raises(ValueError):
        A.attention_decode("float16", 32, 8, 127, 32 * 127, 4096)  # odd head dim
    with pytest.raises(ValueError):
        A.attention_prefill("float16", 32, 8, 128, 100, 4096)  # q stride not a multiple of D


# ---------------------------------------------------------------------------------------------
# host-side helpers
# ---------------------------------------------------------------------------------------------

def test_seq_tiles():
    seq_ids = np.repeat([0, 1, 3], [70, 5, 129])  # slot 2 has no rows in this step
    tiles = seq_tiles(seq_ids, 64)
    assert tiles.dtype == np.int32
    assert tiles.tolist() == [[0, 64], [64, 6], [70, 5], [75, 64], [139, 64], [203, 1]]
    assert seq_tiles(np.zeros(0, np.int32), 64).shape == (0, 2)
    # every row in exactly one tile, tiles within one sequence and <= bq rows
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 200, 9)
    t = seq_tiles(np.repeat(rng.permutation(9), counts), 64)
    covered = np.concatenate([np.arange(f, f + n) for f, n in t])
    assert np.array_equal(covered, np.arange(counts.sum()))
    assert (t[:, 1] >= 1).all() and (t[:, 1] <= 64).all()
    seq_of = np.repeat(np.arange(9), counts)
    assert all(seq_of[f] == seq_of[f + n - 1] for f, n in t)


def test_prefill_rows_and_launch():
    # one launch serves both kernels of a head dim (the lowering passes no dtype): enough shared
    # memory for either, the tile rows and threads both expect
    for D in (32, 64, 72, 80, 96, 128, 256):
        bq = A.attention_prefill_rows(D)
        la = A.attention_prefill_launch(7, 32, D)
        assert la.grid == (7, 32, 1) and la.block == (256, 1, 1)
        assert bq == 64 and 0 < la.smem <= 227 * 1024
        assert la.smem >= A._prefill_tiling(D)["smem"]
        if A.prefill_uses_mma("float16", D):
            assert la.smem >= A.attention_prefill_mma_smem(D)
            # Q, two K and two V tiles of 64 rows, 16-bit, rows padded by 16 bytes
            assert A.attention_prefill_mma_smem(D) == (64 + 4 * 64) * (D + 8) * 2
    assert A.attention_prefill_launch(1, 32, 128).smem <= 227 * 1024 // 2  # two blocks per SM
    assert A.attention_prefill_launch("seq_tiles.r64.n", 32, 128).at({"seq_tiles.r64.n": 3}).grid == (3, 32, 1)


def test_prefill_uses_tensor_cores_for_16_bit_multiples_of_16():
    for dtype in DTYPES:
        for D in (32, 64, 72, 80, 96, 128, 256, 320):
            k = A.attention_prefill(dtype, 8, 2, D, 8 * D, MAX_SEQ)
            mma = dtype != "float32" and D % 16 == 0 and D <= 256
            assert A.prefill_uses_mma(dtype, D) == mma
            assert k.name.startswith("attn_prefill_mma_") == mma, k.name
            assert ("mma.sync.aligned.m16n8k16" in k.source) == mma, k.name
            if mma:
                # Q.K^T and P.V on tensor cores in the storage dtype, fp32 accumulate, fragments by
                # ldmatrix (V transposed), tiles staged by cp.async
                kind = "bf16.bf16" if dtype == "bfloat16" else "f16.f16"
                assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.f32" in k.source
                assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in k.source
                assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in k.source
                assert "cp.async.cg.shared.global" in k.source
    with pytest.raises(ValueError):
        A.attention_prefill_mma("float32", 8, 2, 64, 512, MAX_SEQ)
    with pytest.raises(ValueError):
        A.attention_prefill_mma("float16", 8, 2, 72, 576, MAX_SEQ)
    with pytest.raises(ValueError):
        A.attention_prefill_mma("float16", 8, 2, 64, 512, MAX_SEQ, stages=3)


def test_prefill_mma_names_encode_every_constant():
    base = dict(dtype="float16", H=32, KV=8, D=128, qstride=4096, max_seq=4096)
    variants = [dict(base, **c) for c in ({}, {"dtype": "bfloat16"}, {"H": 16}, {"KV": 4}, {"D": 64},
                                          {"qstride": 6144}, {"max_seq": 2048}, {"scale": 0.1}, {"q_regs": True},
                                          {"min_blocks": 1}, {"stages": 1})]
    kernels = [A.attention_prefill_mma(**v) for v in variants]
    assert len({k.name for k in kernels}) == len(kernels)
    assert len({k.source for k in kernels}) == len(kernels)


def test_decode_chunking_and_workspace():
    assert A.decode_chunking(4096) == (32, 64)
    assert A.decode_chunking(1000) == (32, 32)
    assert A.decode_chunking(131072) == (32, 64)
    assert A.decode_chunking(4096, chunk=256) == (256, 16)
    assert A.decode_chunking(4096, max_splits=8) == (32, 8)
    assert A.attention_decode_workspace_bytes(8, 32, 128, 4096) == 8 * 32 * 64 * 130 * 4
    # a block takes at most 2 heads of a GQA group: 8 KV heads of 4 q heads -> 16 blocks a split
    split, combine = A.attention_decode_launch(3, 32, 8, 128, 4096)
    assert split.grid == (16, 3, 64) and split.block == (128, 1, 1)
    assert combine.grid == (32, 3, 1) and combine.block[0] >= 128
    split, _ = A.attention_decode_launch(2, 32, 1, 128, 4096)  # MQA: the group of 32 is split 16 ways
    assert split.grid == (16, 2, 64)
    split, _ = A.attention_decode_launch(1, 32, 4, 64, 2048)  # TinyLlama: 4 KV heads of 8 q heads
    assert split.grid == (16, 1, 64)
    assert A.attention_decode_launch(1, 9, 3, 64, 2048)[0].grid == (9, 1, 64)  # a group of 3: one head a block
    # a step scalar instead of a number: the grid follows it when the launch is resolved
    split, combine = A.attention_decode_launch("T", 32, 8, 128, 4096)
    assert split.grid == (16, Scaled("T"), 64) and split.at({"T": 5}).grid == (16, 5, 64)
    assert combine.at({"T": 0}).grid == (32, 1, 1)


def test_fused_decode_clusters_divide_the_splits():
    """A cluster of the fused kernel is the largest divisor of MAX_SPLITS up to the portable 8."""
    assert [A.decode_cluster(n) for n in (1, 2, 4, 8, 10, 13, 16, 64)] == [1, 2, 4, 8, 5, 1, 8, 8]
    short = A.attention_decode_fused("float16", 32, 8, 128, 6144, 256)  # 8 splits: one cluster
    assert short.name.endswith("_n8_cl8")
    assert "LG_CLUSTER_Z(8)" in short.source and "lg_ld_cluster" in short.source
    # the cluster path is compiled for sm_90+ only; the global merge (fence, counter) stays for long
    # caches and older GPUs
    assert "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900" in short.source and "atomicAdd" in short.source
    prime = A.attention_decode_fused("float16", 32, 8, 128, 6144, 13 * 32)  # 13 splits: no cluster
    assert "_cl" not in prime.name and "LG_CLUSTER_Z" not in prime.source


def test_every_kernel_lets_its_dependents_launch_only_after_its_own_wait():
    """Decode attention reads positions and older cached keys before lg_pdl_wait: that is safe only
    because no kernel lets the next one launch before it has waited for the one before it."""
    from importlib import resources

    paths = [p for p in resources.files("llamagraph.templates").iterdir() if p.name.endswith(".j2")]
    assert len(paths) > 10
    for path in paths:
        calls = re.findall(r"lg_pdl_(wait|launch_dependents)\(\);", path.read_text())
        for i, call in enumerate(calls):
            if call == "launch_dependents":
                assert i > 0 and calls[i - 1] == "wait", f"{path.name}: launch_dependents before its wait"


def _splits_cover(n_keys: int, chunk: int, max_splits: int) -> list[tuple[int, int]]:
    """Python mirror of the kernels' split arithmetic."""
    per = chunk * -(-(-(-n_keys // chunk)) // max_splits)
    return [(s * per, min(s * per + per, n_keys)) for s in range(max_splits) if s * per < n_keys]


@pytest.mark.parametrize("max_seq,chunk", [(4096, 64), (131072, 64), (100, 7), (64, 64)])
def test_decode_splits_cover_every_key_once(max_seq, chunk):
    chunk, ms = A.decode_chunking(max_seq, chunk)
    for n in list(range(1, 300)) + [max_seq - 1, max_seq]:
        if n > max_seq:
            continue
        parts = _splits_cover(n, chunk, ms)
        assert len(parts) <= ms and parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_rope_launch_covers_every_pair():
    for H, KV, D in HEADS:
        for mode in MODES:
            la = A.rope_kv_append_launch(5, H, KV, D, mode)
            heads = 2 * KV if mode == "append" else H + 2 * KV
            assert la.grid[0] == 5 and la.grid[1] * la.block[0] >= heads * D // 2 > (la.grid[1] - 1) * la.block[0]


def test_inv_freq_table_matches_reference():
    for name, scaling in SCALINGS.items():
        table = A.rope_inv_freq_table(128, 500000.0, scaling)
        assert table.dtype == np.float32 and table.shape == (64,)
        expect = ops.rope_inv_freq(128, 500000.0, None if name == "dynamic" else scaling)
        np.testing.assert_array_equal(table, expect)


def test_sample_launch():
    la = sample_launch(5)
    assert la.grid == (5, 1, 1) and la.block == (1024, 1, 1) and la.smem == 0


def test_decode_uses_16_byte_loads():
    for dtype in DTYPES:
        split, _ = A.attention_decode(dtype, 32, 8, 128, 4096, 4096)
        assert "uint4" in split.source
    assert math.isclose(float(A._c_float(1 / math.sqrt(128) * A.LOG2E)[:-1]), 1 / math.sqrt(128) * A.LOG2E, rel_tol=1e-7)


# ---------------------------------------------------------------------------------------------
# compiling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_all_variants_compile_for_sm90(dtype):
    found = _resources(dtype)
    missing = {k.name for k in _module(dtype)} - set(found)
    assert not missing, f"ptxas reported no resources for {sorted(missing)[:5]}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_and_sampler_do_not_spill(dtype):
    # spilled q fragments or accumulators would make the bandwidth-bound decode kernel wait on
    # local memory; the sampler runs 1024 threads, so it has at most 64 registers each
    found = _resources(dtype)
    kernels = _decode_kernels(dtype) + (_samplers() if dtype == "float32" else [])
    for k in kernels:
        r = found[k.name]
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack_bytes == 0, (k.name, r)
        if k.name.startswith("sample_"):
            assert r.registers <= 64, (k.name, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_does_not_spill_for_llama_head_dims(dtype):
    # the tensor-core kernel must not spill at any head dim it takes; its default plan keeps two
    # blocks (16 warps) per SM up to D = 128, so it fits 128 registers there
    found = _resources(dtype)
    for k in _prefill_kernels(dtype):
        r = found[k.name]
        D = int(k.name.split("_d")[1].split("_")[0])
        if D <= 128 or k.name.startswith("attn_prefill_mma_"):
            assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack_bytes == 0, (k.name, r)
        if k.name.startswith("attn_prefill_mma_") and D <= 128:
            assert r.registers <= 128, (k.name, r)


@pytest.fixture(scope="module")
def _mma_variants_compiled():
    if nvrtc.available() is None:
        pytest.skip("no CUDA compiler (NVRTC wheel or nvcc)")
    ks = _prefill_mma_variants() + [A.attention_prefill(dt, 32, 8, D, 32 * D, MAX_SEQ)
                                     for dt in ("float16", "bfloat16") for D in (64, 128)]
    return ks, {arch: nvrtc.compile_source(module_source(ks), arch=arch, options=("--std=c++17",)).kernels
                for arch in ("sm_80", "sm_90")}


def test_prefill_mma_compiles_for_sm80_and_sm90_without_spills(_mma_variants_compiled):
    # sm_80 is the oldest target of mma.m16n8k16 with bf16, cp.async and __reduce_min_sync
    ks, found = _mma_variants_compiled
    for arch, res in found.items():
        for k in ks:
            r = res[k.name]
            if "_qr_mb1" in k.name or "_qr" not in k.name:  # q_regs with two blocks per SM may spill at D = 128
                assert r.spill_stores == 0 and r.spill_loads == 0, (arch, k.name, r)
