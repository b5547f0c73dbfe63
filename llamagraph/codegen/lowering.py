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
from .launch import NULL, Cond, Launch, Shape, Workspace, const, step, value, wants, workspace
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
        v = c.v(name)
        if v.quant is not None or v.shard is not None:
            what = f"quantized ({v.quant.scheme})" if v.quant is not None else "sharded"
            raise LoweringError(f"{c.node.op} '{c.node.name}': %{name} is {what}; no kernel reads that layout yet")


# ---------------------------------------------------------------------------------------------
# rows in, rows out
# ---------------------------------------------------------------------------------------------

def _gather(table: str, index: str, out: str, c: Ctx) -> Lowered:
    dt, D, rows = c.dtype(out), c.v(out).shape[1], c.rows(out)
    k = dense.gather_rows(dt, D)
    return same_in_both([k], [run(k, dense.gather_rows_launch(dt, D, rows), value(table), value(index), value(out),
                                  step(rows))])


@lowering("embedding")
def lower_embedding(n: Node, c: Ctx) -> Lowered:
    tokens, table = n.inputs  # x: [T, D] = table[tokens]
    _float_only(c, table)
    return _gather(table, tokens, n.outputs[0], c)


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

GEMM_SCRATCH = "gemm_scratch"  # prefill: cuBLAS output before a SwiGLU epilogue
# prefill epilogues after a cuBLAS GEMM: kernel tag -> (C expression, how b is read); see dense.elementwise
PREFILL_EPILOGUES = {"bias_row": ("a + b", "row"), "silu_mul_halves": ("silu(a) * b", "halves")}


def _gemm(n: Node, c: Ctx, epilogue: str) -> Lowered:
    """Decode: the tensor-core GEMV with its epilogue (W read once per row tile).

    Prefill: up to two row tiles the GEMV still wins; past that, cuBLAS writes the plain GEMM
    (into scratch when a SwiGLU epilogue follows) and element-wise kernels apply the bias and
    the epilogue.
    """
    x, w, *bias = n.inputs
    out = n.outputs[0]
    _float_only(c, w, *bias)
    dt, out_dt, rows, rt = c.dtype(x), c.dtype(out), c.rows(out), c.row_tile
    N, K = c.v(w).shape
    gemv = dense.gemv(dt, N, K, rt, epilogue, bool(bias), out_dt)
    b_arg = value(bias[0]) if bias else NULL
    decode = run(gemv, dense.gemv_launch(dt, N, K, rt, epilogue), value(x), value(w), b_arg, value(out), step(rows))

    small, large = (Cond(rows, "<=", 2 * rt),), (Cond(rows, ">", 2 * rt),)
    silu = epilogue == "silu_mul"
    target = workspace(GEMM_SCRATCH) if silu else value(out)
    gemm_dt = dt if silu else out_dt
    kernels, workspaces = [gemv], []
    prefill = [replace(decode, when=small),
               Launch("gemm", None, (value(x), value(w), target, step(rows), const(N), const(K), const(dt),
                                     const(gemm_dt)), kind="library", when=large)]
    if bias:
        k = dense.elementwise("bias_row", *PREFILL_EPILOGUES["bias_row"], gemm_dt, N)
        kernels.append(k)
        prefill.append(replace(run(k, dense.elementwise_launch(gemm_dt, N, rows), target, b_arg, target, step(rows)),
                               when=large))
    if silu:
        k = dense.elementwise("silu_mul_halves", *PREFILL_EPILOGUES["silu_mul_halves"], dt, N // 2)
        kernels.append(k)
        prefill.append(replace(run(k, dense.elementwise_launch(dt, N // 2, rows), target, NULL, value(out),
                                   step(rows)), when=large))
        workspaces.append(Workspace(GEMM_SCRATCH, c.graph.dims["T"] * N * itemsize(dt)))
    return Lowered(kernels, [decode], prefill, workspaces)


@lowering("qkv_gemm", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
def lower_gemm(n: Node, c: Ctx) -> Lowered:
    return _gemm(n, c, "none")


@lowering("gate_up_silu")
def lower_gate_up_silu(n: Node, c: Ctx) -> Lowered:
    return _gemm(n, c, "silu_mul")


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
    decode = [run(fused, s_split, value(q), value(kc), value(vc), value(pos), value(sid), workspace(partials.name),
                  workspace(counters.name), value(out), step("T"))]
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
    return same_in_both([k], [run(k, sample.sample_launch(rows), *(value(i) for i in n.inputs), value(token),
                                  value(logprob), step(rows))])


LOGPROB_CHUNK = 128  # rows of fp32 logits the prompt logprobs hold at once: [chunk, V], not [T, V]


@lowering("token_logprobs")
def lower_token_logprobs(n: Node, c: Ctx) -> Lowered:
    """On demand (only steps that fetch the output): the LM head over a chunk of rows into an
    fp32 workspace, then each row's log-softmax at its target. Decode (T = B rows) takes one
    chunk through the GEMV; prefill walks the step's rows chunk by chunk with cuBLAS, each chunk
    launched only when the step has rows there."""
    x, w, targets = n.inputs  # x: [T, D] normed rows, w: [V, D], targets: [T]
    (out,) = n.outputs
    _float_only(c, w)
    dt = c.dtype(x)
    V, D = c.v(w).shape
    T_max, B_max = c.graph.dims["T"], c.graph.dims["B"]
    chunk = min(LOGPROB_CHUNK, T_max)
    ws = Workspace(f"logprob_logits.v{V}", max(chunk, B_max) * V * 4)
    on = wants(out)
    lp = sample.token_logprobs(V)
    gemv = dense.gemv(dt, V, D, c.row_tile, "none", False, "float32")
    decode = [Launch(gemv.name, dense.gemv_launch(dt, V, D, c.row_tile, "none"),
                     (value(x), value(w), NULL, workspace(ws.name), step("T")), when=(on,)),
              Launch(lp.name, sample.token_logprobs_launch(B_max),
                     (workspace(ws.name), value(targets), value(out), step("T"), const(0), step("T")), when=(on,))]
    prefill = []
    row_bytes = D * itemsize(dt)
    for row0 in range(0, T_max, chunk):
        rows = min(chunk, T_max - row0)  # rows past T are computed from stale rows and never read
        has_rows = (on, Cond("T", ">", row0))
        prefill += [Launch("gemm", None, (value(x, row0 * row_bytes), value(w), workspace(ws.name), const(rows),
                                          const(V), const(D), const(dt), const("float32")), kind="library",
                           when=has_rows),
                    Launch(lp.name, sample.token_logprobs_launch(rows),
                           (workspace(ws.name), value(targets), value(out), const(rows), const(row0), step("T")),
                           when=has_rows)]
    return Lowered([gemv, lp], decode, prefill, [ws])


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
        for ws in low.workspaces:
            have = spaces.get(ws.name)
            if have is None or (ws.fill == "scratch" and have.fill == "scratch"):
                spaces[ws.name] = ws if have is None or ws.nbytes > have.nbytes else have
            elif have != ws:
                raise AssertionError(f"two different workspaces are both named {ws.name}")
    return LoweredGraph(list(kernels.values()), phases, list(spaces.values()))
