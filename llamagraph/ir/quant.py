"""Weight-only quantization: the exact schemes, int4 packing, and dequantization.

Every function takes the array module ``xp`` (numpy, or cupy for weights drawn on the GPU), so
the host loader, the GPU random-weight path and the tests share one formula.

int8 (symmetric, one scale per output row of W [N, K]):
    s = max|w| / 127;  q = clamp(rint(w / s), -127, 127);  w' = q * s
int4 (asymmetric, one scale and zero per group of G consecutive input columns of a row):
    s = (max - min) / 15;  z = clamp(rint(-min / s), 0, 15);  q = clamp(rint(w / s) + z, 0, 15);
    w' = (q - z) * s
A row or group whose range is zero gets s = 1. ``rint`` rounds half to even.

Scales and zeros are stored in the plan's activation dtype (``act_dtype``). The scale is rounded
to that dtype *before* the codes are computed, so the stored scale is exactly the one the codes
were made with and w' = q * s (or (q - z) * s) holds with the stored numbers; in fp32 plans this
is the unrounded scale. All arithmetic is float32. Zeros are stored as floats: a GPTQ checkpoint's
zeros, repacked into this layout, run 1..16 (``llamagraph.runtime.quant_checkpoints``).

Packed int4 storage: [N, K / 2] uint8, two codes to a byte along K, the even column in the low
nibble (``llamagraph.ir.dtypes``: "low nibble first").

Code order on the device (``Quant.code_order``, int8 and int4 codes alike): None stores the (packed)
rows one after another.
"tile16" stores each block of 16 consecutive rows chunk-major: 16-byte chunk c of row 16 i + r sits
at byte 16 i B + (16 c + r) 16 of the weight's B bytes a row, so the 16 rows' chunk c are 256
contiguous bytes (``order_codes``). The logical array, which the reference backend and the loaders
hold, is always the row-major one; the CUDA executor orders it as it uploads it.
"""

from __future__ import annotations

import numpy as np

from .dtypes import to_float32, to_storage

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
CODE_ORDERS = ("tile16",)  # besides None (rows in order)
TILE_ROWS = 16  # rows of a "tile16" block: the decode GEMV's 16-column output tile
CHUNK = 16  # bytes of one chunk: one lane's 16-byte load


def _f32(xp, x):
    return xp.asarray(x, dtype=xp.float32)


def _rounded(s, act_dtype: str, xp):
    """float32 scales rounded to ``act_dtype`` and back (the numbers that will be stored)."""
    return to_float32(to_storage(s, act_dtype, xp), act_dtype, xp)


def _nonzero(s, xp):
    """A zero range gets s = 1 (and so does a scale the activation dtype rounds to zero)."""
    return xp.where(s == 0, xp.float32(1.0), s).astype(xp.float32)


def quantize_int8(w, act_dtype: str = "float32", xp=np):
    """w: [N, K] float -> (q int8 [N, K], s float32 [N] already rounded to ``act_dtype``)."""
    w = _f32(xp, w)
    s = xp.max(xp.abs(w), axis=1) / xp.float32(127.0)  # s: [N]
    s = _nonzero(_rounded(_nonzero(s, xp), act_dtype, xp), xp)
    q = xp.clip(xp.rint(w / s[:, None]), -127, 127).astype(xp.int8)
    return q, s


def quantize_int4(w, group_size: int, act_dtype: str = "float32", xp=np):
    """w: [N, K] float -> (q uint8 [N, K] codes 0..15 (unpacked), s float32 [N, K/G], z float32 [N, K/G]).

    s is already rounded to ``act_dtype``; z holds whole numbers 0..15."""
    w = _f32(xp, w)
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"K={K} is not divisible by group_size {group_size}")
    g = w.reshape(N, K // group_size, group_size)  # g: [N, groups, G]
    mn, mx = xp.min(g, axis=2), xp.max(g, axis=2)
    s = (mx - mn) / xp.float32(15.0)
    s = _nonzero(_rounded(_nonzero(s, xp), act_dtype, xp), xp)
    z = xp.clip(xp.rint(-mn / s), 0, 15).astype(xp.float32)
    q = xp.clip(xp.rint(g / s[:, :, None]) + z[:, :, None], 0, 15).astype(xp.uint8)
    return q.reshape(N, K), s, z


def pack_int4(q, xp=np):
    """codes [N, K] (0..15) -> [N, K/2] uint8, column 2j in the low nibble, 2j+1 in the high."""
    q = xp.asarray(q).astype(xp.uint8)
    if q.shape[-1] % 2:
        raise ValueError(f"packed int4 needs an even number of columns, got {q.shape[-1]}")
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed, xp=np):
    """[N, K/2] uint8 -> codes [N, K] uint8 (inverse of ``pack_int4``)."""
    p = xp.asarray(packed).astype(xp.uint8)
    out = xp.empty(p.shape[:-1] + (2 * p.shape[-1],), dtype=xp.uint8)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


def quantize(w, scheme: str, group_size: int | None, act_dtype: str, xp=np):
    """A float weight [N, K] -> its stored arrays (codes, scales, zeros or None): codes int8 [N, K]
    or packed uint8 [N, K/2]; scales (and zeros) in ``act_dtype`` storage."""
    if scheme == "int8":
        q, s = quantize_int8(w, act_dtype, xp)
        return q, to_storage(s, act_dtype, xp), None
    if scheme == "int4":
        q, s, z = quantize_int4(w, group_size, act_dtype, xp)
        return pack_int4(q, xp), to_storage(s, act_dtype, xp), to_storage(z, act_dtype, xp)
    raise ValueError(f"unknown quantization scheme {scheme!r}; schemes are {', '.join(SCHEMES)}")


def dequantize(codes, scales, zeros, scheme: str, group_size: int | None, xp=np):
    """w' float32 [N, K] from stored arrays; ``scales``/``zeros`` as float32 (already widened)."""
    s = _f32(xp, scales)
    if scheme == "int8":
        return xp.asarray(codes).astype(xp.float32) * s[:, None]
    if scheme == "int4":
        q = unpack_int4(codes, xp).astype(xp.float32)
        N, K = q.shape
        z = _f32(xp, zeros)
        g = (q.reshape(N, K // group_size, group_size) - z[:, :, None]) * s[:, :, None]
        return g.reshape(N, K)
    raise ValueError(f"unknown quantization scheme {scheme!r}; schemes are {', '.join(SCHEMES)}")


def _check_order(codes, code_order: str) -> tuple[int, int]:
    if code_order not in CODE_ORDERS:
        raise ValueError(f"unknown code order {code_order!r}; orders are None, {', '.join(CODE_ORDERS)}")
    N, B = codes.shape
    if N % TILE_ROWS or B % CHUNK:
        raise ValueError(f"code order {code_order!r} needs rows % {TILE_ROWS} == 0 and bytes a row % {CHUNK} == 0, "
                         f"got codes [{N}, {B}]")
    return N, B


def order_codes(codes, code_order: str | None, xp=np):
    """Row-major codes [N, B] (bytes a row) -> the same bytes in ``code_order`` (see the module
    doc), as an [N, B] array; None returns ``codes``."""
    if code_order is None:
        return codes
    N, B = _check_order(codes, code_order)
    # codes[16 i + r, 16 c + b] -> stored[i, c, r, b]
    blocks = codes.reshape(N // TILE_ROWS, TILE_ROWS, B // CHUNK, CHUNK).transpose(0, 2, 1, 3)
    return xp.ascontiguousarray(blocks).reshape(N, B)


def unorder_codes(stored, code_order: str | None, xp=np):
    """The inverse of ``order_codes``."""
    if code_order is None:
        return stored
    N, B = _check_order(stored, code_order)
    blocks = stored.reshape(N // TILE_ROWS, B // CHUNK, TILE_ROWS, CHUNK).transpose(0, 2, 1, 3)
    return xp.ascontiguousarray(blocks).reshape(N, B)
