"""The kinds of call a launch list makes: a generated kernel, a library function, and a collective.

cupy is imported inside the functions, so importing this module needs no GPU.
``LIBRARY`` maps a library launch's function name to its implementation. cuBLAS cannot run
inside CUDA-graph capture (cupy refuses it), so library calls serve un-captured phases only
(the plan's graph-safety check keeps them out of captured ones).
"""

from __future__ import annotations

import numpy as np

from llamagraph.codegen.launch import Shape
from llamagraph.ir.dtypes import DTYPES

# cublasComputeType_t: fp32 accumulation; PEDANTIC forbids TF32 so fp32 plans keep full precision
_COMPUTE_32F = ("CUBLAS_COMPUTE_32F", 68)
_COMPUTE_32F_PEDANTIC = ("CUBLAS_COMPUTE_32F_PEDANTIC", 69)
_SMEM_DEFAULT_LIMIT = 48 * 1024


def _const(module, name_value: tuple[str, int]) -> int:
    name, value = name_value
    return int(getattr(module, name, value))


def launch_kernel(fn, shape: Shape, args, stream=None) -> None:
    """Launch the cupy ``RawKernel`` ``fn`` with a resolved ``Shape`` on ``stream`` (None: current).

    ``args``: cupy arrays (passed as pointers), ints (passed as C ``int``), or ``np.uint64``
    raw device pointers. Dynamic shared memory above 48 KiB needs the kernel's limit raised
    first (``fn.max_dynamic_shared_size_bytes = n``); this does it when ``shape.smem`` asks.
    """
    if shape.smem > _SMEM_DEFAULT_LIMIT and fn.max_dynamic_shared_size_bytes < shape.smem:
        fn.max_dynamic_shared_size_bytes = shape.smem
    conv = tuple(np.int32(a) if isinstance(a, (int, np.integer)) and not isinstance(a, np.uint64) else a for a in args)
    with _as_stream(stream):  # cupy launches on the current stream
        fn(shape.grid, shape.block, conv, shared_mem=shape.smem)


def early_launch_supported(compute_capability: str) -> bool:
    """Whether kernels may be launched with programmatic dependent launch here: an sm_90+ device
    and NVIDIA's ``cuda-bindings`` (cupy cannot set launch attributes). ``LLAMAGRAPH_PDL=0``
    turns it off (for A/B runs); launches then wait for the kernel before them as usual."""
    import os

    if os.environ.get("LLAMAGRAPH_PDL", "1") == "0" or int(compute_capability) < 90:
        return False
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return False
    return True


def launch_kernel_early(fn, shape: Shape, args, stream) -> None:
    """Launch like ``launch_kernel``, with the programmatic-stream-serialization attribute: the
    kernel may start before the previous kernel on ``stream`` finishes, and must itself wait
    (``lg_pdl_wait``) before touching anything that kernel writes. Works inside stream capture
    (the graph keeps a programmatic edge)."""
    import ctypes

    from cuda.bindings import driver

    if shape.smem > _SMEM_DEFAULT_LIMIT and fn.max_dynamic_shared_size_bytes < shape.smem:
        fn.max_dynamic_shared_size_bytes = shape.smem
    cfg = driver.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = (int(x) for x in shape.grid)
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = (int(x) for x in shape.block)
    cfg.sharedMemBytes = int(shape.smem)
    cfg.hStream = driver.CUstream(int(_as_stream(stream).ptr))
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg.attrs = [attr]
    cfg.numAttrs = 1
    values, types = [], []
    for a in args:
        if isinstance(a, np.uint64):  # a raw device pointer
            values.append(int(a)), types.append(ctypes.c_void_p)
        elif isinstance(a, (np.floating, float)):
            values.append(float(a)), types.append(ctypes.c_float)
        elif isinstance(a, (int, np.integer)):
            values.append(int(a)), types.append(ctypes.c_int)
        else:  # a cupy array
            values.append(int(a.data.ptr)), types.append(ctypes.c_void_p)
    handle = fn.kernel.ptr if hasattr(fn, "kernel") else fn.ptr  # a cupy RawKernel holds its Function
    (err,) = driver.cuLaunchKernelEx(cfg, driver.CUfunction(int(handle)), (tuple(values), tuple(types)), 0)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuLaunchKernelEx failed: {err}")


def _as_stream(stream):
    """A cupy Stream for ``stream``: a cupy Stream, a raw cudaStream_t, or None (the current one)."""
    import cupy

    if stream is None:
        return cupy.cuda.get_current_stream()
    if isinstance(stream, (int, np.integer)):
        return cupy.cuda.ExternalStream(int(stream))
    return stream


def linear_cublas(x_ptr: int, w_ptr: int, out_ptr: int, rows: int, N: int, K: int, dtype: str, out_dtype: str | None = None, stream=None) -> None:
    """out[rows, N] = x[rows, K] @ W[N, K]^T with cuBLAS ``gemmEx`` on raw device pointers.

    Row-major out is column-major out^T[N, rows] = op_T(W_colmajor[K, N]) @ x_colmajor[K, rows],
    so one call with transa=T, transb=N and leading dims K, K, N needs no copies.
    Inputs of ``dtype`` (f32/f16/bf16), output of ``out_dtype`` (default ``dtype``; a 16-bit
    input may write float32), fp32 accumulation (no TF32). ``stream``: a cupy Stream, a raw
    stream pointer, or None for the current stream. Not usable during CUDA-graph capture.
    """
    import cupy
    from cupy.cuda import cublas

    args, _scalars = gemm_ex_args(x_ptr, w_ptr, out_ptr, rows, N, K, dtype, out_dtype)
    if rows == 0:
        return
    handle = cupy.cuda.device.get_cublas_handle()
    with _as_stream(stream):  # cupy's gemmEx binds the handle to the current stream
        mode = cublas.getPointerMode(handle)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        try:
            cublas.gemmEx(handle, *args)
        finally:
            cublas.setPointerMode(handle, mode)


def gemm_ex_args(x_ptr, w_ptr, out_ptr, rows, N, K, dtype, out_dtype=None) -> tuple[tuple, tuple]:
    """The arguments after ``handle`` of ``cupy.cuda.cublas.gemmEx`` for ``linear_cublas``,
    and the host alpha/beta arrays they point to (keep them alive while the args are used).
    The handle must be in host pointer mode."""
    from cupy.cuda import cublas

    out_dtype = out_dtype or dtype
    if DTYPES.get(dtype, DTYPES["int8"]).cuda_enum is None or DTYPES.get(out_dtype, DTYPES["int8"]).cuda_enum is None:
        raise ValueError(f"linear_cublas: unsupported dtypes {dtype} -> {out_dtype}")
    if dtype == "float32" and out_dtype != "float32":
        raise ValueError("linear_cublas: float32 inputs need a float32 output")
    in_t, out_t = DTYPES[dtype].cuda_enum, DTYPES[out_dtype].cuda_enum
    compute = _const(cublas, _COMPUTE_32F_PEDANTIC if dtype == "float32" else _COMPUTE_32F)
    alpha, beta = np.ones(1, np.float32), np.zeros(1, np.float32)
    args = (
        cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, N, rows, K,
        alpha.ctypes.data, int(w_ptr), in_t, K,
        int(x_ptr), in_t, K,
        beta.ctypes.data, int(out_ptr), out_t, N,
        compute, getattr(cublas, "CUBLAS_GEMM_DEFAULT", -1),
    )  # fmt: skip
    return args, (alpha, beta)


def gemm(x, w, out, rows, N, K, dtype, out_dtype, *, stream) -> None:
    """Library call "gemm": out[rows, N] = x[rows, K] @ w[N, K]^T (see ``linear_cublas``)."""
    linear_cublas(int(x), int(w), int(out), int(rows), int(N), int(K), dtype, out_dtype, stream=stream)


LIBRARY = {"gemm": gemm}


# ---- collectives (tensor parallelism): NCCL on a rank's communicator ------------------------------
# A collective launch's args: send address, receive address, rows, elements per row (and rank), dtype.
# NCCL enqueues on the stream like a kernel, so a decode step's collectives are captured into its
# CUDA graph with the kernels around them.

def _nccl_dtype(dtype: str) -> int:
    from cupy.cuda import nccl

    return {"float16": nccl.NCCL_FLOAT16, "bfloat16": getattr(nccl, "NCCL_BFLOAT16", 9),
            "float32": nccl.NCCL_FLOAT32}[dtype]


def allreduce(comm, send, recv, rows, width, dtype, *, stream) -> None:
    """recv[rows, width] = the sum over ranks of send (in place when send == recv)."""
    from cupy.cuda import nccl

    comm.allReduce(int(send), int(recv), int(rows) * int(width), _nccl_dtype(dtype), nccl.NCCL_SUM, stream.ptr)


def allgather(comm, send, recv, rows, width, dtype, *, stream) -> None:
    """recv[ranks, rows, width] = every rank's send[rows, width], rank-major."""
    comm.allGather(int(send), int(recv), int(rows) * int(width), _nccl_dtype(dtype), stream.ptr)


COLLECTIVES = {"allreduce": allreduce, "allgather": allgather}
