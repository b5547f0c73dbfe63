"""GEMV workbench: achieved bandwidth of the generated decode GEMV against a device copy and cuBLAS.

Not a test. Run on a GPU:  python tools/bench_gemv.py [--dtype float16] [--rows 1,2,4,8] [--sweep]

For each weight shape and row count it prints the kernel time, the bytes it must move
(W + x + out (+ bias)), the achieved GB/s, that as a percentage of a device-to-device copy
measured in the same run, and cuBLAS gemmEx on the same problem as the peer.
The GEMV runs inside a captured CUDA graph (as in decode steps), cycling over enough copies
of W that none is still in L2 when it is read again. cuBLAS cannot be captured, so it is timed
as back-to-back launches over the same copies. --sweep also times other GemvTuning choices.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import numpy as np

import cupy

from llamagraph.codegen import dense
from llamagraph.codegen.render import module_source
from llamagraph.ir.dtypes import DTYPES, itemsize
from llamagraph.runtime.calls import gemm_ex_args, linear_cublas

SHAPES = [  # (N, K, epilogue, out_dtype or None, what)
    (4096, 4096, "none", None, "7B o_proj"),
    (12288, 4096, "none", None, "7B qkv"),
    (2 * 11008, 4096, "silu_mul", None, "7B gate_up+silu"),
    (4096, 11008, "none", None, "7B down"),
    (32000, 4096, "none", "float32", "7B lm_head (fp32 out)"),
]
ROTATE_BYTES = 256 << 20  # cycle over at least this much W: far more than the 50 MB L2


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, counted as bytes read + bytes written per second."""
    src = cupy.empty(nbytes, cupy.uint8)
    dst = cupy.empty(nbytes, cupy.uint8)
    dst[...] = src
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        dst[...] = src
    stop.record()
    stop.synchronize()
    sec = cupy.cuda.get_elapsed_time(start, stop) / 1e3 / reps
    return 2 * nbytes / sec


def random_storage(shape, dtype, scale, rng):
    x = rng.standard_normal(shape, dtype=cupy.float32) * np.float32(scale)
    if dtype == "bfloat16":
        return (x.view(cupy.uint32) >> 16).astype(cupy.uint16)  # truncation is fine for timing
    return x.astype(DTYPES[dtype].storage)


def time_graph(launch_one, copies: int, reps: int = 4) -> float:
    """Seconds per call of launch_one(i), captured copies*reps times in one CUDA graph."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(copies):  # compile and warm up outside capture
            launch_one(i)
        stream.synchronize()
        stream.begin_capture()
        for _ in range(reps):
            for i in range(copies):
                launch_one(i)
        graph = stream.end_capture()
        graph.launch(stream)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        n_graph = max(3, 60 // (copies * reps))
        start.record(stream)
        for _ in range(n_graph):
            graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / (n_graph * reps * copies)


def time_plain(call, copies: int, reps: int = 8) -> float:
    for i in range(copies):
        call(i)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        for i in range(copies):
            call(i)
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / (reps * copies)


def gemv_launcher(fn, shape, x, ws, out, rows):
    """launch(i): the GEMV on copy i of W."""
    return lambda i: fn(shape.grid, shape.block, (x, ws[i], np.uint64(0), out, np.int32(rows)))


def time_cublas(x, ws, h, rows, N, K, dtype, odt) -> float:
    """cuBLAS gemmEx on the same problem, arguments prepared once so Python adds little per call."""
    from cupy.cuda import cublas

    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    prepared = [gemm_ex_args(x.data.ptr, w.data.ptr, h.data.ptr, rows, N, K, dtype, odt) for w in ws]
    return time_plain(lambda i: cublas.gemmEx(handle, *prepared[i][0]), len(ws))


def as_f32(a, dtype):
    return (a.astype(cupy.uint32) << 16).view(cupy.float32) if dtype == "bfloat16" else a.astype(cupy.float32)


@functools.lru_cache(maxsize=None)
def compiled(kernel):
    return cupy.RawModule(code=module_source([kernel]), backend="nvrtc").get_function(kernel.name)


def check_against_cublas(dtype, N, K, rows, epilogue, out_dtype, tuning, x, w, out, h, odt) -> float:
    """Relative error (by norm) of the GEMV's output against cuBLAS (+ the epilogue in cupy)."""
    k = dense.gemv(dtype, N, K, rows, epilogue=epilogue, out_dtype=out_dtype, tuning=tuning)
    shape = dense.gemv_launch(dtype, N, K, rows, epilogue=epilogue, tuning=tuning)
    compiled(k)(shape.grid, shape.block, (x, w, np.uint64(0), out, np.int32(rows)))
    linear_cublas(x.data.ptr, w.data.ptr, h.data.ptr, rows, N, K, dtype, "float32" if odt == "float32" else dtype)
    ref = as_f32(h[:rows], odt)
    if epilogue == "silu_mul":
        g, u = ref[:, : N // 2], ref[:, N // 2 :]
        ref = g / (1 + cupy.exp(-g)) * u
    got = as_f32(out[:rows], odt)
    return float(cupy.linalg.norm(got - ref) / cupy.linalg.norm(ref))


def bench_shape(dtype, N, K, epilogue, out_dtype, rows_list, tunings, copy_bw, rng):
    out_dtype = out_dtype if dtype != "float32" else None
    odt = out_dtype or dtype
    w_bytes = N * K * itemsize(dtype)
    copies = max(2, math.ceil(ROTATE_BYTES / w_bytes))
    ws = [random_storage((N, K), dtype, 1.0 / math.sqrt(K), rng) for _ in range(copies)]
    n_out = N // 2 if epilogue == "silu_mul" else N
    rows_max = max(rows_list)
    x = random_storage((rows_max, K), dtype, 1.0, rng)
    out = cupy.empty((rows_max, n_out), DTYPES[odt].storage)
    h = cupy.empty((rows_max, N), DTYPES[odt].storage)  # cuBLAS output (pre-epilogue)
    results = []
    for rows in rows_list:
        moved = w_bytes + rows * K * itemsize(dtype) + rows * n_out * itemsize(odt)
        best = None
        for tuning in tunings:
            k = dense.gemv(dtype, N, K, rows, epilogue=epilogue, out_dtype=out_dtype, tuning=tuning)
            shape = dense.gemv_launch(dtype, N, K, rows, epilogue=epilogue, tuning=tuning)
            sec = time_graph(gemv_launcher(compiled(k), shape, x, ws, out, rows), copies)
            if best is None or sec < best[0]:
                best = (sec, k.name, tuning)
            if len(tunings) > 1:
                print(f"      {k.name:48s} {sec * 1e6:8.2f} us {moved / sec / 1e9:8.1f} GB/s", flush=True)
        sec, name, tuning = best
        cub = time_cublas(x, ws, h, rows, N, K, dtype, odt)
        err = check_against_cublas(dtype, N, K, rows, epilogue, out_dtype, tuning, x, ws[0], out, h, odt)
        results.append((rows, name, sec, moved, cub))
        print(
            f"  rows={rows:<2d} {name:44s} {sec * 1e6:8.2f} us {moved / sec / 1e9:8.1f} GB/s "
            f"{100 * moved / sec / copy_bw:5.1f}% of copy | cuBLAS {cub * 1e6:8.2f} us "
            f"({100 * moved / cub / copy_bw:5.1f}% of copy) ratio {cub / sec:4.2f}x | vs cuBLAS {err:.1e}",
            flush=True,
        )
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--sweep", action="store_true", help="also time other warps/unroll choices")
    args = ap.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    dev = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"device: {dev['name'].decode()}  SMs: {dev['multiProcessorCount']}  dtype: {args.dtype}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    tunings = [None]
    if args.sweep and args.dtype != "float32":
        tunings += [dense.GemvTuning(w, u) for w in (4, 8, 16) for u in (2, 4, 8)]
    rng = cupy.random.default_rng(0)  # on the device: hundreds of MB of weights
    summary = []
    for N, K, epi, out_dtype, what in SHAPES:
        print(f"{what}: W [{N}, {K}] {args.dtype}, epilogue {epi}", flush=True)
        for rows, _name, sec, moved, cub in bench_shape(args.dtype, N, K, epi, out_dtype, rows_list, tunings, copy_bw, rng):
            summary.append((what, rows, 100 * moved / sec / copy_bw, cub / sec))
        cupy.get_default_memory_pool().free_all_blocks()
    print("summary (% of copy bandwidth, speed-up over cuBLAS):")
    for what, rows, pct, ratio in summary:
        print(f"  {what:24s} rows={rows:<2d} {pct:5.1f}%  {ratio:4.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
