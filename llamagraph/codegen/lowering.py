"""One lowering per op: a planned node -> the kernels it needs and its launches in each phase.

A lowering is a function registered with ``@lowering("op", ...)``. It reads everything from
the node and its values (dtypes, shapes, attributes; never the graph's metadata) and returns a
``Lowered``: the kernels (rendered from ``templates/``), the launches of the decode phase (a
step of one token per sequence, captured into a CUDA graph per batch size) and of the prefill
phase (any other step), and the workspaces those launches use. Launches are data
(``llamagraph.codegen.launch``): the executor evaluates them and knows nothing of ops.

``lower_graph`` runs every node's lowering and collects one kernel list, one launch list per
phase and one workspace list for the plan.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

from llamagraph.ir import Graph, Node, Value
from llamagraph.ir.dtypes import itemsize
from llamagraph.ir.errors import PlanError

from . import attention, dense, sample
from .launch import ADVANCE, DECODE_GREEDY, NO_PEER_ACCESS, NULL, Cond, Launch, Shape, Workspace, const, step, value, wants, workspace
from .render import Kernel

PHASES = ("decode", "prefill")


class LoweringError(PlanError):
    """A node cannot be lowered to CUDA (an op or value layout with no kernel yet)."""


@dataclass
class Lowered:
    kernels: list[Kernel]
    decode: list[Launch]
    prefill: list[Launch]
    workspaces: list[Workspace] = field(default_factory=list)
    greedy: list[Launch] | None = None  # its launches in the decode_greedy phase (None: those of decode)


@dataclass
class Ctx:
    """What a lowering may read: the node's graph (for its values and dims)."""

    graph: Graph
    node: Node

    def v(self, name: str) -> Value:
        return self.graph.values[name]

    def dtype(self, name: str) -> str:
        return self.graph.values[name].dtype

    def rows(self, name: str) -> str:
        """The step scalar counting the rows of a [rows, ...] value: "T" or "B"."""
        d = self.graph.values[name].shape[0]
        if d not in ("T", "B"):
            raise LoweringError(f"value %{name} has {d} rows; a kernel's rows are T (tokens) or B (sequences)")
        return d

    @property
    def row_tile(self) -> int:
        """GEMV rows per pass: a decode step has at most B (max_batch) rows."""
        return max(1, min(dense.MAX_ROW_TILE, self.graph.dims["B"]))


Lowering = Callable[[Node, Ctx], Lowered]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*ops: str) -> Callable[[Lowering], Lowering]:
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"op {op!r} already has a lowering ({LOWERINGS[op].__name__})")
            LOWERINGS[op] = fn
        return fn

    return register


def run(k: Kernel, shape: Shape, *args) -> Launch:
    return Launch(k.name, shape, tuple(args))


def same_in_both(kernels: list[Kernel], launches: list[Launch], workspaces=()) -> Lowered:
    return Lowered(kernels, list(launches), list(launches), list(workspaces))


def _float_only(c: Ctx, *names: str) -> None:
    for name in names:
        v = c.v(name)  # (a sharded value is an ordinary one here: the rank graph's shape is the rank's slice)
        if v.quant is not None:
            raise LoweringError(f"{c.node.op} '{c.node.name}': %{name} is quantized ({v.quant.scheme}); no kernel "
                                "reads that layout yet")


def _weight_layout(c: Ctx, w: str) -> dense.GemvQuant | None:
    """How the GEMV reads the linear weight %w: None for float codes, else its quantization
    (``Value.quant``), checked against what the kernels can read (one-line error naming w, G, K)."""
    v = c.v(w)  # a sharded weight is an ordinary one here: the rank graph's shape is the rank's slice
    if v.quant is None:
        return None
    q = dense.GemvQuant(v.quant.scheme, v.quant.group_size if v.quant.scheme == "int4" else None, v.quant.code_order)
    try:
        q.check(v.shape[1])
    except ValueError as e:
        raise LoweringError(f"{c.node.op} '{c.node.name}': %{w} is {e}") from None
    return q


def _weight_args(c: Ctx, w: str) -> list:
    """A quantized weight's extra kernel args after W: its scales and zeros (NULL for int8)."""
    q = c.v(w).quant
    return [value(q.scales), value(q.zeros) if q.zeros else NULL]


DEQUANT_SCRATCH = "dequant_scratch"  # prefill: w' of a quantized weight in the activation dtype, for cuBLAS


def _dequantize(c: Ctx, w: str, quant: dense.GemvQuant, dt: str, when: tuple) -> tuple[Kernel, Launch, Workspace]:
    """Prefill: a launch writing w' of the quantized %w as dt into the shared dequant scratch (one
    workspace for the plan, as large as its largest quantized weight; each GEMM refills it first)."""
    N, K = c.v(w).shape
    k = dense.dequant(dt, N, K, quant)
    launch = replace(run(k, dense.dequant_launch(N, K), value(w), *_weight_args(c, w), workspace(DEQUANT_SCRATCH)),
                     when=when)
    return k, launch, Workspace(DEQUANT_SCRATCH, N * K * itemsize(dt))


# ---------------------------------------------------------------------------------------------
# rows in, rows out
# ---------------------------------------------------------------------------------------------

def _gather(table: str, index: str, out: str, c: Ctx) -> Lowered:
    dt, D, rows = c.dtype(out), c.v(out).shape[1], c.rows(out)
    k = dense.gather_rows(dt, D)
    return same_in_both([k], [replace(run(k, dense.gather_rows_launch(dt, D, rows), value(table), value(index),
                                          value(out), step(rows)), early=True)])


@lowering("embedding")
def lower_embedding(n: Node, c: Ctx) -> Lowered:
    tokens, table = n.inputs  # x: [T, D] = table[tokens]
    _float_only(c, table)
    return _gather(table, tokens, n.outputs[0], c)


# ---------------------------------------------------------------------------------------------
# collectives (tensor parallelism): launches of kind "collective", which the executor hands to NCCL
# on the rank's communicator and stream (captured into the decode graph like a kernel)
# ---------------------------------------------------------------------------------------------

@lowering("all_reduce")
def lower_all_reduce(n: Node, c: Ctx) -> Lowered:
    (x,), (out,) = n.inputs, n.outputs  # out: [rows, D] = sum over ranks of x (in place when planned so)
    dt, D, rows = c.dtype(out), c.v(out).shape[1], c.rows(out)
    # args: send, receive, rows, elements per row, dtype: NCCL sums rows * D elements
    return same_in_both([], [Launch("allreduce", None, (value(x), value(out), step(rows), const(D), const(dt)),
                                    kind="collective")])


PEER_ROWS = 64  # most rows the peer all-reduce takes (the mailbox holds that many); NCCL takes more
PEER_MAILBOX, PEER_TABLE = "tp.mailbox", "tp.peers"


@lowering("all_reduce_residual")
def lower_all_reduce_residual(n: Node, c: Ctx) -> Lowered:
    y, r, *bias = n.inputs  # y: [rows, D] this rank's partial sums, r: [rows, D] the residual stream
    (out,) = n.outputs
    dt, D, rows = c.dtype(out), c.v(out).shape[1], c.rows(out)
    cap_rows = min(PEER_ROWS, c.graph.dims[rows])
    mailbox = dense.PeerMailbox(n.attrs["ranks"], cap_rows * D, dt)
    k = dense.allreduce_residual(dt, D, mailbox)
    spaces = [Workspace(PEER_MAILBOX, mailbox.nbytes, fill="peer_mailbox"),
              Workspace(PEER_TABLE, 8 * (1 + mailbox.ranks), fill="peer_table", source=PEER_MAILBOX)]
    b = value(bias[0]) if bias else NULL
    shape = dense.allreduce_residual_launch()
    # the decode rows, and prompts of up to cap_rows tokens: one kernel over peer memory
    peer = Launch(k.name, shape, (value(y), value(r), b, value(out), step(rows), workspace(PEER_TABLE), const(0)),
                  kind="peer_kernel", when=(Cond(NO_PEER_ACCESS, "<=", 0), Cond(rows, "<=", cap_rows)), early=True)
    # no peer access, or more rows: NCCL sums the partials in place, then the kernel adds them (local)
    nccl = [Launch("allreduce", None, (value(y), value(y), step(rows), const(D), const(dt)), kind="collective"),
            run(k, shape, value(y), value(r), b, value(out), step(rows), NULL, const(1))]
    alternatives = [peer]
    for when in [(Cond(NO_PEER_ACCESS, ">", 0),), (Cond(NO_PEER_ACCESS, "<=", 0), Cond(rows, ">", cap_rows))]:
        alternatives += [replace(launch, when=when) for launch in nccl]
    return same_in_both([k], alternatives, spaces)


@lowering("all_gather_vocab")
def lower_all_gather_vocab(n: Node, c: Ctx) -> Lowered:
    (local,), (out,) = n.inputs, n.outputs  # local: [B, chunk] fp32 -> out: [B, V] fp32
    ranks, vocab = n.attrs["ranks"], n.attrs["vocab"]
    chunk, rows = c.v(local).shape[1], c.rows(out)
    ws = Workspace(f"{n.name}.chunks", ranks * c.graph.dims[rows] * chunk * 4)  # [ranks, rows, chunk] fp32
    k = dense.vocab_concat(ranks, chunk, vocab)
    # args: send, receive, rows, elements per row and rank, dtype: every rank's rows * chunk elements, rank-major
    gather = Launch("allgather", None, (value(local), workspace(ws.name), step(rows), const(chunk), const("float32")),
                    kind="collective")
    low = same_in_both([k], [gather, run(k, dense.vocab_concat_launch(vocab, rows), workspace(ws.name), value(out),
                                         step(rows))], [ws])
    # decode_greedy (a step that needs only greedy tokens): no logits are gathered; each rank finds
    # its chunk's candidates and only those are (the sampler's lowering picks the token from them)
    part = sample.vocab_argmax_partial(chunk)
    mine, every = _argmax_pairs(n.name, ranks, c.graph.dims[rows])
    width = 2 * sample.ARGMAX_SLICES  # floats per row: (value, index) per slice
    low.kernels.append(part)
    low.workspaces += [mine, every]
    low.greedy = [replace(run(part, sample.vocab_argmax_partial_launch(rows), value(local), workspace(mine.name),
                              step(rows)), early=True),
                  Launch("allgather", None, (workspace(mine.name), workspace(every.name), step(rows), const(width),
                                             const("float32")), kind="collective")]
    return low


def _argmax_pairs(gather_node: str, ranks: int, rows: int) -> tuple[Workspace, Workspace]:
    """A rank's greedy candidates [rows, slices] float2, and every rank's [ranks, rows, slices]."""
    one = rows * sample.ARGMAX_SLICES * 8
    return Workspace(f"{gather_node}.argmax", one), Workspace(f"{gather_node}.argmax_all", ranks * one)


@lowering("gather_last")
def lower_gather_last(n: Node, c: Ctx) -> Lowered:
    x, last_index = n.inputs  # last: [B, D] = x[last_index]
    return _gather(x, last_index, n.outputs[0], c)


@lowering("rmsnorm")
def lower_rmsnorm(n: Node, c: Ctx) -> Lowered:
    x, w = n.inputs
    (out,) = n.outputs
    dt, D, rows = c.dtype(out), c.v(out).shape[1], c.rows(out)
    k = dense.add_rmsnorm(dt, D, n.attrs["eps"], has_residual=False)
    return same_in_both([k], [run(k, dense.add_rmsnorm_launch(dt, D, rows), value(x), NULL, NULL, value(w), NULL,
                                  value(out), step(rows))])


@lowering("add_rmsnorm")
def lower_add_rmsnorm(n: Node, c: Ctx) -> Lowered:
    y, r, w, *bias = n.inputs  # (sum, normed) = (y + bias + r, rmsnorm of it)
    total, normed = n.outputs
    dt, D, rows = c.dtype(normed), c.v(normed).shape[1], c.rows(normed)
    k = dense.add_rmsnorm(dt, D, n.attrs["eps"], has_residual=True, has_bias=bool(bias))
    return same_in_both([k], [run(k, dense.add_rmsnorm_launch(dt, D, rows), value(y), value(r),
                                  value(bias[0]) if bias else NULL, value(w), value(total), value(normed), step(rows))])


# ---------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------

GEMM_SCRATCH = "gemm_scratch"  # prefill: cuBLAS output before an epilogue kernel
NORM_SCRATCH = "norm_scratch"  # prefill: the normed rows a prologue-fused GEMM reads through cuBLAS
# prefill epilogues after a cuBLAS GEMM: kernel tag -> (C expression, how b is read); see dense.elementwise
PREFILL_EPILOGUES = {"bias_row": ("a + b", "row"), "silu_mul_halves": ("silu(a) * b", "halves"),
                     "residual": ("a + b", "full")}


@dataclass
class Gemv:
    """One GEMM node in GEMV terms: what the decode kernel fuses and what prefill does instead."""

    x: str  # input rows [rows, K]
    w: str  # weight [N, K]
    out: str
    bias: str | None = None
    norm: tuple[str, float] | None = None  # rmsnorm prologue: (norm weight, eps)
    epilogue: str = "none"  # see dense.gemv
    res: str | None = None  # residual epilogue: the stream added to
    rope: tuple | None = None  # rope epilogue: (RopeEpilogue, positions, seq_ids, seq_lens, kc, vc)


def _gemv(g: Gemv, c: Ctx) -> Lowered:
    """Decode: the tensor-core GEMV with its prologue and epilogue (W read once per row tile).

    Prefill: up to two row tiles the same GEMV still wins; past that the work is split up again:
    a norm kernel writes the normed rows to scratch, cuBLAS writes the plain GEMM (into scratch
    when an epilogue follows), and element-wise kernels (or the rope kernel) apply the rest.

    A quantized W: the GEMV dequantizes it in registers (its scales and zeros follow W in the
    args); the cuBLAS path first dequantizes it into the shared scratch and multiplies that.
    """
    if g.bias:
        _float_only(c, g.bias)
    quant = _weight_layout(c, g.w)
    dt, out_dt, rows, rt = c.dtype(g.x), c.dtype(g.out), c.rows(g.out), c.row_tile
    N, K = c.v(g.w).shape
    T_max = c.graph.dims["T"]
    ropespec = g.rope[0] if g.rope else None
    prologue = "rmsnorm" if g.norm else "none"
    eps = g.norm[1] if g.norm else 0.0
    # a quantized residual GEMV reads its residual rows before its PDL wait: the stream it adds to was
    # last written two launches back or earlier (CompiledPlan.check proves it of every phase)
    res_early = bool(g.res) and quant is not None and dt != "float32"
    gemv = dense.gemv(dt, N, K, rt, g.epilogue, bool(g.bias), out_dt, prologue=prologue, eps=eps, rope=ropespec,
                      quant=quant, res_early=res_early)
    b_arg = value(g.bias) if g.bias else NULL
    w_args = [value(g.w)] + (_weight_args(c, g.w) if quant else [])
    args = [value(g.x), *w_args, b_arg, value(g.out), step(rows)]
    if g.norm:
        args.append(value(g.norm[0]))
    res_index = len(args)
    if g.res:
        args.append(value(g.res))
    workspaces: list[Workspace] = []
    if g.rope:
        spec, pos, sid, lens, kc, vc = g.rope
        table = _inv_freq({"head_dim": spec.HD, "theta": spec.theta, "scaling": spec.scaling})
        workspaces.append(table)
        args += [value(pos), value(sid), value(lens), workspace(table.name), value(kc), value(vc)]
    decode = replace(run(gemv, dense.gemv_launch(dt, N, K, rt, g.epilogue, prologue=prologue, quant=quant,
                                                            has_bias=bool(g.bias)), *args),
                     early=True, reads_early=(res_index,) if res_early else ())

    small, large = (Cond(rows, "<=", 2 * rt),), (Cond(rows, ">", 2 * rt),)
    kernels, prefill = [gemv], [replace(decode, when=small)]

    def later(k: Kernel, *launch_args, shape) -> None:
        kernels.append(k)
        prefill.append(replace(run(k, shape, *launch_args), when=large))

    x_arg = value(g.x)
    if g.norm:  # the normed rows, as the rmsnorm op would store them
        k = dense.add_rmsnorm(dt, K, eps, has_residual=False)
        later(k, x_arg, NULL, NULL, value(g.norm[0]), NULL, workspace(NORM_SCRATCH), step(rows),
              shape=dense.add_rmsnorm_launch(dt, K, rows))
        workspaces.append(Workspace(NORM_SCRATCH, T_max * K * itemsize(dt)))
        x_arg = workspace(NORM_SCRATCH)
    direct = g.epilogue == "none"
    target = value(g.out) if direct else workspace(GEMM_SCRATCH)
    gemm_dt = out_dt if direct else dt
    w_arg = value(g.w)
    if quant:
        k, launch, ws = _dequantize(c, g.w, quant, dt, large)
        kernels.append(k)
        prefill.append(launch)
        workspaces.append(ws)
        w_arg = workspace(DEQUANT_SCRATCH)
    # cuBLAS is not in `kernels`: the executor calls it by kind
    prefill.append(Launch("gemm", None, (x_arg, w_arg, target, step(rows), const(N), const(K), const(dt),
                                         const(gemm_dt)), kind="library", when=large))
    if not direct:
        workspaces.append(Workspace(GEMM_SCRATCH, T_max * N * itemsize(dt)))
    if g.bias:
        k = dense.elementwise("bias_row", *PREFILL_EPILOGUES["bias_row"], gemm_dt, N)
        later(k, target, b_arg, target, step(rows), shape=dense.elementwise_launch(gemm_dt, N, rows))
    if g.epilogue == "silu_mul":
        k = dense.elementwise("silu_mul_halves", *PREFILL_EPILOGUES["silu_mul_halves"], dt, N // 2)
        later(k, target, NULL, value(g.out), step(rows), shape=dense.elementwise_launch(dt, N // 2, rows))
    elif g.epilogue == "residual":
        k = dense.elementwise("residual", *PREFILL_EPILOGUES["residual"], dt, N)
        later(k, target, value(g.res), value(g.out), step(rows), shape=dense.elementwise_launch(dt, N, rows))
    elif g.epilogue == "rope":
        spec, pos, sid, lens, kc, vc = g.rope
        k = attention.rope_kv_append(dt, spec.H, spec.KV, spec.HD, spec.layout, spec.max_seq, "fused", spec.scaling,
                                     spec.theta, src_pairs=True)
        later(k, target, value(pos), value(sid), value(lens), workspace(workspaces[0].name), value(g.out), value(kc),
              value(vc), step("T"), shape=attention.rope_kv_append_launch("T", spec.H, spec.KV, spec.HD, "fused"))
    return Lowered(kernels, [decode], prefill, workspaces)


@lowering("qkv_gemm", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
def lower_gemm(n: Node, c: Ctx) -> Lowered:
    x, w, *bias = n.inputs
    return _gemv(Gemv(x, w, n.outputs[0], bias[0] if bias else None), c)


@lowering("gate_up_silu")
def lower_gate_up_silu(n: Node, c: Ctx) -> Lowered:
    x, w, *bias = n.inputs
    return _gemv(Gemv(x, w, n.outputs[0], bias[0] if bias else None, epilogue="silu_mul"), c)


@lowering("linear_residual")
def lower_linear_residual(n: Node, c: Ctx) -> Lowered:
    x, w, r, *bias = n.inputs  # out = round(x W^T + b) + r, in place over r
    return _gemv(Gemv(x, w, n.outputs[0], bias[0] if bias else None, epilogue="residual", res=r), c)


@lowering("rms_gate_up_silu")
def lower_rms_gate_up_silu(n: Node, c: Ctx) -> Lowered:
    x, norm_w, w, *bias = n.inputs
    return _gemv(Gemv(x, w, n.outputs[0], bias[0] if bias else None, norm=(norm_w, n.attrs["eps"]),
                      epilogue="silu_mul"), c)


@lowering("rms_lm_head")
def lower_rms_lm_head(n: Node, c: Ctx) -> Lowered:
    x, norm_w, w = n.inputs
    return _gemv(Gemv(x, w, n.outputs[0], norm=(norm_w, n.attrs["eps"])), c)


@lowering("rms_qkv_rope_kv_append")
def lower_rms_qkv_rope_kv_append(n: Node, c: Ctx) -> Lowered:
    x, norm_w, w, pos, sid, lens, kc, vc, *bias = n.inputs
    q_rot = n.outputs[0]  # the cache outputs alias kc / vc
    a = n.attrs
    spec = dense.RopeEpilogue(a["num_heads"], a["num_kv_heads"], a["head_dim"], a.get("layout", "rotate_half"),
                              c.v(kc).shape[1], a.get("scaling"), a.get("theta", 10000.0))
    return _gemv(Gemv(x, w, q_rot, bias[0] if bias else None, norm=(norm_w, a["eps"]), epilogue="rope",
                      rope=(spec, pos, sid, lens, kc, vc)), c)


# ---------------------------------------------------------------------------------------------
# element-wise
# ---------------------------------------------------------------------------------------------

# op -> (C expression of the floats a and b, how b is read: see dense.elementwise)
ELEMENTWISE = {
    "bias_add": ("a + b", "row"),
    "residual": ("a + b", "full"),
    "silu": ("silu(a)", "none"),
    "mul": ("a * b", "full"),
    "silu_mul": ("silu(a) * b", "full"),
}


@lowering(*ELEMENTWISE)
def lower_elementwise(n: Node, c: Ctx) -> Lowered:
    expr, operand = ELEMENTWISE[n.op]
    a, *b = n.inputs
    out = n.outputs[0]
    dt, D, rows = c.dtype(out), c.v(out).shape[1], c.rows(out)
    k = dense.elementwise(n.op, expr, operand, dt, D)
    return same_in_both([k], [run(k, dense.elementwise_launch(dt, D, rows), value(a), value(b[0]) if b else NULL,
                                  value(out), step(rows))])


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

ROPE_MODES = {"rope_kv_append": "fused", "rope": "rope", "kv_append": "append"}


def _inv_freq(attrs: dict) -> Workspace:
    """The rope frequency table as a constant workspace, shared by every layer with the same rope."""
    table = attention.rope_inv_freq_table(attrs["head_dim"], attrs["theta"], attrs.get("scaling"))
    data = tuple(float(x) for x in table)
    name = f"rope_inv_freq.d{attrs['head_dim']}.{zlib.crc32(repr(data).encode()):08x}"
    return Workspace(name, 4 * len(data), fill="table", data=data)


@lowering(*ROPE_MODES)
def lower_rope(n: Node, c: Ctx) -> Lowered:
    """fused: rope_kv_append(qkv, pos, sid, lens, kc, vc) -> (q_rot, kc', vc');
    rope: rope(qkv, pos, sid, lens) -> qkv_rot; append: kv_append(qkv_rot, pos, sid, kc, vc) -> (kc', vc')."""
    mode, a = ROPE_MODES[n.op], n.attrs
    H, KV, D = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    if mode == "append":
        src, pos, sid, kc, vc = n.inputs
        lens, inv, out, ws = NULL, NULL, NULL, []
    else:
        src, pos, sid, lens_name = n.inputs[:4]
        lens, out = value(lens_name), value(n.outputs[0])
        table = _inv_freq(a)
        inv, ws = workspace(table.name), [table]
        kc, vc = n.inputs[4:6] if mode == "fused" else (None, None)
    dt = c.dtype(src)
    max_seq = c.v(kc).shape[1] if kc else 0
    k = attention.rope_kv_append(dt, H, KV, D, a.get("layout", "rotate_half"), max_seq, mode, a.get("scaling"),
                                 a.get("theta", 10000.0))
    caches = (value(kc), value(vc)) if kc else (NULL, NULL)
    launch = run(k, attention.rope_kv_append_launch("T", H, KV, D, mode), value(src), value(pos), value(sid), lens, inv,
                 out, *caches, step("T"))
    return same_in_both([k], [launch], ws)


ATTN_PARTIALS = "attn_partials"  # decode: per-split softmax partials
ATTN_COUNTERS = "attn_split_counters"  # decode: splits finished per (token, head block); zero between launches


@lowering("sdpa")
def lower_sdpa(n: Node, c: Ctx) -> Lowered:
    """Decode: split-KV attention in one kernel (the last split block of each token and head
    group merges the splits). Prefill: tiled causal attention over tiles of each sequence's
    rows, from a table the executor rebuilds from seq_ids every step."""
    q, kc, vc, pos, sid = n.inputs
    out = n.outputs[0]
    a = n.attrs
    H, KV, D, scale = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["scale"]
    dt = c.dtype(q)
    max_batch, max_seq = c.v(kc).shape[:2]
    qstride = c.v(q).shape[1] * c.v(q).shape[2]  # q: [T, Hq, D]; Hq is H or H+2KV
    fused = attention.attention_decode_fused(dt, H, KV, D, qstride, max_seq, scale=scale)
    s_split, _ = attention.attention_decode_launch("T", H, KV, D, max_seq)
    partials = Workspace(ATTN_PARTIALS, attention.attention_decode_workspace_bytes(max_batch, H, D, max_seq))
    counters = Workspace(ATTN_COUNTERS, attention.attention_decode_counter_bytes(max_batch, H, KV), fill="zeros")
    decode = [replace(run(fused, s_split, value(q), value(kc), value(vc), value(pos), value(sid),
                          workspace(partials.name), workspace(counters.name), value(out), step("T")), early=True)]
    prefill_k = attention.attention_prefill(dt, H, KV, D, qstride, max_seq, scale=scale)
    bq = attention.attention_prefill_rows(D)
    tiles = Workspace(f"seq_tiles.r{bq}", 8 * c.graph.dims["T"], fill="seq_tiles", source=sid, rows=bq)
    n_tiles = tiles.name + ".n"
    prefill = [run(prefill_k, attention.attention_prefill_launch(n_tiles, H, D), value(q), value(kc), value(vc),
                   value(pos), value(sid), workspace(tiles.name), value(out), step(n_tiles))]
    return Lowered([fused, prefill_k], decode, prefill, [partials, counters, tiles])


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

@lowering("topk_sample")
def lower_topk_sample(n: Node, c: Ctx) -> Lowered:
    logits = n.inputs[0]  # (logits, temperature, top_k, top_p, seed, step) -> (next token, its logprob)
    token, logprob = n.outputs
    k = sample.sample(c.v(logits).shape[1])
    rows = c.rows(token)
    low = same_in_both([k], [replace(run(k, sample.sample_launch(rows), *(value(i) for i in n.inputs),
                                         value(token), value(logprob), step(rows)), early=True)])
    at = c.graph.producers().get(logits)
    gather = c.graph.nodes[at] if at is not None else None
    if gather is not None and gather.op == "all_gather_vocab":  # vocabulary-parallel logits (tensor parallel)
        # decode_greedy: the token from every rank's gathered candidates, not from whole logits
        ranks, vocab = gather.attrs["ranks"], gather.attrs["vocab"]
        combine = sample.vocab_argmax_combine(ranks, c.v(gather.inputs[0]).shape[1], vocab)
        _, every = _argmax_pairs(gather.name, ranks, c.graph.dims[rows])
        low.kernels.append(combine)
        low.greedy = [replace(run(combine, sample.vocab_argmax_combine_launch(rows), workspace(every.name),
                                  value(token), value(logprob), step(rows)), early=True)]
    return low



LOGPROB_CHUNK = 128  # rows of fp32 logits the prompt logprobs hold at once: [chunk, V], not [T, V]


@lowering("token_logprobs")
def lower_token_logprobs(n: Node, c: Ctx) -> Lowered:
    """On demand (only steps that fetch the output): the final norm and the LM head over a chunk
    of rows into an fp32 workspace, then each row's log-softmax at its target. Decode (T = B rows)
    takes one chunk through the GEMV with its rmsnorm prologue; prefill walks the step's rows
    chunk by chunk (norm kernel, then cuBLAS), each chunk launched only when the step has rows there."""
    x, norm_w, w, targets = n.inputs  # x: [T, D] residual rows, norm_w: [D], w: [V, D], targets: [T]
    (out,) = n.outputs
    quant = _weight_layout(c, w)  # a quantized LM head: the GEMV reads its codes, prefill dequantizes it once
    dt, eps = c.dtype(x), n.attrs["eps"]
    V, D = c.v(w).shape
    T_max, B_max = c.graph.dims["T"], c.graph.dims["B"]
    chunk = min(LOGPROB_CHUNK, T_max)
    ws = Workspace(f"logprob_logits.v{V}", max(chunk, B_max) * V * 4)
    normed = Workspace(f"logprob_normed.d{D}", chunk * D * itemsize(dt))
    on = wants(out)
    lp = sample.token_logprobs(V)
    gemv = dense.gemv(dt, V, D, c.row_tile, "none", False, "float32", prologue="rmsnorm", eps=eps, quant=quant)
    norm = dense.add_rmsnorm(dt, D, eps, has_residual=False)
    w_args = (value(w), *(_weight_args(c, w) if quant else ()))
    decode = [Launch(gemv.name, dense.gemv_launch(dt, V, D, c.row_tile, "none", prologue="rmsnorm", quant=quant),
                     (value(x), *w_args, NULL, workspace(ws.name), step("T"), value(norm_w)), when=(on,)),
              Launch(lp.name, sample.token_logprobs_launch(B_max),
                     (workspace(ws.name), value(targets), value(out), step("T"), const(0), step("T")), when=(on,))]
    prefill, kernels, spaces = [], [gemv, norm, lp], [ws, normed]
    w_arg = value(w)
    if quant:  # once for every chunk
        k, launch, scratch = _dequantize(c, w, quant, dt, (on, Cond("T", ">", 0)))
        prefill.append(launch)
        kernels.append(k)
        spaces.append(scratch)
        w_arg = workspace(DEQUANT_SCRATCH)
    row_bytes = D * itemsize(dt)
    for row0 in range(0, T_max, chunk):
        rows = min(chunk, T_max - row0)  # rows past T are computed from stale rows and never read
        has_rows = (on, Cond("T", ">", row0))
        prefill += [Launch(norm.name, dense.add_rmsnorm_launch(dt, D, rows),
                           (value(x, row0 * row_bytes), NULL, NULL, value(norm_w), NULL, workspace(normed.name),
                            const(rows)), when=has_rows),
                    Launch("gemm", None, (workspace(normed.name), w_arg, workspace(ws.name), const(rows),
                                          const(V), const(D), const(dt), const("float32")), kind="library",
                           when=has_rows),
                    Launch(lp.name, sample.token_logprobs_launch(rows),
                           (workspace(ws.name), value(targets), value(out), const(rows), const(row0), step("T")),
                           when=has_rows)]
    return Lowered(kernels, decode, prefill, spaces)


# ---------------------------------------------------------------------------------------------
# the whole graph
# ---------------------------------------------------------------------------------------------

@dataclass
class LoweredGraph:
    kernels: list[Kernel]  # distinct, in first-use order
    phases: dict[str, list[Launch]]
    workspaces: list[Workspace]


def lower_graph(graph: Graph) -> LoweredGraph:
    kernels: dict[str, Kernel] = {}
    phases: dict[str, list[Launch]] = {p: [] for p in PHASES}
    spaces: dict[str, Workspace] = {}
    greedy: list[list[Launch]] = []
    any_greedy = False
    for i, node in enumerate(graph.nodes):
        fn = LOWERINGS.get(node.op)
        if fn is None:
            raise LoweringError(f"op {node.op!r} (node '{node.name}') has no lowering")
        low = fn(node, Ctx(graph, node))
        for k in low.kernels:
            if kernels.setdefault(k.name, k).source != k.source:
                raise AssertionError(f"two different kernels are both named {k.name}")
        phases["decode"] += [replace(launch, node=i) for launch in low.decode]
        phases["prefill"] += [replace(launch, node=i) for launch in low.prefill]
        greedy.append([replace(launch, node=i) for launch in (low.decode if low.greedy is None else low.greedy)])
        any_greedy = any_greedy or low.greedy is not None
        for ws in low.workspaces:
            have = spaces.get(ws.name)
            if have is None or (ws.fill == "scratch" and have.fill == "scratch"):
                spaces[ws.name] = ws if have is None or ws.nbytes > have.nbytes else have
            elif have != ws:
                raise AssertionError(f"two different workspaces are both named {ws.name}")
    if any_greedy:  # a step whose every row is greedy and that returns no logits (tensor parallel)
        phases[DECODE_GREEDY] = [launch for launches in greedy for launch in launches]
    advance = lower_advance(graph)
    if advance is not None:
        k, launch = advance
        kernels.setdefault(k.name, k)
        phases[ADVANCE] = [launch]
    return LoweredGraph(list(kernels.values()), phases, list(spaces.values()))


ADVANCE_INPUTS = ("tokens", "positions", "seq_ids", "seq_lens", "sample.step")


def lower_advance(graph: Graph):
    """The "advance" phase: one kernel after a decode step that feeds each row's sampled token
    back as the next step's input (``sample.advance_decode``). Captured behind the decode phase it
    makes a graph whose replays generate token after token with no host work between them, so
    the host can run ahead (``Plan.generate``). None for a graph without a sampler."""
    if not all(name in graph.values for name in ADVANCE_INPUTS) or \
            not any(v.role == "next_token" for v in graph.values.values()):
        return None
    k = sample.advance_decode()
    args = [value(graph.with_role("next_token"))] + [value(name) for name in ADVANCE_INPUTS] + [step("B")]
    return k, Launch(k.name, sample.advance_decode_launch("B"), tuple(args), node=-1, early=True)
