"""Every storage dtype a value can have, in one table, and the host-side conversions.

numpy has no bfloat16, so bf16 arrays are held as their raw 16-bit words (uint16) and
converted here; packed int4 holds two values per byte along a value's last axis (low nibble
first). The table is the one place that knows a dtype's size, its short name in the text IR
and in kernel names, its numpy storage type, its C storage type in generated kernels and its
CUDA library enum.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # "float16"
    short: str  # "f16": text IR types and kernel names
    bits: int  # bits per element; int4 is 4 (two per byte)
    storage: type  # numpy dtype of host arrays (bf16: uint16 words; int4: uint8 pairs)
    ctype: str  # C storage type in generated kernels
    kind: str  # "float", "int" (indices, lengths, seeds) or "quant" (quantized weight codes)
    cuda_enum: int | None = None  # cudaDataType_t (library_types.h), for cuBLAS


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", "f32", 32, np.float32, "float", "float", 0),
        DType("float16", "f16", 16, np.float16, "unsigned short", "float", 2),
        DType("bfloat16", "bf16", 16, np.uint16, "unsigned short", "float", 14),
        DType("int8", "i8", 8, np.int8, "signed char", "quant"),
        DType("int4", "i4", 4, np.uint8, "unsigned char", "quant"),
        DType("int32", "i32", 32, np.int32, "int", "int"),
        DType("uint32", "u32", 32, np.uint32, "unsigned int", "int"),
        DType("int64", "i64", 64, np.int64, "long long", "int"),
    )
}
BY_SHORT = {d.short: d.name for d in DTYPES.values()}

FLOAT_DTYPES = tuple(n for n, d in DTYPES.items() if d.kind == "float")  # activation / plan dtypes
QUANT_DTYPES = tuple(n for n, d in DTYPES.items() if d.kind == "quant")
WEIGHT_DTYPES = FLOAT_DTYPES + QUANT_DTYPES


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; dtypes are {', '.join(DTYPES)}") from None


def itemsize(name: str) -> int:
    """Bytes per element of a whole-byte dtype (every dtype but int4)."""
    bits = dtype(name).bits
    if bits % 8:
        raise ValueError(f"{name} packs {8 // bits} values per byte; it has no whole-byte item size")
    return bits // 8


def nbytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a dense array of ``shape``; sub-byte dtypes pack along the last axis, each row
    padded to a whole byte."""
    bits = dtype(name).bits
    if bits % 8 == 0:
        return prod(shape) * bits // 8
    rows = prod(shape[:-1]) if shape else 1
    last = shape[-1] if shape else 1
    return rows * -(-last * bits // 8)


# ---- conversions ------------------------------------------------------------------------------
# ``xp`` is the array module (numpy, or cupy for arrays already on the GPU): one formula serves both.


def bf16_to_f32(bits, xp=np):
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def f32_to_bf16(x, xp=np):
    """float32 -> bf16 words, rounded to nearest even; NaN stays NaN (the kernels' lg_f32_to_bf16)."""
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(xp.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return xp.where(nan, ((u >> 16) | 0x40).astype(xp.uint16), rounded)


def to_float32(arr, name: str, xp=np):
    """Storage array of dtype ``name`` -> float32 (integer dtypes pass through unchanged)."""
    if name == "bfloat16":
        return bf16_to_f32(arr, xp)
    if name in ("float32", "float16"):
        return arr.astype(xp.float32)
    return arr


def to_storage(arr, name: str, xp=np):
    """float32 (or integer) array -> storage array of dtype ``name``."""
    if name == "bfloat16":
        return f32_to_bf16(xp.asarray(arr, xp.float32), xp)
    if name == "int4":
        raise ValueError("int4 values are packed by the quantizer, not converted element-wise")
    return xp.asarray(arr).astype(dtype(name).storage, copy=False)
