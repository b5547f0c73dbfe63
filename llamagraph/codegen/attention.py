"""Codegen for the attention-side kernels: rope + KV append, decode and prefill attention.

Each ``foo(...)`` returns the ``Kernel`` (or kernels) for one specialisation and ``foo_launch(...)``
the launch shape for the sizes of one call. Kernel names encode every constant the code depends
on, so equal names mean equal code. The numpy references these kernels implement are in
``llamagraph.ir.ops`` (``_rope_ref``, ``_kv_append_ref``, ``_rope_kv_append_ref``, ``_sdpa_ref``).
"""

from __future__ import annotations

import math

import numpy as np

from llamagraph.ir.dtypes import DTYPES, FLOAT_DTYPES, itemsize
from llamagraph.ir.ops import rope_inv_freq

from .launch import Shape, extent
from .render import Kernel, number_tag, render

LOG2E = 1.4426950408889634
LAYOUT_TAG = {"rotate_half": "rh", "interleaved": "il"}


def _check(dtype: str, H: int, KV: int, D: int) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported storage dtype {dtype!r}")
    if H <= 0 or KV <= 0 or H % KV:
        raise ValueError(f"num_heads {H} must be a positive multiple of num_kv_heads {KV}")
    if D <= 0 or D % 2:
        raise ValueError(f"head_dim {D} must be positive and even")


def _c_float(x: float) -> str:
    """A C float literal that rounds to the same float32 as numpy does."""
    return f"{float(np.float32(x))!r}f"


# ---------------------------------------------------------------------------------------------
# rope + KV append
# ---------------------------------------------------------------------------------------------

ROPE_THREADS = 128


def rope_kv_append(dtype: str, H: int, KV: int, D: int, layout: str, max_seq: int, mode: str,
                   rope_scaling: dict | None = None, theta: float = 10000.0, src_pairs: bool = False) -> Kernel:
    """Rotary embedding and/or KV-cache append (one template, three modes).

    Kernel arguments, in order (every kernel of every mode takes all of them):
      src        qkv [T, (H+2KV)*D] (fused, rope) or qkv_rot [T, H+2KV, D] (append), storage dtype
      positions  int32 [T]
      seq_ids    int32 [T]            KV-cache slot of each token
      seq_lens   int32 [max_batch]    slot length after this step (read only for dynamic rope)
      inv_freq   float32 [D/2]        ``rope_inv_freq_table(D, theta, rope_scaling)`` (unused for
                                      dynamic rope and for append; may then be any pointer)
      out        fused: q_out [T, H, D]; rope: qkv_rot [T, H+2KV, D]; append: unused
      kcache     [max_batch, max_seq, KV, D] (fused, append; unused for rope)
      vcache     [max_batch, max_seq, KV, D]
      n_tokens   int32 T
    Launch with ``rope_kv_append_launch``. Tokens whose position is outside [0, max_seq) are
    not written to the cache. ``src_pairs`` (fused mode): each head of src is in rope pair order
    (``llamagraph.ir.layout.rope_pair_order``), as a GEMM with the pair-ordered qkv weight writes it.
    """
    if src_pairs and (mode != "fused" or D % 16):
        raise ValueError("src_pairs needs mode 'fused' and head_dim % 16 == 0")
    _check(dtype, H, KV, D)
    if layout not in LAYOUT_TAG:
        raise ValueError(f"unknown rope layout {layout!r}")
    if mode not in ("fused", "rope", "append"):
        raise ValueError(f"unknown rope_kv_append mode {mode!r}")
    kind = (rope_scaling or {}).get("rope_type", "default")
    dynamic = kind == "dynamic" and mode != "append"
    params = dict(dtype=dtype, H=H, KV=KV, D=D, layout=layout, max_seq=max_seq, mode=mode, dynamic=dynamic,
                  theta="", factor="", orig="", src_pairs=src_pairs)
    name = f"rope_kv_append_{mode}{'_pairs' if src_pairs else ''}_{DTYPES[dtype].short}_h{H}_kv{KV}_d{D}"
    if mode != "append":
        name += f"_{LAYOUT_TAG[layout]}"
    if mode != "rope":
        name += f"_s{max_seq}"
    if dynamic:
        factor = float(rope_scaling["factor"])
        orig = int(rope_scaling["original_max_position_embeddings"])
        params.update(theta=repr(float(theta)), factor=repr(factor), orig=str(orig))
        name += f"_dyn_t{number_tag(theta)}_f{number_tag(factor)}_o{orig}"
    return Kernel(name, render("rope_kv_append", name=name, **params))


def rope_kv_append_launch(n_tokens: int | str, H: int, KV: int, D: int, mode: str) -> Shape:
    """Grid (T, ceil(pairs / 128)): one thread per element pair of one head of one token."""
    heads = 2 * KV if mode == "append" else H + 2 * KV
    work = heads * (D // 2)
    return Shape((extent(n_tokens), -(-work // ROPE_THREADS), 1), (ROPE_THREADS, 1, 1), 0)


def rope_inv_freq_table(D: int, theta: float, rope_scaling: dict | None) -> np.ndarray:
    """float32 [D/2] to upload as the kernel's ``inv_freq`` (default, linear and llama3 rope).

    Dynamic rope computes its frequencies in the kernel from each slot's length; this returns
    the unscaled table for it, which the kernel ignores.
    """
    if (rope_scaling or {}).get("rope_type") == "dynamic":
        return rope_inv_freq(D, theta, None)
    return np.ascontiguousarray(rope_inv_freq(D, theta, rope_scaling), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# decode attention (flash-decoding, split KV)
# ---------------------------------------------------------------------------------------------

DECODE_THREADS = 128
DECODE_CHUNK = 32       # keys per split at the finest grain: one batch of the 128-thread block's key streams
                        # (8B on the H100, 128-key context: 7.6 us a layer against 8.9 with 64, 9.5 with 16)
DECODE_SPLIT_CAP = 64   # at most this many splits; longer caches use chunks of several CHUNKs
COMBINE_THREADS_MAX = 256


def decode_chunking(max_seq: int, chunk: int | None = None, max_splits: int | None = None) -> tuple[int, int]:
    """(CHUNK, MAX_SPLITS) of the decode kernels for a cache of ``max_seq`` keys.

    A token with n keys uses splits of CHUNK * ceil(ceil(n / CHUNK) / MAX_SPLITS) keys. With the
    defaults MAX_SPLITS = min(ceil(max_seq / CHUNK), 64), so short caches split every CHUNK keys
    and long ones never allocate more than 64 partials per (token, head).
    """
    chunk = DECODE_CHUNK if chunk is None else int(chunk)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    full = -(-max_seq // chunk)
    max_splits = min(full, DECODE_SPLIT_CAP) if max_splits is None else min(int(max_splits), full)
    return chunk, max(max_splits, 1)


DECODE_HEADS_PER_BLOCK = 2  # at most: a batch-1 step at a short context has too few blocks otherwise
                            # (TinyLlama on the H100, 128-key context, 8 q heads a KV head: 2 heads a
                            # block 929.9 tok/s, 4: 892.8, 8: 823.6; K/V rows are re-read from L2)


def _heads_per_block(group: int) -> int:
    """Largest divisor of the GQA group that is <= DECODE_HEADS_PER_BLOCK: a block reads K/V once
    for that many heads."""
    return max(d for d in range(1, min(group, DECODE_HEADS_PER_BLOCK) + 1) if group % d == 0)


def _decode_tiling(dtype: str, D: int, group: int) -> dict:
    esize = itemsize(dtype)
    vec_bytes = next(v for v in (16, 8, 4) if (D * esize) % v == 0)
    nv = D * esize // vec_bytes
    lpk = min(32, 1 << (nv - 1).bit_length())
    vpl = -(-nv // lpk)
    gpb = _heads_per_block(group)
    el = vpl * vec_bytes // esize
    unroll = 4 if gpb * el <= 32 else 2
    return dict(gpb=gpb, vec_bytes=vec_bytes, lpk=lpk, vpl=vpl, unroll=unroll, threads=DECODE_THREADS,
                min_blocks=3 if gpb * el <= 32 else 2)


def attention_decode(dtype: str, H: int, KV: int, D: int, qstride: int, max_seq: int,
                     chunk: int | None = None, max_splits: int | None = None,
                     scale: float | None = None) -> tuple[Kernel, Kernel]:
    """(split, combine) kernels of split-KV decode attention.

    Token t's query ``q[t*qstride + h*D : ... + D]`` attends keys 0..positions[t] of cache slot
    seq_ids[t]; q head h uses kv head h // (H/KV); softmax scale 1/sqrt(D) unless given.

    split arguments:   q [T, qstride], kcache, vcache [max_batch, max_seq, KV, D], positions
                       int32 [T], seq_ids int32 [T], ws float32 workspace
                       (``attention_decode_workspace_bytes``), n_tokens int32
    combine arguments: ws, positions int32 [T], out [T, H*D] (storage dtype), n_tokens int32
    Launch both with ``attention_decode_launch``, split first, on one stream. Every length comes
    from ``positions``, so the pair captures into a CUDA graph once per token count.
    """
    _check(dtype, H, KV, D)
    if qstride < H * D or qstride % D:
        raise ValueError(f"q stride {qstride} must be a multiple of D={D} and >= H*D={H * D}")
    chunk, max_splits = decode_chunking(max_seq, chunk, max_splits)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tiling = _decode_tiling(dtype, D, H // KV)
    tag = f"{DTYPES[dtype].short}_h{H}_kv{KV}_d{D}"
    tail = f"_s{max_seq}_c{chunk}_n{max_splits}" + ("" if scale == 1.0 / math.sqrt(D) else f"_sc{number_tag(scale)}")
    common = dict(dtype=dtype, H=H, KV=KV, D=D, qstride=qstride, max_seq=max_seq, chunk=chunk,
                  max_splits=max_splits, qscale=_c_float(scale * LOG2E))
    split_name = f"attn_decode_split_{tag}_q{qstride}{tail}"
    combine_name = f"attn_decode_combine_{DTYPES[dtype].short}_h{H}_d{D}_s{max_seq}_c{chunk}_n{max_splits}"
    split = Kernel(split_name, render("attention_decode", name=split_name, part="split", fused=False, **common,
                                      **tiling))
    combine = Kernel(combine_name, render("attention_decode", name=combine_name, part="combine", fused=False,
                                          threads=_combine_threads(D), **common))
    return split, combine


def attention_decode_fused(dtype: str, H: int, KV: int, D: int, qstride: int, max_seq: int,
                           chunk: int | None = None, max_splits: int | None = None,
                           scale: float | None = None) -> Kernel:
    """Split-KV decode attention as one kernel: the split kernel of ``attention_decode`` whose
    last block to finish, per (token, head group), merges the splits as the combine kernel does
    (the same operations in the same order, so the output is bit-identical to the pair's). On sm_90+
    the split blocks form clusters of ``decode_cluster(MAX_SPLITS)`` along z, and a token whose
    non-empty splits all lie in the first cluster (a short cache) merges them there, through
    distributed shared memory, with no global partials or counter (the same order again).

    Arguments: q, kcache, vcache, positions, seq_ids, ws (as the split kernel's), counters int32
    [T, KV * head splits] (``attention_decode_counter_bytes``: zero before the first launch, and
    left zero by every launch), out [T, H*D], n_tokens. Launch with the split shape of
    ``attention_decode_launch``.
    """
    _check(dtype, H, KV, D)
    if qstride < H * D or qstride % D:
        raise ValueError(f"q stride {qstride} must be a multiple of D={D} and >= H*D={H * D}")
    chunk, max_splits = decode_chunking(max_seq, chunk, max_splits)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tag = f"{DTYPES[dtype].short}_h{H}_kv{KV}_d{D}"
    tail = f"_s{max_seq}_c{chunk}_n{max_splits}" + ("" if scale == 1.0 / math.sqrt(D) else f"_sc{number_tag(scale)}")
    cluster = decode_cluster(max_splits)
    name = f"attn_decode_{tag}_q{qstride}{tail}" + (f"_cl{cluster}" if cluster > 1 else "")
    return Kernel(name, render("attention_decode", name=name, part="split", fused=True, dtype=dtype, H=H, KV=KV, D=D,
                               qstride=qstride, max_seq=max_seq, chunk=chunk, max_splits=max_splits,
                               qscale=_c_float(scale * LOG2E), cluster=cluster, **_decode_tiling(dtype, D, H // KV)))


DECODE_CLUSTER_MAX = 8  # the portable thread-block cluster size (H100, one process, logits bit-identical: the cluster
                        # merge took TinyLlama 963.5 -> 974.6 tok/s against the global merge; docs/ab_h100.txt)


def decode_cluster(max_splits: int) -> int:
    """Split blocks per thread-block cluster of the fused decode kernel (on sm_90+): the largest
    divisor of MAX_SPLITS up to 8. A token whose splits all fall in the first cluster (a short cache)
    merges them in distributed shared memory: no global partials, fence or counter round trip."""
    return max(c for c in range(1, min(max_splits, DECODE_CLUSTER_MAX) + 1) if max_splits % c == 0)


def attention_decode_counter_bytes(max_tokens: int, H: int, KV: int) -> int:
    """Bytes of the fused kernel's int32 counters: one per (token, block of heads)."""
    group = H // KV
    return max_tokens * KV * (group // _heads_per_block(group)) * 4


def _combine_threads(D: int) -> int:
    return min(COMBINE_THREADS_MAX, 32 * -(-D // 32))


def attention_decode_launch(n_tokens: int | str, H: int, KV: int, D: int, max_seq: int,
                            chunk: int | None = None, max_splits: int | None = None) -> tuple[Shape, Shape]:
    """(split, combine) launch shapes: grid (KV * heads-splits, T, MAX_SPLITS) then (H, T)."""
    _, ms = decode_chunking(max_seq, chunk, max_splits)
    group = H // KV
    hsplit = group // _heads_per_block(group)
    t = extent(n_tokens)
    return (Shape((KV * hsplit, t, ms), (DECODE_THREADS, 1, 1), 0),
            Shape((H, t, 1), (_combine_threads(D), 1, 1), 0))


def attention_decode_workspace_bytes(max_tokens: int, H: int, D: int, max_seq: int,
                                     chunk: int | None = None, max_splits: int | None = None) -> int:
    """Bytes of the fp32 partials workspace [max_tokens, H, MAX_SPLITS, D+2]."""
    _, ms = decode_chunking(max_seq, chunk, max_splits)
    return max_tokens * H * ms * (D + 2) * 4


# ---------------------------------------------------------------------------------------------
# prefill attention (tiled, causal, packed sequences)
# ---------------------------------------------------------------------------------------------

# Both prefill kernels run 256 threads on tiles of 64 query rows, so the tile table and the
# launch depend on the head dim only (the lowering does not pass the dtype to them):
#   fp16/bf16 with head_dim % 16 == 0 and <= 256: tensor cores (``attention_prefill_mma.cu.j2``);
#   otherwise fp32 CUDA-core math (``attention_prefill.cu.j2``).
PREFILL_THREADS = 256  # fp32 path: 16 x 16, ty owns RM query rows, tx owns CN keys and D/16 output columns
PREFILL_ROWS = 64
PREFILL_MMA_KEYS = 64  # keys per shared K/V tile of the tensor-core kernel (32 per warp)
PREFILL_MMA_MAX_D = 256


def _prefill_tiling(D: int) -> dict:
    """Tiling of the fp32 CUDA-core kernel."""
    rm = PREFILL_ROWS // 16
    cn = 4 if D <= 64 else 2
    bq, bk = 16 * rm, 16 * cn
    dq = -(-D // 4)                  # float4 quads per row
    dsq = dq if dq % 2 else dq + 1   # odd quad stride: conflict-free float4 reads across rows
    ps = next((p for p in range(bk, bk + 32) if (rm * p) % 32 == 16), bk + 1)
    smem = ((bq + 2 * bk) * 4 * dsq + bq * ps) * 4
    # two blocks per SM fit in shared memory up to D = 128; beyond, give one block all registers
    return dict(rm=rm, cn=cn, bq=bq, bk=bk, dq=dq, dsq=dsq, ps=ps, smem=smem, nd4=-(-dq // 16),
                min_blocks=2 if 2 * smem <= 227 * 1024 else 1)


def prefill_uses_mma(dtype: str, D: int) -> bool:
    """True where prefill attention runs on tensor cores: 16-bit storage, head_dim % 16 == 0, <= 256."""
    return dtype in ("float16", "bfloat16") and D % 16 == 0 and 16 <= D <= PREFILL_MMA_MAX_D


def _prefill_mma_tiling(D: int, q_regs: bool | None = None, min_blocks: int | None = None,
                        stages: int | None = None) -> dict:
    """Tiling of the tensor-core kernel: a Q [64][D+8] tile and ``stages`` pairs of K, V [64][D+8]
    tiles, 16-bit, in shared memory."""
    stages = 2 if stages is None else int(stages)
    if stages not in (1, 2):
        raise ValueError(f"stages must be 1 or 2, got {stages}")
    smem = (PREFILL_ROWS + 2 * stages * PREFILL_MMA_KEYS) * (D + 8) * 2
    # Q's fragments take D/4 registers: held up to D = 64, re-read from shared memory beyond, so
    # that two blocks (16 warps) per SM fit the 128-register budget up to D = 128
    q_regs = D <= 64 if q_regs is None else bool(q_regs)
    min_blocks = (2 if D <= 128 else 1) if min_blocks is None else int(min_blocks)
    return dict(bq=PREFILL_ROWS, bk=PREFILL_MMA_KEYS, smem=smem, q_regs=q_regs, min_blocks=min_blocks,
                stages=stages, threads=PREFILL_THREADS)


def attention_prefill_rows(D: int) -> int:
    """BQ: the most query rows one tile of the ``seq_tiles`` table may hold for head dim D."""
    return PREFILL_ROWS


def attention_prefill(dtype: str, H: int, KV: int, D: int, qstride: int, max_seq: int,
                      scale: float | None = None) -> Kernel:
    """Tiled causal attention for prefill (many query rows per sequence).

    fp16/bf16 with head_dim % 16 == 0 (up to 256) run flash-attention-2 style on tensor cores
    (``attention_prefill_mma``); the rest run fp32 CUDA-core math.

    Arguments: q [T, qstride] (head h of row r at q[r*qstride + h*D]), kcache, vcache
    [max_batch, max_seq, KV, D], positions int32 [T], seq_ids int32 [T], tiles int32 [n_tiles, 2]
    (``llamagraph.codegen.launch.seq_tiles`` with ``attention_prefill_rows(D)`` rows), out
    [T, H*D] (storage dtype), n_tiles int32. A tile's rows belong to one sequence, are contiguous
    and have nondecreasing positions; row r attends keys 0..positions[r] of its slot (earlier
    chunks already in the cache included). Launch with ``attention_prefill_launch``; its dynamic
    shared memory may exceed 48 KiB, so the caller raises the kernel's max dynamic shared memory
    attribute to ``Launch.smem``.
    """
    _check(dtype, H, KV, D)
    if qstride < H * D or qstride % D:
        raise ValueError(f"q stride {qstride} must be a multiple of D={D} and >= H*D={H * D}")
    if prefill_uses_mma(dtype, D):
        return attention_prefill_mma(dtype, H, KV, D, qstride, max_seq, scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tiling = _prefill_tiling(D)
    name = f"attn_prefill_{DTYPES[dtype].short}_h{H}_kv{KV}_d{D}_q{qstride}_s{max_seq}_bq{tiling['bq']}_bk{tiling['bk']}"
    if scale != 1.0 / math.sqrt(D):
        name += f"_sc{number_tag(scale)}"
    src = render("attention_prefill", name=name, dtype=dtype, H=H, KV=KV, D=D, qstride=qstride, max_seq=max_seq,
                 qscale=_c_float(scale * LOG2E), threads=PREFILL_THREADS, **tiling)
    return Kernel(name, src)


def attention_prefill_mma(dtype: str, H: int, KV: int, D: int, qstride: int, max_seq: int,
                          scale: float | None = None, q_regs: bool | None = None,
                          min_blocks: int | None = None, stages: int | None = None) -> Kernel:
    """The tensor-core prefill kernel (``attention_prefill`` picks it; arguments and launch as there).

    mma.m16n8k16 with fp32 accumulation, online softmax in fp32 registers, P rounded to the
    storage dtype for the P.V product; K/V tiles of 64 keys staged in shared memory with
    cp.async. ``q_regs``, ``min_blocks`` and ``stages`` override the defaults (for benchmarks; a
    launch must then give the shared memory that ``attention_prefill_mma_smem`` says).
    """
    _check(dtype, H, KV, D)
    if not prefill_uses_mma(dtype, D):
        raise ValueError(f"tensor-core prefill needs float16/bfloat16 and head_dim % 16 == 0 <= "
                         f"{PREFILL_MMA_MAX_D}, got {dtype} D={D}")
    if qstride < H * D or qstride % D:
        raise ValueError(f"q stride {qstride} must be a multiple of D={D} and >= H*D={H * D}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tiling = _prefill_mma_tiling(D, q_regs, min_blocks, stages)
    name = (f"attn_prefill_mma_{DTYPES[dtype].short}_h{H}_kv{KV}_d{D}_q{qstride}_s{max_seq}"
            f"_bq{tiling['bq']}_bk{tiling['bk']}_st{tiling['stages']}{'_qr' if tiling['q_regs'] else ''}"
            f"_mb{tiling['min_blocks']}")
    if scale != 1.0 / math.sqrt(D):
        name += f"_sc{number_tag(scale)}"
    params = {k: v for k, v in tiling.items() if k != "smem"}
    src = render("attention_prefill_mma", name=name, dtype=dtype, H=H, KV=KV, D=D, qstride=qstride,
                 max_seq=max_seq, qscale=_c_float(scale * LOG2E), **params)
    return Kernel(name, src)


def attention_prefill_mma_smem(D: int, stages: int | None = None) -> int:
    """Dynamic shared memory bytes of the tensor-core kernel with ``stages`` K/V buffer pairs."""
    return _prefill_mma_tiling(D, stages=stages)["smem"]


def attention_prefill_launch(n_tiles: int | str, H: int, D: int) -> Shape:
    """Grid (n_tiles, H), 256 threads. Dynamic shared memory: enough for whichever kernel
    ``attention_prefill`` picks for D (the fp32 one stages fp32 Q, K, V and P tiles; the
    tensor-core one 16-bit Q, K and V tiles). Both kernels start the blocks of the last tiles
    (the most keys) first."""
    smem = _prefill_tiling(D)["smem"]
    if D % 16 == 0 and D <= PREFILL_MMA_MAX_D:
        smem = max(smem, _prefill_mma_tiling(D)["smem"])
    return Shape((extent(n_tiles), H, 1), (PREFILL_THREADS, 1, 1), smem)
