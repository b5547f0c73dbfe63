"""Dense kernels: row gather (embedding lookup, last-token rows), (add+)RMSNorm, GEMV / skinny
GEMM, element-wise ops.

Each kernel has a function returning its ``Kernel`` (the rendered template; ``module_source``
adds the prelude) and a ``*_launch`` function returning its ``Shape`` for ``rows`` rows.
``rows`` is a runtime kernel argument, so one kernel serves every batch size; it may be a
number or the name of a step scalar ("T", "B"), in which case the grid follows that scalar.

Kernel names encode every constant the source depends on (derived choices such as block size
or vector width are functions of those constants), so equal names mean equal code.
All pointers must be 16-byte aligned; rows are contiguous (row-major).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from llamagraph.ir.dtypes import DTYPES, FLOAT_DTYPES, itemsize

from .launch import Shape, extent
from .render import Kernel, number_tag, render

GEMV_EPILOGUES = ("none", "silu_mul", "residual", "rope")
QUANT_SCHEMES = ("int8", "int4")
GEMV_PROLOGUES = ("none", "rmsnorm")
EW_OPERANDS = ("none", "row", "full", "halves")
MAX_ROW_TILE = 16


def _tag(dtype: str) -> str:
    return DTYPES[dtype].short


def _check_dtype(dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")


def _check_dim(what: str, n: int) -> None:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{what} must be a positive int, got {n!r}")


def _math_vec(dtype: str, D: int) -> int:
    """Elements per vector access for kernels that convert values: a 16-byte vector, else 1."""
    v = 16 // itemsize(dtype)
    return v if D % v == 0 else 1


def _copy_bytes(dtype: str, D: int) -> int:
    """Widest access (16, 8, 4 or element bytes) that tiles a row of D elements."""
    row = D * itemsize(dtype)
    return next(b for b in (16, 8, 4, itemsize(dtype)) if row % b == 0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


# ---------------------------------------------------------------------------------------------
# gather_rows: row copies (the embedding lookup and the last token of each sequence)
# ---------------------------------------------------------------------------------------------

COPY_THREADS = 256


def gather_rows(dtype: str, D: int) -> Kernel:
    """out[i, :] = x[idx[i], :].

    Args: (const T* x, const int* idx, T* out, int n).
    x: [*, D]; idx: [n] int32 (each a row of x); out: [n, D].
    """
    _check_dtype(dtype)
    _check_dim("D", D)
    name = f"gather_rows_{_tag(dtype)}_d{D}"
    src = render("gather_rows", name=name, dtype=dtype, D=D, copy_bytes=_copy_bytes(dtype, D), threads=COPY_THREADS)
    return Kernel(name, src)


def gather_rows_launch(dtype: str, D: int, rows: int | str) -> Shape:
    per_row = D * itemsize(dtype) // _copy_bytes(dtype, D)
    return Shape((extent(rows, per_row, COPY_THREADS), 1, 1), (COPY_THREADS, 1, 1), 0)


def vocab_concat(ranks: int, chunk: int, vocab: int) -> Kernel:
    """The all-gathered vocabulary chunks [ranks, n, chunk] fp32 -> whole logits rows [n, vocab].

    Args: (const float* chunks, float* out, int n).
    """
    name = f"vocab_concat_r{ranks}_c{chunk}_v{vocab}"
    return Kernel(name, render("vocab_concat", name=name, ranks=ranks, chunk=chunk, vocab=vocab, threads=COPY_THREADS))


def vocab_concat_launch(vocab: int, rows: int | str) -> Shape:
    return Shape((extent(rows, vocab, COPY_THREADS), 1, 1), (COPY_THREADS, 1, 1), 0)


# ---------------------------------------------------------------------------------------------
# allreduce_residual (tensor parallelism): the one-shot peer-memory all-reduce + residual add
# ---------------------------------------------------------------------------------------------

PEER_BLOCKS = 32  # blocks of the peer all-reduce: every one waits on the peers' same block, so all
PEER_THREADS = 256  # must be resident at once; a decode step's rows need few


@dataclass(frozen=True)
class PeerMailbox:
    """The bytes of one rank's mailbox for the peer all-reduce (``allreduce_residual``): block
    epochs u32 [blocks], then two parity slots per source rank of ``cap`` elements of ``dtype``,
    each 32-bit word of them stored beside its epoch (8 bytes), at ``data_offset``."""

    ranks: int
    cap: int  # elements per slot: the most rows the peer path takes times the row width
    dtype: str

    @property
    def data_offset(self) -> int:
        return _cdiv(PEER_BLOCKS * 4, 256) * 256

    @property
    def nbytes(self) -> int:
        return self.data_offset + 2 * self.ranks * (self.cap * itemsize(self.dtype) // 4) * 8


def allreduce_residual(dtype: str, D: int, mailbox: PeerMailbox) -> Kernel:
    """out = round(round(round(sum over the ranks of y) + bias) + r), the sum in fp32 in rank
    order, over peer memory (see the template); or, with ``local``, out = y + bias + r.

    Args: (const T* y, const T* r, const T* bias_or_null, T* out, int rows,
           const u64* peers, int local). y, r, out: [rows, D] (out may alias y or r); bias: [D];
    peers: [1 + ranks] u64 = this rank, then every rank's mailbox address (mailbox.nbytes each);
    rows * D <= mailbox.cap unless ``local``. Rows are moved in 32-bit words: D * itemsize % 4 == 0.
    """
    _check_dtype(dtype)
    _check_dim("D", D)
    if (D * itemsize(dtype)) % 4:
        raise ValueError(f"allreduce_residual moves 32-bit words: a row of {D} {dtype} is not whole words")
    if mailbox.cap % D or mailbox.dtype != dtype:
        raise ValueError(f"mailbox of {mailbox.cap} {mailbox.dtype} elements does not hold whole rows of {D} {dtype}")
    name = f"allreduce_residual_{_tag(dtype)}_d{D}_r{mailbox.ranks}_c{mailbox.cap}"
    src = render("allreduce_residual", name=name, dtype=dtype, D=D, itemsize=itemsize(dtype), ranks=mailbox.ranks,
                 cap=mailbox.cap, data_offset=mailbox.data_offset, blocks=PEER_BLOCKS, threads=PEER_THREADS)
    return Kernel(name, src)


def allreduce_residual_launch() -> Shape:
    return Shape((PEER_BLOCKS, 1, 1), (PEER_THREADS, 1, 1), 0)


# ---------------------------------------------------------------------------------------------
# add_rmsnorm
# ---------------------------------------------------------------------------------------------

def eps_tag(eps: float) -> str:
    """A short, stable identifier fragment for eps: 1e-05 -> '1em05', 2.5e-06 -> '2p5em06'."""
    return number_tag(eps)


def _norm_threads(dtype: str, D: int) -> int:
    nv = D // _math_vec(dtype, D)
    threads = min(256, max(32, _pow2_at_least(nv)))
    if nv > 8 * threads:  # keep at most 8 vectors of the row in each thread's registers
        threads = min(1024, _pow2_at_least(_cdiv(nv, 8)))
    return threads


def add_rmsnorm(dtype: str, D: int, eps: float, has_residual: bool = True, has_bias: bool = False) -> Kernel:
    """RMSNorm of each row, optionally of the sum of two rows (and a bias); fp32 statistics.

    Args: (const T* y, const T* r, const T* bias_or_null, const T* w, T* sum_out, T* norm_out, int rows).
    y, r, sum_out, norm_out: [rows, D]; bias, w: [D].
      has_residual: s = y + bias + r in fp32 (bias only with has_bias); sum_out = s rounded to T;
                    norm_out = s * rsqrt(mean(s^2) + eps) * w, from the unrounded fp32 s.
      plain:        norm_out = y * rsqrt(mean(y^2) + eps) * w; r, bias and sum_out are not touched.
    sum_out may alias y or r (every element is read before it is written, by the same thread).
    One block per row.
    """
    _check_dtype(dtype)
    _check_dim("D", D)
    if has_bias and not has_residual:
        raise ValueError("add_rmsnorm: has_bias needs has_residual (the plain norm has no bias)")
    kind = "add_rmsnorm" if has_residual else "rmsnorm"
    name = f"{kind}_{_tag(dtype)}_d{D}_e{eps_tag(eps)}" + ("_bias" if has_bias else "")
    src = render(
        "add_rmsnorm",
        name=name,
        dtype=dtype,
        D=D,
        eps=repr(float(eps)) + "f",
        has_residual=has_residual,
        has_bias=has_bias,
        vec=_math_vec(dtype, D),
        threads=_norm_threads(dtype, D),
    )
    return Kernel(name, src)


def add_rmsnorm_launch(dtype: str, D: int, rows: int | str) -> Shape:
    return Shape((extent(rows), 1, 1), (_norm_threads(dtype, D), 1, 1), 0)


# ---------------------------------------------------------------------------------------------
# gemv
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemvTuning:
    """Launch/unroll choices of the GEMV kernel.

    warps:  warps per block. 16-bit: the block's 16 output columns split K over this many warps.
            fp32: output columns per block (one warp each).
    unroll: 16-byte W loads per W row and lane issued before the first is used.
    pipeline: quantized 16-bit W only: two batches of codes in registers, the next one's loads in
            flight while this one's codes are dequantized (twice the code registers of one batch).
    whole_x: quantized 16-bit W only: the block stages its row tile's whole x rows in shared memory
            once, not one batch's columns before every batch (no barrier between batches).
    tiles:  quantized 16-bit W only: 16-column output tiles per block. Past 1 the grid shrinks to
            cdiv(tiles of N, tiles) and each block walks its tiles grid-stride, staging x once.
    ahead2: pipelined blocks of several tiles only: behind a tile's last batch the block requests the
            next tile's first two batches of codes, not only its first (the template's AHEAD2), so two
            batches stay in flight through the tile's sums and epilogue. Not a default: unmeasured on a
            GPU (tools/tuning_ab.py ahead2*); int4 gate/up and LM heads spill 4 bytes with it (ptxas).
    zsum:   int4 with whole-step groups and a whole staged x row only: the codes enter the mma as their
            magic-exponent values (1024 + q; bf16 128 + q) without the per-pair zero subtraction, and each
            step's sum loses the magic times the step's staged x sum and z times its x sum (both staged with
            the slab): 4 fewer instructions per 8 codes, sums in another order. Not a default: unmeasured
            (tools/tuning_ab.py zsum).
    """

    warps: int
    unroll: int
    pipeline: bool = False
    whole_x: bool = False
    tiles: int = 1
    ahead2: bool = False
    zsum: bool = False

    def tag(self) -> str:
        return (f"w{self.warps}u{self.unroll}" + ("p" if self.pipeline else "") + ("x" if self.whole_x else "")
                + (f"t{self.tiles}" if self.tiles > 1 else "") + ("a2" if self.ahead2 else "")
                + ("zs" if self.zsum else ""))

    @property
    def min_blocks(self) -> int:
        """Resident blocks per SM asked of ptxas (``__launch_bounds__``): 2 of 256 threads. Without a
        minimum it schedules for occupancy and sinks each W load next to its use, leaving 2-3 loads
        in flight per warp."""
        return max(1, 512 // (32 * self.warps))


@dataclass(frozen=True)
class GemvQuant:
    """How the GEMV reads a weight-only quantized W (``llamagraph.ir.quant``).

    "int8": W int8 [N, K], one scale per row: w' = q * s.
    "int4": W uint8 [N, K/2] (two codes per byte along K, the even column in the low nibble),
            scale and zero per group of ``group_size`` columns of a row: w' = (q - z) * s.
    Each lane reads 16 bytes of codes at a time, ``chunk_k`` columns, and a chunk never straddles
    a group: int4 needs group_size % 32 == 0, and K must be a multiple of the chunk.
    code_order: None, W's rows in order; "tile16", each block of 16 rows stored chunk-major
    (``llamagraph.ir.quant.order_codes``), so a warp's 16-byte loads of one step take whole lines.
    """

    scheme: str
    group_size: int | None = None
    code_order: str | None = None

    @property
    def chunk_k(self) -> int:
        return 16 if self.scheme == "int8" else 32

    def row_bytes(self, K: int) -> int:
        return K if self.scheme == "int8" else K // 2

    @property
    def folded(self) -> bool:
        """int4 with whole 128-column steps per group: the 16-bit GEMV applies the group's zero and
        scale once per step instead of per element (see templates/gemv_mma_codes.cuh.j2)."""
        return self.scheme == "int4" and self.group_size % 128 == 0

    def tag(self) -> str:
        return ("i8" if self.scheme == "int8" else f"i4g{self.group_size}") + ("c16" if self.code_order else "")

    def check(self, K: int) -> None:
        """ValueError (one line) when this GEMV cannot read the layout."""
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"gemv quantization scheme must be one of {QUANT_SCHEMES}, got {self.scheme!r}")
        if self.scheme == "int4":
            G = self.group_size
            if not isinstance(G, int) or G <= 0 or G % 32 or K % G:
                raise ValueError(f"int4 group_size {G}, K={K}: the int4 GEMV reads 32 columns of one group at a "
                                 f"time and needs group_size % 32 == 0 dividing K")
        elif self.group_size is not None:
            raise ValueError(f"int8 has one scale per row, got group_size {self.group_size}")
        if self.code_order not in (None, "tile16"):
            raise ValueError(f"{self.scheme} codes in order {self.code_order!r}: the GEMV reads codes in rows or in "
                             f"'tile16' order")
        if K % self.chunk_k:
            raise ValueError(f"{self.scheme} group_size {self.group_size}, K={K}: the {self.scheme} GEMV reads 16 "
                             f"bytes ({self.chunk_k} columns) at a time and needs K % {self.chunk_k} == 0")


def gemv_default_tuning(dtype: str, N: int, K: int, row_tile: int, epilogue: str = "none",
                        prologue: str = "none", quant: GemvQuant | None = None, has_bias: bool = False) -> GemvTuning:
    """Enough bytes in flight per SM to cover HBM latency, within a register budget that keeps
    two 256-thread blocks resident per SM (checked by tests through ptxas -v)."""
    nt = _cdiv(row_tile, 8)
    if quant is not None:
        return _quant_tuning(dtype, N, K, row_tile, epilogue, quant, has_bias)
    if dtype == "float32":
        unroll = 4 if row_tile <= 4 else 2 if row_tile <= 8 else 1
        per_lane = _cdiv(K // 4, 32)  # float4 chunks of a W row per lane
        return GemvTuning(warps=8, unroll=max(1, min(unroll, per_lane)))
    unroll = (4 if nt == 1 else 2) if epilogue == "silu_mul" else (8 if nt == 1 else 4)
    if prologue == "rmsnorm":
        # the norm's registers (weight chunk, per-row scales) leave room for fewer loads per lane;
        # 4 x 16 B x 2 W rows per lane is still ~64 KB in flight per SM (ptxas: no spills, tests)
        unroll = min(unroll, 4)
    warps = 8
    if row_tile == 1 and _cdiv(N // 2 if epilogue == "silu_mul" else N, 16) <= SMS:
        # one block per SM at most (the 1B models' o_proj and down_proj, N = 2048): 16 warps with half
        # the unroll put as many bytes in flight per SM in twice the warps, and each warp's share of K
        # halves: TinyLlama's decode step 5.6% faster on the H100
        warps, unroll = 16, max(1, unroll // 2)
    per_warp = _cdiv(_cdiv(K // 8, 4), warps)  # 32-k steps of the block's W rows per warp
    return GemvTuning(warps=warps, unroll=max(1, min(unroll, per_warp)))


SMS = 132  # streaming multiprocessors of the GPUs the tuning is measured on (H100 SXM, H200)


def _quant_tuning(dtype: str, N: int, K: int, row_tile: int, epilogue: str, quant: GemvQuant,
                  has_bias: bool = False) -> GemvTuning:
    """Quantized W: U steps of 16-byte code chunks per warp and W row in flight.

    16-bit: U = 4 steps x 2 rows x 16 B = 128 B of codes per lane (MT = 1; MT = 2 takes U = 2); the
    block's x slab in shared memory grows with U and the row tile, so int4 16-row tiles take U = 2.
    A block requests its first batch of codes before it waits for the kernel before it, and with
    ``pipeline`` the next batch's while it dequantizes one. Measured on the H100 (decode steps of the
    8B int4 and 7B int8 plans, tools/bench_quant.sh):
      int8, batch 1: 8 warps, two batches of 4 (gate/up: 2) steps in flight: 7% off the 7B step
            against 4 warps with one batch;
      int4, batch 1: where the grid fits two 8-warp blocks per SM (o_proj, down_proj), 8 warps take
            the codes of a 4096-column row in one batch, longer rows in pipelined batches of 2 steps:
            6% off the 8B step; gate/up (two W rows a column) takes 8 warps in pipelined batches of one
            step: 439.8 -> 453.5 tok/s on the 8B step against 4 warps x U = 2 unpipelined (2 steps of
            two rows spill when pipelined); other wide grids (qkv, the LM head) keep 4 warps x U = 4,
            whose four blocks per SM take the grid in fewer waves (pipelined batches of 2: no gain),
            but a qkv grid of more tiles than 4-warp blocks resident at once (Llama-2-7B's 768: its
            blocks walk tiles either way) takes 8 warps, 3 tiles a block: 7B int4 step +2.0%; the
            LM heads stay at 4 warps (8: 8B -0.3%, 7B even), and so does the 8B's qkv, whose 384 tiles
            are one a 4-warp block (8 warps, 2 tiles a block: -3.3%) (H100, one process).
    A batch-1 block of more than one batch stages its whole x row in shared memory once
    (``whole_x``: no barrier between batches) where it fits the 48 KB a launch gets without
    opting in: +1.2% on the 8B int4 step, +1.7% on the 7B int8 step (H100, one process, logits
    bit-identical). An int4 batch-1 grid of more 16-column tiles than blocks resident at once
    (gate/up, the LM head, Llama-2-7B's qkv) shrinks to what is resident and each block walks
    several tiles (``tiles``), staging and norming x once: 8B int4 step +1.1%, 7B int4 +2.3%;
    int8 keeps one tile a block (its 7B step was 1.0% slower with several) (H100, one process, logits
    bit-identical; tools/tuning_ab.py). A block of several tiles in an even number of pipelined batches
    requests its next tile's first codes behind the last batch of this one (the template's AHEAD), not
    after the tile's sums: 8B int4 +1.0%, 7B int4 +1.3%. Grids of half the resident blocks (one 8-warp
    block a SM, so the next kernel's blocks land beside them) lost 24% (tuning_ab half/half8); a grid
    of every resident slot, its tiles dealt 3 or 4 a block (264 blocks for the 8B gate/up, not 224 of
    4), lost 2.4% (docs/ab_h100.txt call 12; presumably the slots equal shares leave free serve the next kernel).
    A per-thread shared-memory ring of codes, scales and zeros filled by cp.async (2 to 4 stages, so
    stages - 1 batches in flight in no register) LOST 7-18% on every pipelined int4 GEMV against these
    register pipelines (7B int4 step 521.4 -> 428.3 tok/s with 3 stages everywhere; docs/ab_h100.txt,
    session 17) and was removed.
    fp32 (CUDA cores, not a speed path): a chunk or two per lane."""
    if dtype == "float32":
        per_lane = _cdiv(K // quant.chunk_k, 32)
        return GemvTuning(warps=8, unroll=max(1, min(2 if row_tile == 1 else 1, per_lane)))
    mt = 2 if epilogue == "silu_mul" else 1
    steps = _cdiv(K // quant.chunk_k, 4)
    warps, unroll, pipeline = 4, 4 if mt == 1 else 2, False
    if quant.scheme == "int8" and row_tile == 1:
        warps, pipeline = 8, True
    elif quant.scheme == "int4":
        if row_tile > 8 or (has_bias and row_tile > 1):
            unroll = 2
        n_blocks = _cdiv(N // mt, 16)
        walks_qkv = epilogue == "rope" and n_blocks > 4 * SMS  # its 4-warp blocks would walk tiles either way
        if row_tile == 1 and mt == 1 and (n_blocks <= 2 * SMS or walks_qkv):
            warps = 8
            if steps > warps * 4 or walks_qkv:  # more than one batch of 4 steps, or tiles: pipelined batches of 2
                unroll, pipeline = 2, True
        elif row_tile == 1 and mt == 2:
            warps, unroll, pipeline = 8, 1, True
    per_warp = _cdiv(steps, warps)
    unroll = max(1, min(unroll, per_warp))
    tuning = GemvTuning(warps=warps, unroll=unroll, pipeline=pipeline and per_warp > unroll)
    if row_tile == 1 and steps > warps * unroll:  # (one batch stages its slab once either way)
        whole = replace(tuning, whole_x=True)
        if gemv_quant_smem(dtype, K, 1, whole, quant) <= WHOLE_X_SMEM:
            tuning = whole
    if row_tile == 1 and quant.scheme == "int4":
        tuning = _with_resident_tiles(tuning, _cdiv(N // mt, 16), per_warp)
    return tuning


def _with_resident_tiles(tuning: GemvTuning, n_tiles: int, per_warp: int) -> GemvTuning:
    """``tuning`` with enough column tiles per block that the whole grid is resident at once
    (``min_blocks`` a SM), each block taking as equal a share as the tile count allows (1 where one
    tile a block fits). per_warp: steps of a W row per warp."""
    slots = SMS * tuning.min_blocks
    tiles = 1 if n_tiles <= slots else _cdiv(n_tiles, slots)
    if tiles > 1 and not tuning.pipeline and tuning.unroll > 2:
        # the tile loop's registers leave no room for 4 unpipelined steps (ptxas spills): 2, pipelined
        tuning = replace(tuning, unroll=2, pipeline=per_warp > 2)
    return replace(tuning, tiles=tiles)


WHOLE_X_SMEM = 48 * 1024  # the most dynamic shared memory a launch gets without opting in


def gemv_quant_smem(dtype: str, K: int, row_tile: int, tuning: GemvTuning, quant: GemvQuant | None) -> int:
    """Dynamic shared memory of a quantized 16-bit GEMV: its x slab, row_tile rows of the k range
    one batch of steps covers, or every batch with ``whole_x`` (16-byte units, each row padded by 4
    units against bank conflicts); must agree with the template's STAGE_U / RS."""
    if quant is None or dtype == "float32":
        return 0
    step_units = 4 * quant.chunk_k // 8  # 8-value x units per step of 4 lanes
    batch_steps = tuning.warps * tuning.unroll
    batches = _cdiv(_cdiv(K // quant.chunk_k, 4), batch_steps) if tuning.whole_x else 1
    return row_tile * (batches * batch_steps * step_units + 4) * 16


@dataclass(frozen=True)
class RopeEpilogue:
    """What the GEMV's rope epilogue needs: the attention shape, the rotary pairing and the cache.

    The GEMV's W (and bias) rows must be in ``llamagraph.ir.layout.rope_pair_order(H + 2 * KV, HD,
    layout)`` order."""

    H: int
    KV: int
    HD: int
    layout: str  # "rotate_half" | "interleaved"
    max_seq: int
    scaling: dict | None = None
    theta: float = 10000.0

    @property
    def dynamic(self) -> bool:
        return (self.scaling or {}).get("rope_type") == "dynamic"

    def tag(self) -> str:
        t = f"rope_h{self.H}_kv{self.KV}_d{self.HD}_{'il' if self.layout == 'interleaved' else 'rh'}_s{self.max_seq}"
        if self.dynamic:
            s = self.scaling
            t += f"_dyn_t{number_tag(self.theta)}_f{number_tag(s['factor'])}_o{int(s['original_max_position_embeddings'])}"
        return t

    def params(self) -> dict:
        p = dict(H=self.H, KV=self.KV, HD=self.HD, layout=self.layout, max_seq=self.max_seq, dynamic=self.dynamic,
                 theta="", factor="", orig="")
        if self.dynamic:
            p.update(theta=repr(float(self.theta)), factor=repr(float(self.scaling["factor"])),
                     orig=str(int(self.scaling["original_max_position_embeddings"])))
        return p


def _gemv_check(dtype, N, K, row_tile, epilogue, out_dtype, tuning, prologue="none", rope=None, quant=None):
    if quant is not None:
        quant.check(K)
    if prologue not in GEMV_PROLOGUES:
        raise ValueError(f"gemv prologue must be one of {GEMV_PROLOGUES}, got {prologue!r}")
    if epilogue == "residual" and out_dtype != dtype:
        raise ValueError("gemv residual epilogue writes the residual stream's dtype; out_dtype must equal dtype")
    if epilogue == "rope":
        if dtype == "float32":
            raise ValueError("gemv rope epilogue needs 16-bit weights (it pairs rows of a tensor-core tile)")
        if rope is None or N != (rope.H + 2 * rope.KV) * rope.HD or rope.HD % 16 or out_dtype != dtype:
            raise ValueError(f"gemv rope epilogue needs N = (H + 2KV) * head_dim with head_dim % 16 == 0, got "
                             f"N={N}, {rope}")
    _check_dtype(dtype)
    _check_dtype(out_dtype)
    _check_dim("N", N)
    _check_dim("K", K)
    if epilogue not in GEMV_EPILOGUES:
        raise ValueError(f"gemv epilogue must be one of {GEMV_EPILOGUES}, got {epilogue!r}")
    vec = 16 // itemsize(dtype)
    if K % vec:
        raise ValueError(
            f"gemv needs K to be a multiple of {vec} for {dtype} (rows are read in 16-byte vectors), got K={K}"
        )
    if epilogue == "silu_mul" and N % 2:
        raise ValueError(f"gemv silu_mul needs an even N (gate rows then up rows), got N={N}")
    if not 1 <= row_tile <= MAX_ROW_TILE:
        raise ValueError(f"gemv row_tile must be in [1, {MAX_ROW_TILE}], got {row_tile}")
    if tuning.warps not in (1, 2, 4, 8, 16, 32) or not 1 <= tuning.unroll <= 16:
        raise ValueError(f"bad gemv tuning {tuning}")
    if (tuning.pipeline or tuning.whole_x or tuning.tiles != 1) and (quant is None or dtype == "float32"):
        raise ValueError(f"gemv tuning {tuning}: pipelined codes, whole x slabs and several tiles a block are for "
                         f"quantized 16-bit GEMVs only")
    if not isinstance(tuning.tiles, int) or tuning.tiles < 1:
        raise ValueError(f"bad gemv tuning {tuning}: tiles must be a positive int")
    if tuning.ahead2 and not (tuning.pipeline and tuning.tiles > 1):
        raise ValueError(f"gemv tuning {tuning}: ahead2 is for pipelined blocks of several tiles")
    if tuning.zsum and not (quant is not None and quant.folded and dtype != "float32" and tuning.whole_x):
        raise ValueError(f"gemv tuning {tuning}: zsum is for int4 groups of whole 128-column steps, 16-bit "
                         f"activations and a whole staged x row (whole_x), got {quant}, {dtype}")
    n_out = N // 2 if epilogue == "silu_mul" else N
    if quant is not None and quant.code_order and (dtype == "float32" or n_out % 16):
        raise ValueError(f"gemv of {quant.scheme} codes in {quant.code_order!r} order needs 16-bit activations and whole "
                         f"16-column tiles (N_out % 16 == 0), got {dtype}, N_out={n_out}")


def gemv(
    dtype: str,
    N: int,
    K: int,
    row_tile: int,
    epilogue: str = "none",
    has_bias: bool = False,
    out_dtype: str | None = None,
    tuning: GemvTuning | None = None,
    prologue: str = "none",
    eps: float = 0.0,
    rope: RopeEpilogue | None = None,
    quant: GemvQuant | None = None,
    res_early: bool = False,
) -> Kernel:
    """out[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]), fp32 accumulation.

    Args: (const T* x, const T* W, const T* bias_or_null, OutT* out, int rows).
    x: [rows, K]; W: [N, K]; bias: [N] (read only with has_bias); out: [rows, N_out] of out_dtype.
      epilogue "none":     N_out = N.
      epilogue "silu_mul": W = [gate rows; up rows] (N = 2I), N_out = I,
                           out[r, j] = silu(h[r, j]) * h[r, I + j] with h = x W^T (+ bias).
    Rows are processed row_tile at a time (W is read once per row tile), so pick
    row_tile >= the usual row count (<= 16; 8 covers one tensor-core tile).
    16-bit W uses tensor cores (needs sm_80+); fp32 W uses CUDA-core FMAs.
      epilogue "residual": out[r, n] = round(h[r, n]) + res[r, n]; out may alias res.
      epilogue "rope":     W rows in ``ir.layout.rope_pair_order``; q heads -> out [rows, H, HD] rotated,
                           k heads (rotated) and v heads -> kcache / vcache at (seq_ids[r], positions[r]).
      prologue "rmsnorm":  x is replaced by round(x * rsqrt(mean(x^2) + eps) * norm_w) per row first.
    Extra args after ``rows``: norm_w (rmsnorm), res (residual), positions, seq_ids, seq_lens,
    inv_freq, kcache, vcache (rope).
    out must not alias x (x is read through the non-coherent cache while out is written).

    quant: W holds int8 / packed int4 codes (``GemvQuant``); the args become
    (const T* x, const unsigned char* W, const T* w_scales, const T* w_zeros_or_null, const T* bias_or_null,
    OutT* out, int rows, ...), scales [N] (int8) or scales and zeros [N, K/G] (int4) in the activation
    dtype, rows in W's row order. 16-bit x: the block stages x (normed, in the pairing the dequantized
    codes come in) in dynamic shared memory (``gemv_launch`` sizes it).

    res_early (quantized W, 16-bit activations, residual epilogue): each thread reads its element of
    res for the block's first tile before the PDL wait, so that read is off the path that starts
    when the kernel before ends. Only for a launch whose kernel before it does not write res (the
    launch's ``reads_early``, which CompiledPlan.check proves). H100, one process, logits
    bit-identical (tools/tuning_ab.py base against nore): 8B int4 step +3.4%, 7B int4 +2.7%, 7B int8 +0.3%.
    """
    if res_early and (epilogue != "residual" or quant is None or dtype == "float32"):
        raise ValueError("gemv res_early is for quantized W with 16-bit activations and the residual epilogue, got "
                         f"epilogue {epilogue!r}, quant {quant!r}, dtype {dtype}")
    out_dtype = out_dtype or dtype
    if quant is not None and not isinstance(quant, GemvQuant):
        raise ValueError(f"gemv quant must be a GemvQuant, got {quant!r}")
    default = gemv_default_tuning(dtype, N, K, row_tile, epilogue, prologue, quant, has_bias)
    tuning = tuning or default
    _gemv_check(dtype, N, K, row_tile, epilogue, out_dtype, tuning, prologue, rope, quant)
    name = f"gemv_{_tag(dtype)}"
    if out_dtype != dtype:
        name += f"_o{_tag(out_dtype)}"
    if quant is not None:
        name += "_" + quant.tag()
    name += f"_n{N}_k{K}_r{row_tile}"
    if prologue == "rmsnorm":
        name += f"_rms{eps_tag(eps)}"
    if epilogue == "silu_mul":
        name += "_silu"
    elif epilogue == "residual":
        name += "_res"
    elif epilogue == "rope":
        name += "_" + rope.tag()
    if has_bias:
        name += "_bias"
    if res_early:
        name += "_re"
    if tuning != default:
        name += "_" + tuning.tag()
    src = render(
        "gemv",
        name=name,
        dtype=dtype,
        out_dtype=out_dtype,
        N=N,
        K=K,
        row_tile=row_tile,
        epilogue=epilogue,
        has_bias=has_bias,
        warps=tuning.warps,
        unroll=tuning.unroll,
        pipeline=tuning.pipeline,
        whole_x=tuning.whole_x,
        tiles=tuning.tiles,
        ahead2=tuning.ahead2,
        zsum=tuning.zsum,
        min_blocks=tuning.min_blocks,
        prologue=prologue,
        eps=repr(float(eps)) + "f",
        quant=quant.scheme if quant else "none",
        group=(quant.group_size or 0) if quant else 0,
        folded=bool(quant and quant.folded),
        chunk_major=bool(quant and quant.code_order),
        smem=gemv_quant_smem(dtype, K, row_tile, tuning, quant),
        res_early=res_early,
        **(rope.params() if rope else {}),
    )
    return Kernel(name, src)


def gemv_launch(
    dtype: str,
    N: int,
    K: int,
    row_tile: int,
    epilogue: str = "none",
    tuning: GemvTuning | None = None,
    prologue: str = "none",
    quant: GemvQuant | None = None,
    has_bias: bool = False,
) -> Shape:
    """Grid over output columns; the row count does not change it (row tiles loop inside).
    A quantized 16-bit GEMV asks for its x slab as dynamic shared memory."""
    tuning = tuning or gemv_default_tuning(dtype, N, K, row_tile, epilogue, prologue, quant, has_bias)
    n_out = N // 2 if epilogue == "silu_mul" else N
    cols_per_block = tuning.warps if dtype == "float32" else 16
    return Shape((_cdiv(_cdiv(n_out, cols_per_block), tuning.tiles), 1, 1), (tuning.warps * 32, 1, 1),
                 gemv_quant_smem(dtype, K, row_tile, tuning, quant))


# ---------------------------------------------------------------------------------------------
# dequant: a quantized weight as the activation dtype (prefill reads it through cuBLAS)
# ---------------------------------------------------------------------------------------------

DEQUANT_THREADS = 256


def dequant(dtype: str, N: int, K: int, quant: GemvQuant) -> Kernel:
    """out[n, k] = w'[n, k] rounded to dtype, with w' from ``llamagraph.ir.quant.dequantize`` (fp32).

    Args: (const unsigned char* W, const T* scales, const T* zeros_or_null, T* out).
    W: int8 [N, K] or packed int4 [N, K/2] (in ``quant.code_order``); scales [N] (int8) or scales,
    zeros [N, K/G] (int4); out: [N, K]. One thread per 8 columns.
    """
    _check_dtype(dtype)
    _check_dim("N", N)
    _check_dim("K", K)
    if not isinstance(quant, GemvQuant):
        raise ValueError(f"dequant needs a GemvQuant, got {quant!r}")
    quant.check(K)
    if quant.code_order and N % 16:
        raise ValueError(f"dequant of {quant.scheme} codes in {quant.code_order!r} order needs N % 16 == 0, got N={N}")
    name = f"dequant_{quant.tag()}_{_tag(dtype)}_n{N}_k{K}"
    src = render("dequant", name=name, dtype=dtype, N=N, K=K, quant=quant.scheme, group=quant.group_size or 0,
                 threads=DEQUANT_THREADS, chunk_major=bool(quant.code_order))
    return Kernel(name, src)


def dequant_launch(N: int, K: int) -> Shape:
    return Shape((_cdiv(N * (K // 8), DEQUANT_THREADS), 1, 1), (DEQUANT_THREADS, 1, 1), 0)


# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------

EW_THREADS = 256


def elementwise(tag: str, expr: str, operand: str, dtype: str, D: int) -> Kernel:
    """out = expr(a, b) over [rows, D] outputs, computed in fp32.

    ``expr`` is a C expression of the floats ``a`` and ``b`` (``silu(x)`` is defined); ``tag``
    names the kernel and must identify (expr, operand). Args: (const T* a, const T* b_or_null,
    T* out, int rows). ``operand`` says how b is read:
      none:   b unused;
      row:    b: [D], broadcast over rows;
      full:   b: [rows, D];
      halves: a: [rows, 2D] read as a[:, :D] and b = a[:, D:]; the b argument is unused and
              out must not alias a (its rows are narrower than a's).
    Otherwise out may alias a or b.
    """
    _check_dtype(dtype)
    _check_dim("D", D)
    if operand not in EW_OPERANDS:
        raise ValueError(f"elementwise operand must be one of {EW_OPERANDS}, got {operand!r}")
    name = f"ew_{tag}_{_tag(dtype)}_d{D}"
    src = render("elementwise", name=name, expr=expr, operand=operand, dtype=dtype, D=D, vec=_math_vec(dtype, D),
                 threads=EW_THREADS)
    return Kernel(name, src)


def elementwise_launch(dtype: str, D: int, rows: int | str) -> Shape:
    per_row = D // _math_vec(dtype, D)
    return Shape((extent(rows, per_row, EW_THREADS), 1, 1), (EW_THREADS, 1, 1), 0)
