"""Prefill attention workbench: the generated kernel against torch SDPA, same shapes, same run.

Not a test. Run on a GPU:  python tools/bench_prefill_attention.py [--tokens 2048] [--seqs 1]
                           [--dtype float16,bfloat16] [--variants]

For each shape (Llama-3-8B: H 32, KV 8, D 128; Llama-3.2-1B: H 32, KV 8, D 64) it prints the
kernel's time per call, its causal TFLOP/s (4 * D * H * keys attended, summed over the rows),
torch SDPA (is_causal, K/V expanded to H heads as HF's eager Llama does, and with enable_gqa
where torch has it) on the same data, the ratio, and the largest difference between the two
outputs. --seqs N packs N prompts of tokens/N each (one tile table, one launch; torch runs
them as a batch). --variants also times the tensor-core kernel's other register and pipeline
plans (q_regs, min_blocks, stages) so the default can be chosen from measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

import cupy

from llamagraph.codegen import attention as A
from llamagraph.codegen.launch import seq_tiles
from llamagraph.codegen.render import module_source

SHAPES = [(32, 8, 128, "Llama-3-8B"), (32, 8, 64, "Llama-3.2-1B")]
VARIANTS = [  # (q_regs, min_blocks, stages); None = the default plan
    (None, None, None), (False, 2, 1), (False, 2, 2), (False, 1, 2), (True, 1, 2), (True, 1, 1), (True, 2, 2),
]


def time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / reps


def flops(lengths: list[int], H: int, D: int) -> float:
    """Q.K^T and P.V of causal attention: 2 * 2 * D multiply-adds per (row, key attended, head)."""
    return 4.0 * D * H * sum(n * (n + 1) / 2 for n in lengths)


def bench_shape(dtype: str, H: int, KV: int, D: int, what: str, tokens: int, seqs: int, variants: bool) -> None:
    import torch
    import torch.nn.functional as F

    n = tokens // seqs
    lengths = [n] * seqs
    T = n * seqs
    max_seq = n
    positions = np.concatenate([np.arange(n) for _ in lengths]).astype(np.int32)
    seq_ids = np.repeat(np.arange(seqs), n).astype(np.int32)
    tiles = seq_tiles(seq_ids, A.attention_prefill_rows(D))
    cp_dt = cupy.float16 if dtype == "float16" else cupy.uint16
    th_dt = torch.float16 if dtype == "float16" else torch.bfloat16

    # data made by torch (bf16 has no cupy dtype), shared with the kernel through DLPack
    g = torch.Generator(device="cuda").manual_seed(0)
    q_t = torch.randn(T, H, D, device="cuda", generator=g, dtype=torch.float32).to(th_dt)
    k_t = torch.randn(seqs, max_seq, KV, D, device="cuda", generator=g, dtype=torch.float32).to(th_dt)
    v_t = torch.randn(seqs, max_seq, KV, D, device="cuda", generator=g, dtype=torch.float32).to(th_dt)
    out_t = torch.empty(T, H * D, device="cuda", dtype=th_dt)

    def as_cupy(t):
        return cupy.from_dlpack(t.view(torch.int16)).view(cp_dt)

    q, kc, vc, out = as_cupy(q_t), as_cupy(k_t), as_cupy(v_t), as_cupy(out_t)
    d_pos, d_ids, d_tiles = cupy.asarray(positions), cupy.asarray(seq_ids), cupy.asarray(tiles)
    fl = flops(lengths, H, D)

    # torch SDPA on [seqs, H, n, D]
    qb = q_t.view(seqs, n, H, D).transpose(1, 2)
    kb = k_t[:, :n].transpose(1, 2)  # [seqs, KV, n, D]
    vb = v_t[:, :n].transpose(1, 2)
    kx = kb.repeat_interleave(H // KV, dim=1).contiguous()
    vx = vb.repeat_interleave(H // KV, dim=1).contiguous()
    ref = F.scaled_dot_product_attention(qb, kx, vx, is_causal=True)  # [seqs, H, n, D]
    ref_rows = ref.transpose(1, 2).reshape(T, H * D).float()

    def torch_ms(**kw) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        k_, v_ = (kb, vb) if kw else (kx, vx)
        for _ in range(3):
            F.scaled_dot_product_attention(qb, k_, v_, is_causal=True, **kw)
        start.record()
        for _ in range(20):
            F.scaled_dot_product_attention(qb, k_, v_, is_causal=True, **kw)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20

    t_sdpa = torch_ms()
    try:
        t_gqa = torch_ms(enable_gqa=True)
    except TypeError:  # torch < 2.5
        t_gqa = float("nan")

    print(f"\n{what} {dtype}: H {H} KV {KV} D {D}, {seqs} x {n} tokens ({len(tiles)} tiles of "
          f"{A.attention_prefill_rows(D)} rows), {fl / 1e9:.1f} GFLOP causal")
    print(f"  torch SDPA (K/V expanded, HF eager) {t_sdpa:8.3f} ms  {fl / t_sdpa / 1e9:6.1f} TFLOP/s")
    if not math.isnan(t_gqa):
        print(f"  torch SDPA enable_gqa               {t_gqa:8.3f} ms  {fl / t_gqa / 1e9:6.1f} TFLOP/s")

    plans = VARIANTS if variants else VARIANTS[:1]
    for q_regs, min_blocks, stages in plans:
        if q_regs is None:
            kernel = A.attention_prefill(dtype, H, KV, D, H * D, max_seq)
            launch = A.attention_prefill_launch(len(tiles), H, D)
            label = "llamagraph (default)"
        else:
            kernel = A.attention_prefill_mma(dtype, H, KV, D, H * D, max_seq, q_regs=q_regs, min_blocks=min_blocks,
                                             stages=stages)
            launch = dataclasses.replace(A.attention_prefill_launch(len(tiles), H, D),
                                         smem=A.attention_prefill_mma_smem(D, stages))
            label = f"q_regs={int(q_regs)} min_blocks={min_blocks} stages={stages}"
        mod = cupy.RawModule(code=module_source([kernel]), backend="nvrtc", options=("--std=c++17",))
        fn = mod.get_function(kernel.name)
        if launch.smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = launch.smem
        args = (q, kc, vc, d_pos, d_ids, d_tiles, out, np.int32(len(tiles)))

        def call():
            fn(launch.grid, launch.block, args, shared_mem=launch.smem)

        ms = time_ms(call)
        err = (out_t.float() - ref_rows).abs().max().item()
        print(f"  {label:36s}{ms:8.3f} ms  {fl / ms / 1e9:6.1f} TFLOP/s  {t_sdpa / ms:5.2f}x SDPA  "
              f"max |diff| {err:.2e}  [{kernel.name}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seqs", type=int, default=1, help="pack this many prompts of tokens/seqs tokens")
    ap.add_argument("--dtype", default="float16,bfloat16")
    ap.add_argument("--variants", action="store_true", help="also time the non-default kernel plans")
    a = ap.parse_args()
    dev = cupy.cuda.Device()
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}")
    for dtype in a.dtype.split(","):
        for H, KV, D, what in SHAPES:
            bench_shape(dtype, H, KV, D, what, a.tokens, a.seqs, a.variants)


if __name__ == "__main__":
    main()
