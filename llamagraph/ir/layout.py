"""Weight row layouts: how a weight value's rows are assembled from its checkpoint parts.

A weight value lists its checkpoint tensors in ``attrs["parts"]`` (stacked along axis 0). A value
may also carry ``attrs["row_order"]``, a named permutation of those stacked rows that a kernel
wants; every loader assembles a weight through ``assemble`` so they all agree.

``["rope_pairs", heads, head_dim, layout]``: inside each head, every 16 rows hold 8 rotary pairs,
rows 0-7 the pairs' first elements and rows 8-15 their second elements, so one tensor-core tile
of the GEMV holds both halves of each pair and its epilogue can rotate them in registers. Pair p
of a head is (p, p + head_dim/2) for rotate_half and (2p, 2p + 1) for interleaved.
"""

from __future__ import annotations

import numpy as np

from .graph import array_module

ROW_ORDERS = ("rope_pairs",)


def rope_pair_order(heads: int, head_dim: int, layout: str) -> np.ndarray:
    """int64 [heads * head_dim]: row j of the permuted weight is row ``order[j]`` of the stacked one."""
    if head_dim % 16:
        raise ValueError(f"the rope pair order needs head_dim to be a multiple of 16, got {head_dim}")
    if layout not in ("rotate_half", "interleaved"):
        raise ValueError(f"unknown rope layout {layout!r}")
    p = np.arange(head_dim // 2).reshape(-1, 8)  # p: [head_dim/16, 8] pairs, one row per 16-row tile
    first, second = (2 * p, 2 * p + 1) if layout == "interleaved" else (p, p + head_dim // 2)
    within = np.concatenate([first, second], axis=1).reshape(-1)  # [head_dim]
    return (np.arange(heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def row_order(attrs: dict) -> np.ndarray | None:
    """The permutation a weight value's ``row_order`` attribute names, or None."""
    spec = attrs.get("row_order")
    if spec is None:
        return None
    kind, *args = spec
    if kind != "rope_pairs":
        raise ValueError(f"unknown row_order {kind!r}; known: {ROW_ORDERS}")
    return rope_pair_order(*args)


def assemble(attrs: dict, parts: list[np.ndarray], shard=None, rank: int = 0) -> np.ndarray:
    """A weight value's array from its parts' arrays (in ``attrs["parts"]`` order); for a sharded
    value (``Value.shard``, an ``ir.graph.Shard``) rank ``rank``'s slice of each part, then stacked."""
    if shard is not None:
        parts = [shard.take(i, p, rank) for i, p in enumerate(parts)]
    xp = array_module(parts[0])  # numpy, or cupy where the GPU draws random weights
    arr = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=0)
    order = row_order(attrs)
    # (a row-parallel slice of one part is a strided view: executors take contiguous arrays)
    return xp.ascontiguousarray(arr if order is None else arr[xp.asarray(order)])


def stacked_row(attrs: dict, row: int) -> int:
    """The row of the stacked parts that row ``row`` of the assembled weight came from."""
    order = row_order(attrs)
    return row if order is None else int(order[row])
