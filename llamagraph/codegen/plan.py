"""Attach generated kernels to every node of a planned graph.

``plan_kernels(graph)`` decides, for each node, which specialised kernels it launches: the
decode path (GEMV, split-KV attention: what a captured decode step runs) and the prefill
path (tiled attention; large GEMMs go to cuBLAS outside capture, with element-wise
epilogues). The same list feeds ``llamagraph compile`` (written CUDA source) and the runtime,
so the source a user reads is the source that runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamagraph.ir import Graph, Node

from . import attention, dense
from .render import Kernel, module_source

LINEAR_OPS = ("qkv_gemm", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "gate_up_silu")
ELEMENTWISE_OPS = ("bias_add", "residual", "silu", "mul", "silu_mul")
ROPE_MODES = {"rope_kv_append": "fused", "rope": "rope", "kv_append": "append"}


@dataclass
class NodeKernels:
    """The kernels one node may launch, by role ("main", "split", "combine", "prefill", ...)."""

    index: int
    node: Node
    kernels: dict[str, Kernel] = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # constants the launcher needs (dims, epilogue, ...)


def row_tile(graph: Graph) -> int:
    """Rows per GEMV pass: a decode step has at most max_batch rows."""
    return max(1, min(16, graph.meta["max_batch"]))


def plan_kernels(graph: Graph) -> list[NodeKernels]:
    dtype = graph.meta["dtype"]
    max_seq = graph.meta["max_seq"]
    rt = row_tile(graph)
    out = []
    for i, node in enumerate(graph.nodes):
        ins = [graph.values[n] for n in node.inputs]
        outs = [graph.values[n] for n in node.outputs]
        nk = NodeKernels(i, node)
        op = node.op
        if op == "embedding":
            D = outs[0].shape[1]
            nk.kernels["main"] = dense.embedding(dtype, D)
            nk.params = dict(D=D)
        elif op in ("rmsnorm", "add_rmsnorm"):
            D = outs[-1].shape[1]
            has_res = op == "add_rmsnorm"
            nk.kernels["main"] = dense.add_rmsnorm(dtype, D, node.attrs["eps"], has_res, has_res and len(ins) == 4)
            nk.params = dict(D=D)
        elif op in LINEAR_OPS:
            N, K = ins[1].shape
            epilogue = "silu_mul" if op == "gate_up_silu" else "none"
            has_bias = len(ins) == 3
            out_dtype = outs[0].dtype
            nk.kernels["main"] = dense.gemv(dtype, N, K, rt, epilogue, has_bias, out_dtype)
            # prefill: cuBLAS writes the raw GEMM, these kernels apply the epilogue
            if has_bias:
                nk.kernels["bias"] = dense.elementwise("bias_add", out_dtype if epilogue == "none" else dtype, N)
            if epilogue == "silu_mul":
                nk.kernels["silu_halves"] = dense.elementwise("silu_mul_halves", dtype, N // 2)
            nk.params = dict(N=N, K=K, epilogue=epilogue, has_bias=has_bias, out_dtype=out_dtype, row_tile=rt)
        elif op in ROPE_MODES:
            a = node.attrs
            nk.kernels["main"] = attention.rope_kv_append(
                dtype, a["num_heads"], a["num_kv_heads"], a["head_dim"], a["layout"], max_seq, ROPE_MODES[op],
                a.get("scaling"), a["theta"],
            )
            nk.params = dict(H=a["num_heads"], KV=a["num_kv_heads"], D=a["head_dim"], mode=ROPE_MODES[op])
        elif op == "sdpa":
            a = node.attrs
            H, KV, D = a["num_heads"], a["num_kv_heads"], a["head_dim"]
            qstride = ins[0].shape[1] * ins[0].shape[2]  # q: [T, Hq, D]; Hq is H or H+2KV
            split, combine = attention.attention_decode(dtype, H, KV, D, qstride, max_seq)
            prefill = attention.attention_prefill(dtype, H, KV, D, qstride, max_seq)
            nk.kernels.update(split=split, combine=combine, prefill=prefill)
            nk.params = dict(H=H, KV=KV, D=D, qstride=qstride)
        elif op == "gather_last":
            D = outs[0].shape[1]
            nk.kernels["main"] = dense.gather_rows(dtype, D)
            nk.params = dict(D=D)
        elif op == "topk_sample":
            V = ins[0].shape[1]
            nk.kernels["main"] = attention.sample(V)
            nk.params = dict(V=V)
        elif op in ELEMENTWISE_OPS:
            D = outs[0].shape[1]
            nk.kernels["main"] = dense.elementwise(op, dtype, D)
            nk.params = dict(D=D)
        else:
            raise NotImplementedError(f"no CUDA kernel for op {op!r}")
        out.append(nk)
    return out


def plan_source(graph: Graph) -> str:
    """The whole plan's CUDA source: the prelude and each distinct kernel once."""
    return module_source([k for nk in plan_kernels(graph) for k in nk.kernels.values()])


def decode_launches(graph: Graph) -> int:
    """Kernel launches in one decode step (split-KV attention launches two kernels)."""
    return sum(2 if n.op == "sdpa" else 1 for n in graph.nodes)
