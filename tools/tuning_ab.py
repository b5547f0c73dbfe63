"""A/B of kernel tunings in one process on the GPU: decode tok/s of one example's plan under each
variant, and its decode-step logits against the first variant's (a tuning that changes only the
schedule leaves them bit-identical; one that changes the order of a sum moves them by rounding).

    python tools/tuning_ab.py CONFIG QUANT VARIANTS [BATCH] [DTYPE]
    python tools/tuning_ab.py examples/tinyllama-1.1b.json none base,pf0,nold,base
    python tools/tuning_ab.py examples/llama-3-8b.json int4 base,nox,base

QUANT: none | int8 | int4 (G 128). VARIANTS, against today's defaults (``base``):
  pf0     16-bit GEMVs prefetch nothing of their W rows to L2 before the PDL wait (today: 2 KB a row,
          but gate/up, which asks for nothing since a0c8c42)
  pf0qkv, pf0res, pf0head  pf0 for one kind of GEMV only (qkv, o/down, the LM head)
  qpf0gu  int4 16-bit gate/up GEMVs ask L2 for nothing before their wait (as 16-bit and int8 W's gate/up;
          a tiled block's prefetch of its next tile stays; measured -2.4% on the 8B int4 step)
  qpf0qkv int4 16-bit qkv GEMVs ask L2 for nothing before their wait (the wait after a residual GEMV returns
          ~1.3 us after it in int4 plans, ~0.45 us in fp16 ones: docs/profiles/timeline_h100.txt)
  q8pf0, q8pf0qkv, q8pf0res, q8pf0head  int8 GEMVs (all / qkv / o and down / the LM head) ask L2 for nothing
          before their wait, as int8 gate/up since c3d539f
  nold    16-bit GEMVs let the kernel after them launch only as their blocks exit (no early trigger)
  nox     quantized batch-1 GEMVs restage x before every batch (before ``whole_x``)
  nopers  int4 batch-1 GEMVs take one column tile a block (a grid of every tile), not several
  noahead int4 GEMVs of several tiles a block request a tile's first codes after the last tile's epilogue
          (before: today they are requested behind the last tile's last batch)
  t8, t8gu, t8qkv, t8head  int8 batch-1 GEMVs (all / gate-up / qkv / LM head) take several column
          tiles a block as int4's do (today: one)
  w8qkv   int4 batch-1 qkv GEMVs take 8 warps as o/down do (today: 4 warps x U = 4, four blocks a SM, where
          the tiles fit the 4-warp slots, as the 8B's 384: -3.3% with 8 warps; past them, as the 7B's 768,
          8 warps walking 3 tiles are the default: +2.0%)
  w8walk  int4 batch-1 GEMVs of 4-warp blocks that walk several tiles (today: the LM heads) take 8 warps
          and tiles as o/down would (8B -0.3%, 7B even)
  gu<T>   quantized batch-1 gate/up GEMVs take T column tiles a block, a grid of cdiv(tiles, T) blocks
          (today int4: as many as fill the resident slots at equal shares, 4 on the 8B: 224 blocks; gu5 =
          180 blocks, gu6 = 150; int8: one, 688 blocks on the 7B, t8gu's 3 = 230, gu4 = 172). Fewer blocks
          than slots leave room for the next kernel's early blocks: filling every slot lost 2.4%, one
          block a SM (half) 24%
  o<T>    quantized batch-1 o_proj GEMVs (residual epilogue, K <= N: not down_proj) take T column tiles a
          block (today one: the 8B's 256 blocks of 8 warps hold 256 of 264 slots while gate/up launches early)
  nore    quantized GEMVs with the residual epilogue (o_proj, down_proj) read their residual elements after
          the PDL wait (before 'researly' landed: today the first tile's are read before it, RES_EARLY)
  nosc    int8 GEMVs read their epilogue's row scales after the reduction (today: before the PDL wait, SC_EARLY)
  tpf0    quantized GEMVs of several tiles a block ask L2 for nothing of their next tile (today: its rows' first
          2 KB, as the pre-wait prefetch)
  tpfh    quantized GEMVs of several tiles a block ask L2 for the first half of each next-tile row (today: its
          first 2 KB, all of a 4096-column int4 row), tpf0's middle: a shorter queue of prefetches ahead of the
          demand loads (unmeasured)
  ct16    int8 / int4 codes stored "tile16" on the device (llamagraph.ir.quant.order_codes: each 16-row block
          chunk-major, repacked at upload; passes/quantize_weights.CODE_ORDER): a GEMV warp's load takes
          four whole 128-byte lines, not eight half lines; logits bit-identical to base (unmeasured)
  lcn, lcnqkv, lcngu  int4 16-bit GEMVs with the rmsnorm prologue (qkv, gate-up and the LM head / qkv / gate-up)
          request their first batch of codes right after the PDL wait, not before it (the tile is asked of L2
          before it either way): does the wait return only once the block's outstanding loads have? (the
          wait after a residual GEMV returns ~1.3 us after it ends where the blocks started within ~1 us of
          that end, 0.5 us where they started earlier: docs/profiles/timeline_h100.txt)
  tpf2    quantized GEMVs of several tiles a block ask L2 for the tile after next too (today: the next tile only),
          so each tile's codes are requested two tiles ahead
  wef     quantized 16-bit GEMVs load their codes with an L2 evict-first policy (createpolicy; today: evict-normal),
          so the streamed weights stop displacing what is read again (the next tile's and the next kernel's
          prefetched lines, scales, activations)
  nwpf    quantized 16-bit GEMVs with the rmsnorm prologue ask L1 for the norm weight's lines before their PDL
          wait (a weight: no kernel writes it), so staging x after the wait finds it there, not in L2
  zsum, zsumgu  int4 batch-1 GEMVs with a whole staged x row (all / gate-up; GemvTuning.zsum): codes enter the
          mma as 1024 + q (bf16 128 + q), the zeros and the magic come off once per step from x sums staged
          with the slab: 4 fewer instructions per 8 codes (sums in another order: logits move by rounding)
  ahead2, ahead2gu, ahead2qkv, ahead2head  int4 GEMVs of several tiles a block (all / gate-up / qkv / the LM
          head) request the next tile's first two batches of codes behind this tile's last, not one
          (GemvTuning.ahead2: two batches in flight through the tile's sums and epilogue; unmeasured)
Diagnostics (they change the numbers: their logits differ from base; what they measure is the time):
  nosz    int4 16-bit GEMVs load no scales or zeros (constants s = 1, z = 8): what those 2-byte loads cost
  noz     the same for the zeros only
  noalu, noalugu  int4 16-bit GEMVs (all / gate-up) fold each batch's codes into one register by XOR
          instead of dequantizing them into mma fragments (the loads, staging, sums and epilogues stay): the
          kernel's streaming rate without its arithmetic
A variant may join several with '+' (t8gu+q8pf0).
Variants measured and settled (w8, w4tail, pf4k/pf8k, gpb4/gpb8, nocl, late, gu1p, gu4u2, w4p, wlate,
bf16early, pf0gu, half/half8, fill, researly, ring<S>, and session 18's sp<N>/ch<N>/dt<N> decode-attention splits,
l2s/l2w o_proj L2 prefetch from attention, b<S> bulk-copy codes ring, w16 one 16-warp block a SM) left this tool
once docs/ab_h100.txt held their results.
(lin, the chunk-major read of row-major codes, gave way to ct16 before it ran.)
With TUNING_AB_LOGITS=PATH.npy the first variant's decode-step logits are saved there (to compare
the logits of two source trees run one after the other). Decode is timed as ``llamagraph bench`` times it (pipelined generate, prompt 128, 128 new tokens,
best of 3). The patches live here only: the package has no switches for them.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import sys
from dataclasses import replace

import numpy as np

import llamagraph
from llamagraph.bench import _cupy_sync, _decode_time, _free_cupy
from llamagraph.codegen import dense
from llamagraph.ir import load_config

quantize_weights = importlib.import_module("llamagraph.passes.quantize_weights")  # the module (its function shares the name)
DEFAULTS = dict(quant=dense._quant_tuning, render=dense.render, tiles=dense._with_resident_tiles,
                code_order=dict(quantize_weights.CODE_ORDER))
Q_PREFETCH = "    if (NB_FULL + TAIL > 1) prefetch_w(W4, w_scales, w_zeros, col0);"
TRIGGER = "\n    lg_pdl_launch_dependents();\n"
AHEAD = "constexpr bool AHEAD = true &&"
NEXT_TILE_PF = "        if (tile + (int)gridDim.x < NTILES) prefetch_w(W4, w_scales, w_zeros, (tile + gridDim.x) * 16);\n"
SC_EARLY = "constexpr bool SC_EARLY = true &&"
PF_DEF = "__device__ __forceinline__ void prefetch_w("  # (tpfh copies the function, half its lines)
# variant -> (scheme, GEMV epilogues) whose pre-wait L2 prefetch (Q_PREFETCH) it removes
Q_PF0 = {"qpf0gu": ("int4", ("silu_mul",)), "qpf0qkv": ("int4", ("rope",)), "q8pf0": ("int8", ("rope", "residual", "none")),
         "q8pf0qkv": ("int8", ("rope",)), "q8pf0res": ("int8", ("residual",)), "q8pf0head": ("int8", ("none",))}
# variant -> the 16-bit GEMV epilogue whose pre-wait prefetch it removes
PF0_ONLY = {"pf0qkv": "rope", "pf0res": "residual", "pf0head": "none"}
SCALE_LOAD = "cw.sv[u][m][h] = ld_u16(w_scales + (wr[m][h] + grp));"
ZERO_LOAD = "cw.zv[u][m][h] = ld_u16(w_zeros + (wr[m][h] + grp));"
BATCH_DEF = "__device__ __forceinline__ void batch(int b, int warp, int t, const Codes& cw"
BATCH_CALL = re.compile(r"batch\((b|b \+ 1), warp, t, (c[ab]), \w+_xs, xoff, x, row0, here, nw4, s_rstd, acc\);")
Q_WAIT = "    lg_pdl_wait();  // x, res and out only after this\n"
Q_LOAD = """    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 { %0, %1, %2, %3 }, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
"""
Q_LOAD_EF = """    unsigned long long pol;  // wef: evict first from L2
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 { %0, %1, %2, %3 }, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(pol));
"""
Q_TRIGGER = Q_WAIT + "    lg_pdl_launch_dependents();\n"
FIRST_CODES = re.compile(r"^    load_codes\(ca, 0, warp, t, wrow, wr, w_scales, w_zeros\);\n", re.M)  # the pre-wait one
# variant -> the epilogues of the int4 rmsnorm GEMVs it gives late first codes
LCN = {"lcn": ("rope", "silu_mul", "none"), "lcnqkv": ("rope",), "lcngu": ("silu_mul",)}
NW_PREFETCH = """    for (int i = threadIdx.x; i < (int)(K * sizeof(*norm_w) / 128); i += THREADS)  // nwpf: the norm weight, to L1
        asm volatile("prefetch.global.L1 [%0];" :: "l"(reinterpret_cast<const char*>(norm_w) + i * 128));
"""
# noalu: a batch's codes, scales and zeros folded into one accumulator element (every load is waited for)
SINK = """__device__ __forceinline__ void sink(const Codes& cw, float (&acc)[MT][NT][4]) {
    unsigned v = 0u;
    #pragma unroll
    for (int u = 0; u < U; ++u)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int h = 0; h < 2; ++h)
                v ^= cw.w[u][m][h].x ^ cw.w[u][m][h].y ^ cw.w[u][m][h].z ^ cw.w[u][m][h].w ^ cw.sv[u][m][h] ^ cw.zv[u][m][h];
    acc[0][0][0] += __uint_as_float(v & 0x007FFFFFu);
}

"""
# variant -> the int4 GEMV epilogues whose tile-walking blocks it gives GemvTuning.ahead2
AHEAD2 = {"ahead2": ("silu_mul", "rope", "none", "residual"), "ahead2gu": ("silu_mul",), "ahead2qkv": ("rope",),
          "ahead2head": ("none",)}
# variant -> the int8 GEMV epilogues it gives several tiles a block
T8 = {"t8": ("silu_mul", "rope", "none", "residual"), "t8gu": ("silu_mul",), "t8qkv": ("rope",), "t8head": ("none",)}


def kinds_of(table: dict[str, tuple[str, ...]], flags: set[str]) -> tuple[str, ...]:
    """The GEMV epilogues that the variant's flags name in ``table`` (variant -> epilogues)."""
    return sum((kinds for name, kinds in table.items() if name in flags), ())


def patch(variant: str) -> None:
    """Point the codegen at ``variant``'s tunings (``base``: the package's own; a+b: both)."""
    quant, render = DEFAULTS["quant"], DEFAULTS["render"]
    flags = set(variant.split("+"))

    def quant_tuning(dtype, N, K, row_tile, epilogue, q, has_bias=False):
        """The package's tuning with each part of the variant applied in turn (parts that touch
        different GEMVs or fields join; none of them replaces another's change)."""
        cdiv = dense._cdiv
        if "nopers" in flags:
            tiles, dense._with_resident_tiles = dense._with_resident_tiles, lambda t, n_tiles, per_warp: t
            try:
                t = quant(dtype, N, K, row_tile, epilogue, q, has_bias)
            finally:
                dense._with_resident_tiles = tiles
        else:
            t = quant(dtype, N, K, row_tile, epilogue, q, has_bias)
        if dtype == "float32" or row_tile != 1:
            return replace(t, whole_x=False) if "nox" in flags else t
        walks = "w8walk" in flags and epilogue != "silu_mul" and t.warps == 4 and t.tiles > 1
        if q.scheme == "int4" and (walks or ("w8qkv" in flags and epilogue == "rope")):
            small = quant(dtype, min(N, 2 * dense.SMS * 16), K, row_tile, epilogue, q, has_bias)  # o/down's branch
            t = DEFAULTS["tiles"](replace(small, tiles=1), cdiv(N, 16), cdiv(cdiv(K // 32, 4), small.warps))
            t = replace(t, whole_x=t.pipeline)  # (batches of 2 steps: stage x once)
        which = kinds_of(T8, flags)
        if q.scheme == "int8" and epilogue in which:
            mt = 2 if epilogue == "silu_mul" else 1
            t = DEFAULTS["tiles"](t, cdiv(N // mt, 16), cdiv(cdiv(K // 16, 4), t.warps))
        for prefix, kind in (("gu", epilogue == "silu_mul"), ("o", epilogue == "residual" and K <= N)):
            counts = [int(f[len(prefix):]) for f in flags if f.startswith(prefix) and f[len(prefix):].isdigit()]
            if counts and kind:
                t = replace(t, tiles=counts[0])
        if q.scheme == "int4" and q.folded and t.whole_x and ("zsum" in flags or ("zsumgu" in flags and epilogue == "silu_mul")):
            t = replace(t, zsum=True)
        ahead2 = kinds_of(AHEAD2, flags)
        if q.scheme == "int4" and epilogue in ahead2 and t.pipeline and t.tiles > 1:
            t = replace(t, ahead2=True)
        return replace(t, whole_x=False) if "nox" in flags else t

    only = next((kind for name, kind in PF0_ONLY.items() if name in flags), None)
    prefetch = 0 if only or "pf0" in flags else None

    def render_prefetch(template, **kw):
        src = render(template, **kw)
        if prefetch is not None and template == "gemv" and kw.get("quant") == "none" \
                and (only is None or kw.get("epilogue") == only):
            src = src.replace("< 2048 ? K", f"< {prefetch} ? K").replace(") : 2048;", f") : {prefetch};")
        if template == "gemv" and kw.get("dtype") != "float32" and any(
                kw.get("quant") == scheme and kw.get("epilogue") in kinds for name, (scheme, kinds) in Q_PF0.items()
                if name in flags):
            assert Q_PREFETCH in src, f"the GEMV template changed: update '{variant}'"
            src = src.replace(Q_PREFETCH, "")
        if "tpf2" in flags and template == "gemv" and kw.get("tiles", 1) > 1:
            assert NEXT_TILE_PF in src, "the GEMV template changed: update 'tpf2'"
            src = src.replace(NEXT_TILE_PF, NEXT_TILE_PF + NEXT_TILE_PF.replace("gridDim.x", "2 * gridDim.x")
                              .replace("(int)2 * gridDim.x", "2 * (int)gridDim.x"))
        if "tpfh" in flags and template == "gemv" and kw.get("tiles", 1) > 1:
            assert NEXT_TILE_PF in src and PF_DEF in src, "the GEMV template changed: update 'tpfh'"
            start = src.index(PF_DEF)
            body = src[start: src.index("\n}\n", start) + 3]
            half = body.replace("prefetch_w(", "prefetch_next(").replace("PF_LINES", "PF_NEXT")
            src = (src[:start] + "constexpr int PF_NEXT = (PF_LINES + 1) / 2;  // (tpfh)\n" + half + "\n" + src[start:])
            src = src.replace(NEXT_TILE_PF, NEXT_TILE_PF.replace("prefetch_w(", "prefetch_next("))
        if "tpf0" in flags and template == "gemv" and kw.get("tiles", 1) > 1:
            assert NEXT_TILE_PF in src, "the GEMV template changed: update 'tpf0'"
            src = src.replace(NEXT_TILE_PF, "")
        if "noahead" in flags and template == "gemv" and kw.get("tiles", 1) > 1:
            assert AHEAD in src, "the GEMV template changed: update 'noahead'"
            src = src.replace(AHEAD, "constexpr bool AHEAD = false &&")
        if "nold" in flags and template == "gemv" and kw.get("quant") == "none" and kw.get("dtype") != "float32":
            assert TRIGGER in src, "the GEMV template changed: update 'nold'"
            src = src.replace(TRIGGER, "\n")
        return src

    def render_variant(template, **kw):
        if "nore" in flags and template == "gemv":
            kw = dict(kw, res_early=False)
        src = render_prefetch(template, **kw)
        if "nosc" in flags and template == "gemv" and kw.get("quant") == "int8" and kw.get("dtype") != "float32":
            assert SC_EARLY in src, "the GEMV template changed: update 'nosc'"
            src = src.replace(SC_EARLY, "constexpr bool SC_EARLY = false &&")
        int4 = template == "gemv" and kw.get("quant") == "int4" and kw.get("dtype") != "float32"
        if int4 and flags & {"nosz", "noz"}:
            assert SCALE_LOAD in src and ZERO_LOAD in src, "the GEMV template changed: update 'nosz' / 'noz'"
            src = src.replace(ZERO_LOAD, "cw.zv[u][m][h] = (unsigned short)8;")
            if "nosz" in flags:
                one = "0x3F80" if kw.get("dtype") == "bfloat16" else "0x3C00"
                src = src.replace(SCALE_LOAD, f"cw.sv[u][m][h] = (unsigned short){one};")
        if "wef" in flags and template == "gemv" and kw.get("quant") != "none" and kw.get("dtype") != "float32":
            assert Q_LOAD in src, "the GEMV template changed: update 'wef'"
            src = src.replace(Q_LOAD, Q_LOAD_EF)
        if "nwpf" in flags and template == "gemv" and kw.get("quant") != "none" and kw.get("dtype") != "float32" \
                and kw.get("prologue") == "rmsnorm":
            assert Q_WAIT in src, "the GEMV template changed: update 'nwpf'"
            src = src.replace(Q_WAIT, NW_PREFETCH + Q_WAIT)
        lcn = kinds_of(LCN, flags)
        if int4 and kw.get("prologue") == "rmsnorm" and kw.get("epilogue") in lcn:
            assert len(FIRST_CODES.findall(src)) == 1 and Q_TRIGGER in src, "the GEMV template changed: update 'lcn'"
            line = FIRST_CODES.search(src).group(0)
            src = FIRST_CODES.sub("", src).replace(Q_TRIGGER, Q_TRIGGER + line)
        if int4 and ("noalu" in flags or ("noalugu" in flags and kw.get("epilogue") == "silu_mul")):
            assert BATCH_DEF in src and BATCH_CALL.search(src), "the GEMV template changed: update 'noalu'"
            src = src.replace(BATCH_DEF, SINK + BATCH_DEF, 1)
            src = BATCH_CALL.sub(lambda m: f"sink({m.group(2)}, acc);", src)
        return src

    dense._quant_tuning, dense.render = quant_tuning, render_variant
    quantize_weights.CODE_ORDER.update({s: "tile16" for s in ("int8", "int4")} if "ct16" in flags else DEFAULTS["code_order"])


def main(argv: list[str]) -> None:
    config, quantize, variants = argv[0], argv[1], argv[2].split(",")
    batch = int(argv[3]) if len(argv) > 3 else 1
    dtype = argv[4] if len(argv) > 4 else "float16"
    quantize = None if quantize == "none" else quantize
    cfg = load_config(config)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 128)).tolist()
    first = None
    for variant in variants:
        patch(variant)
        plan = None
        try:
            plan = llamagraph.compile(cfg, "random", dtype=dtype, max_batch=batch, max_seq=256, backend="cuda",
                                      quantize=quantize, group_size=128 if quantize == "int4" else None)
            plan.run(prompts)
            logits = np.asarray(plan.run([[7]] * batch), np.float32)  # a decode step
            if first is None and os.environ.get("TUNING_AB_LOGITS"):  # to compare two trees' logits
                np.save(os.environ["TUNING_AB_LOGITS"], logits)
            first = logits if first is None else first
            plan.generate(prompts, 4)  # capture the pipelined decode graph
            runs = [127 * batch / _decode_time(plan, prompts, 128, _cupy_sync) for _ in range(3)]
            print(f"{config} {dtype} {quantize or ''} {variant}: batch {batch} decode {max(runs):.1f} tok/s "
                  f"(runs {[round(r, 1) for r in runs]}), logits max diff vs {variants[0]} "
                  f"{float(np.abs(logits - first).max()):.3g}", flush=True)
        except Exception as e:  # one variant failing (e.g. spills past the register budget) is a result too
            print(f"{config} {dtype} {quantize or ''} {variant}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
        plan = None
        gc.collect()
        _free_cupy(1)


if __name__ == "__main__":
    main(sys.argv[1:])
