"""A/B of kernel tunings in one process on the GPU: decode tok/s of one example's plan under each
variant, and its decode-step logits against the first variant's (a tuning that changes only the
schedule leaves them bit-identical; one that changes the order of a sum moves them by rounding).

    python tools/tuning_ab.py CONFIG QUANT VARIANTS [BATCH] [DTYPE]
    python tools/tuning_ab.py examples/tinyllama-1.1b.json none base,w8,gpb8,base
    python tools/tuning_ab.py examples/llama-3-8b.json int4 base,nox,base

QUANT: none | int8 | int4 (G 128). VARIANTS, against today's defaults (``base``):
  w8      16-bit batch-1 GEMVs of at most one block a SM keep 8 warps (before the 16-warp rule)
  w4tail  16-bit GEMVs of 1 to 2 waves of 8-warp blocks take 4 warps (measured slower)
  pf0, pf4k, pf8k  16-bit GEMVs prefetch 0 / 4 / 8 KB of each W row to L2 before the PDL wait (today: 2 KB;
          4 and 8 measured slower)
  pf0gu, pf0qkv, pf0res, pf0head  pf0 for one kind of GEMV only (gate/up, qkv, o/down, the LM head;
          pf0gu became the default: today gate/up asks for nothing before the wait, and pf0gu changes nothing)
  qpf0gu  quantized 16-bit gate/up GEMVs ask L2 for nothing before their wait (as 16-bit W's gate/up since a0c8c42;
          a tiled block's prefetch of its next tile stays)
  nold    16-bit GEMVs let the kernel after them launch only as their blocks exit (no early trigger)
  nox     quantized batch-1 GEMVs restage x before every batch (before ``whole_x``)
  gpb4, gpb8  decode attention takes up to 4 / 8 heads of a GQA group a block (before the cap of 2)
  nocl    decode attention merges its splits through global memory and a counter, never in a cluster
  late    decode attention requests its first batch of cached keys after lg_pdl_wait, not before
  nocl_late  both (decode attention as before either)
  gu1p    int4 batch-1 gate/up GEMVs: 4 warps in pipelined batches of 1 step (today: 8 warps)
  gu4u2   int4 batch-1 gate/up GEMVs: 4 warps in unpipelined batches of 2 steps (before the 8-warp rule)
  wlate   16-bit GEMVs with the rmsnorm prologue request their first batch of W after the row statistics
  w4p     int4 batch-1 4-warp GEMVs of one W row a column (qkv, LM head): pipelined batches of 2 steps (today: 4)
  nopers  int4 batch-1 GEMVs take one column tile a block (a grid of every tile), not several
  bf16early  bf16 GEMVs with the rmsnorm prologue request their first W batch before the statistics, as
          fp16's do where a row tile has one or two batches (before: it spills in the 1B models' gate/up)
  half, half8  int4 (half8: and int8) batch-1 GEMVs take grids of half the resident blocks (one 8-warp
          block a SM), each block walking its tiles: the next kernel's blocks land beside them early
  noahead int4 GEMVs of several tiles a block request a tile's first codes after the last tile's epilogue
          (before: today they are requested behind the last tile's last batch)
  t8, t8gu, t8qkv, t8head  int8 batch-1 GEMVs (all / gate-up / qkv / LM head) take several column
          tiles a block as int4's do (today: one)
Decode is timed as ``llamagraph bench`` times it (pipelined generate, prompt 128, 128 new tokens,
best of 3). The patches live here only: the package has no switches for them.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import replace

import numpy as np

import llamagraph
from llamagraph.bench import _cupy_sync, _decode_time, _free_cupy
from llamagraph.codegen import attention, dense
from llamagraph.ir import load_config

DEFAULTS = dict(tuning=dense.gemv_default_tuning, quant=dense._quant_tuning, render=dense.render,
                heads=attention.DECODE_HEADS_PER_BLOCK, cluster=attention.decode_cluster,
                attn_render=attention.render, tiles=dense._with_resident_tiles)
W_EARLY = ("constexpr bool EARLY_W = NORM && NB_FULL >= 1 && NB_FULL <= 2;",)
W_LATE = ("constexpr bool EARLY_W = false;",)
EARLY_LOAD = "    load_batch(kb, pos_t);  // the first batch, but for the token's own key\n"
Q_PREFETCH = "    if (NB_FULL + TAIL > 1) prefetch_w(W4, w_scales, w_zeros, col0);"
TRIGGER = "\n    lg_pdl_launch_dependents();\n"
AHEAD = "constexpr bool AHEAD = true &&"
AFTER_WAIT = "    lg_pdl_launch_dependents();\n\n    float* part"



def patch(variant: str) -> None:
    """Point the codegen at ``variant``'s tunings (``base``: the package's own)."""
    tuning, quant, render = DEFAULTS["tuning"], DEFAULTS["quant"], DEFAULTS["render"]

    def gemv_tuning(dtype, N, K, row_tile, epilogue="none", prologue="none", q=None, has_bias=False):
        t = tuning(dtype, N, K, row_tile, epilogue, prologue, q, has_bias)
        if q is not None or dtype == "float32":
            return t
        blocks = -(-(N // 2 if epilogue == "silu_mul" else N) // 16)
        if variant == "w8" and t.warps == 16:
            return dense.GemvTuning(warps=8, unroll=min(8, 2 * t.unroll))
        if variant == "w4tail" and 2 * dense.SMS < blocks <= 4 * dense.SMS:
            return dense.GemvTuning(warps=4, unroll=t.unroll)
        return t

    def quant_tuning(dtype, N, K, row_tile, epilogue, q, has_bias=False):
        t = quant(dtype, N, K, row_tile, epilogue, q, has_bias)
        if variant == "nox":
            return replace(t, whole_x=False)
        if variant in ("half", "half8") and row_tile == 1 and dtype != "float32":
            # grids of one block a SM (8 warps; 4-warp blocks: 2), each walking its share of tiles: half
            # of every SM stays free for the next kernel's blocks, which land early and request their codes
            tiles = dense._with_resident_tiles

            def halved(t, n_tiles, per_warp):
                slots = dense.SMS * max(1, t.min_blocks // 2)
                n = 1 if n_tiles <= slots else -(-n_tiles // slots)
                if n > 1 and not t.pipeline and t.unroll > 2:
                    t = replace(t, unroll=2, pipeline=per_warp > 2)
                return replace(t, tiles=n)
            dense._with_resident_tiles = halved
            try:
                t = quant(dtype, N, K, row_tile, epilogue, q, has_bias)
            finally:
                dense._with_resident_tiles = tiles
            if variant == "half8" and q.scheme == "int8":
                mt = 2 if epilogue == "silu_mul" else 1
                t = halved(t, -(-N // mt // 16), -(-(-(-K // 16) // 4) // t.warps))
            return t
        if variant == "nopers":
            tiles, dense._with_resident_tiles = dense._with_resident_tiles, lambda t, n_tiles, per_warp: t
            try:
                return quant(dtype, N, K, row_tile, epilogue, q, has_bias)
            finally:
                dense._with_resident_tiles = tiles
        which = {"t8": ("silu_mul", "rope", "none", "residual"), "t8gu": ("silu_mul",), "t8qkv": ("rope",),
                 "t8head": ("none",)}.get(variant, ())
        if q.scheme == "int8" and row_tile == 1 and dtype != "float32" and epilogue in which:
            mt = 2 if epilogue == "silu_mul" else 1
            return DEFAULTS["tiles"](t, -(-N // mt // 16), -(-(-(-K // 16) // 4) // t.warps))
        if q.scheme == "int4" and row_tile == 1 and dtype != "float32":
            gate_up = epilogue == "silu_mul"
            if variant == "gu1p" and gate_up:
                t = replace(t, warps=4, unroll=1, pipeline=True)
            elif variant == "gu4u2" and gate_up:
                t = replace(t, warps=4, unroll=2, pipeline=False)
            elif variant == "w4p" and not gate_up and t.warps == 4:
                t = replace(t, unroll=2, pipeline=True)
        return t

    prefetch = {"pf0": 0, "pf4k": 4096, "pf8k": 8192}.get(variant)
    only = {"pf0gu": "silu_mul", "pf0qkv": "rope", "pf0res": "residual", "pf0head": "none"}.get(variant)
    prefetch = 0 if only else prefetch

    def render_prefetch(template, **kw):
        src = render(template, **kw)
        if prefetch is not None and template == "gemv" and kw.get("quant") == "none" \
                and (only is None or kw.get("epilogue") == only):
            src = src.replace("< 2048 ? K", f"< {prefetch} ? K").replace(") : 2048;", f") : {prefetch};")
        if variant == "qpf0gu" and template == "gemv" and kw.get("quant") != "none" and kw.get("epilogue") == "silu_mul" \
                and kw.get("dtype") != "float32":
            assert Q_PREFETCH in src, "the GEMV template changed: update 'qpf0gu'"
            src = src.replace(Q_PREFETCH, "")
        if variant == "noahead" and template == "gemv" and kw.get("tiles", 1) > 1:
            assert AHEAD in src, "the GEMV template changed: update 'noahead'"
            src = src.replace(AHEAD, "constexpr bool AHEAD = false &&")
        if variant == "nold" and template == "gemv" and kw.get("quant") == "none" and kw.get("dtype") != "float32":
            assert TRIGGER in src, "the GEMV template changed: update 'nold'"
            src = src.replace(TRIGGER, "\n")
        if variant == "bf16early" and template == "gemv" and kw.get("quant") == "none" \
                and kw.get("prologue") == "rmsnorm" and kw.get("dtype") == "bfloat16":
            assert W_LATE[0] in src, "the GEMV template changed: update 'bf16early'"
            src = src.replace(W_LATE[0], W_EARLY[0])
        if variant == "wlate" and template == "gemv" and kw.get("quant") == "none" and kw.get("prologue") == "rmsnorm" \
                and kw.get("dtype") == "float16":  # (bf16 requests it late already)
            for early, late in zip(W_EARLY, W_LATE):
                assert early in src, "the GEMV template changed: update 'wlate'"
                src = src.replace(early, late)
        return src

    def render_attention(template, **kw):
        src = DEFAULTS["attn_render"](template, **kw)
        if variant in ("late", "nocl_late") and template == "attention_decode":
            assert EARLY_LOAD in src and AFTER_WAIT in src, "the attention template changed: update 'late'"
            src = src.replace(EARLY_LOAD, "").replace(AFTER_WAIT, AFTER_WAIT.replace("\n\n", "\n    load_batch(kb, -1);\n\n"))
        return src

    dense.gemv_default_tuning, dense._quant_tuning, dense.render = gemv_tuning, quant_tuning, render_prefetch
    attention.DECODE_HEADS_PER_BLOCK = {"gpb4": 4, "gpb8": 8}.get(variant, DEFAULTS["heads"])
    attention.decode_cluster = (lambda max_splits: 1) if variant in ("nocl", "nocl_late") else DEFAULTS["cluster"]
    attention.render = render_attention


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
