"""Quantize the linear weights: a pass over value layouts, not over ops.

    # @l0.qkv.w: f16[N, K]  ->  @l0.qkv.w: i4[N, K] {quant: int4, group 128}
    #                           @l0.qkv.w.scales: f16[N, K/128], @l0.qkv.w.zeros: f16[N, K/128]

It reads ``graph.meta["quantize"]`` (``{"scheme": "int8" | "int4", "group_size": G}``, set by the
compiler; G = -1 is one group per row; ``"lm_head": false`` keeps the LM head as it is, as
GPTQ / AWQ checkpoints do; absent: the pass changes nothing). Every weight with the "matrix" role is quantized:
each decoder layer's fused QKV, O, fused gate/up and down, and the LM head unless it is tied to
the embedding (then it is the "embedding_table" value, which stays in the activation dtype).

Ops and nodes are untouched: a node reads the same value, whose layout now says how its bytes
are to be read (``Value.quant``). The scales and zeros are weight values of their own, named
``<weight>.scales`` / ``<weight>.zeros``, with ``quant_of`` naming the weight they belong to:
the loader fills them when it quantizes (or repacks) that weight. Their rows follow the weight's
row order (``row_order``): quantizing rows commutes with permuting them.

It runs after the fusions (so the fused weights are quantized whole) and DCE (which keeps values
a node reads; scales and zeros are read through the weight's layout). In a tensor-parallel rank
graph a weight's shape is one rank's slice, so each rank quantizes its own slice: int4 groups
never cross a slice, and int8's row scales are over the slice's K (a row-parallel weight's scales
differ from the one-GPU plan's).
"""

from __future__ import annotations

from llamagraph.ir import WEIGHT, Graph, Quant
from llamagraph.ir.errors import ConfigError

# How each scheme's codes are stored on the device in 16-bit plans (``Quant.code_order``): None, rows in
# order (the measured default); "tile16", each 16-row block chunk-major (a decode GEMV warp's load then takes
# four whole 128-byte lines, not eight half lines: a step of 4 lanes reads 64 bytes of a row, int8 or int4).
# Not a default until measured (tools/tuning_ab.py ct16); ``graph.meta["quantize"]["code_order"]`` overrides
# it. fp32 plans (CUDA-core GEMVs) keep rows in order.
CODE_ORDER: dict[str, str | None] = {"int8": None, "int4": None}


def _code_order(spec: dict, scheme: str, act: str, N: int, K: int) -> str | None:
    """The device order of a weight's codes: the spec's or ``CODE_ORDER``'s, where the 16-bit GEMVs
    read it (N % 32: the gate/up GEMV's up rows start at N / 2, which must begin a 16-row block too;
    K % 32: whole 16-byte chunks of int8 or int4 codes a row)."""
    if act == "float32" or N % 32 or K % 32:
        return None
    return spec.get("code_order", CODE_ORDER[scheme])


def quantized_weights(graph: Graph) -> list[str]:
    """The weights the pass quantizes: every 2-D weight with the "matrix" role."""
    return [v.name for v in graph.values.values() if v.kind == WEIGHT and v.role == "matrix" and len(v.shape) == 2]


def quantize_weights(graph: Graph) -> Graph:
    spec = graph.meta.get("quantize")
    out = graph.copy()
    if not spec:
        return out
    scheme = spec["scheme"]
    for name in quantized_weights(out):
        v = out.values[name]
        if v.quant is not None or (v.layer is None and not spec.get("lm_head", True)):
            continue
        N, K = v.shape
        act = v.dtype
        common = dict(layer=v.layer, quant_of=name)  # rows in the weight's row order, as assembled
        if scheme == "int8":
            scales = out.add_value(name + ".scales", (N,), act, WEIGHT, role="scales", **common)
            v.quant = Quant("int8", scales, code_order=_code_order(spec, "int8", act, N, K))
            v.dtype = "int8"
        else:
            group_size = K if spec["group_size"] == -1 else spec["group_size"]  # -1: one group per row
            if K % group_size:
                # (a row-parallel weight of a tp plan: K is one rank's slice, and its groups stay inside it)
                sliced = f" (each of {v.shard.ranks} ranks' slice)" if v.shard is not None and v.shard.axis == 1 else ""
                raise ConfigError(f"int4 group_size {group_size} does not divide K={K}{sliced} of weight '{name}' "
                                  f"[{N}, {K}]; choose a group size that divides {K}")
            G = K // group_size
            scales = out.add_value(name + ".scales", (N, G), act, WEIGHT, role="scales", **common)
            zeros = out.add_value(name + ".zeros", (N, G), act, WEIGHT, role="zeros", **common)
            v.quant = Quant("int4", scales, group_size, zeros, _code_order(spec, "int4", act, N, K))
            v.dtype = "int4"
    return out
