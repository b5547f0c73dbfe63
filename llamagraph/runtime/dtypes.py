"""Host-side storage dtypes. numpy has no bfloat16, so bf16 tensors are uint16 bit patterns."""

from __future__ import annotations

import numpy as np

NUMPY_STORAGE = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, keeping NaN a NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array of ``dtype`` -> float32 (integers pass through unchanged)."""
    if dtype == "bfloat16":
        return bf16_to_f32(arr)
    if dtype in ("float32", "float16"):
        return arr.astype(np.float32)
    return arr


def to_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (or integer) array -> storage array of ``dtype``."""
    if dtype == "bfloat16":
        return f32_to_bf16(np.asarray(arr, np.float32))
    if dtype not in NUMPY_STORAGE:
        raise ValueError(f"unknown storage dtype {dtype!r}")
    return np.asarray(arr).astype(NUMPY_STORAGE[dtype], copy=False)
