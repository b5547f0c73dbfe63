"""Tensor parallelism: turn the whole-model graph into the graph every one of N ranks runs.

    # qkv_gemm  x, @l0.qkv.w f16[(H+2KV)*HD, D]     ->  qkv_gemm x, @l0.qkv.w f16[(H/N+2KV')*HD, D] {shard axis 0}
    # o_proj    attn, @l0.o.w f16[D, H*HD] -> o      ->  o_proj attn, @l0.o.w f16[D, H/N*HD] {shard axis 1} -> o
    #                                                    all_reduce o -> l0.o.sum          (partial sums added)
    # lm_head   xn, @lm_head.w f32 -> logits [B, V] ->  lm_head xn, @lm_head.w {shard chunk} -> logits.local [B, V/N]
    #                                                    all_gather_vocab logits.local -> logits [B, V]

It reads ``graph.meta["tp"]`` (the number of ranks; absent: the pass changes nothing) and
runs first, on the builder's unfused graph, so every fusion after it sees the rank graph. Each
rank runs the same graph (SPMD); only its weights differ, and the loader cuts them from the
checkpoint by each weight's ``Value.shard`` (``ir.graph.Shard``):

- QKV, gate and up are column-parallel (split along their output rows). QKV splits by heads:
  rank r holds q heads ``[r H/N, (r+1) H/N)`` and the KV heads they read; when N exceeds the KV
  heads, KV heads are replicated so each rank holds whole heads (KV' = 1). Their biases split
  the same way.
- O and down are row-parallel (split along K), each followed by an ``all_reduce`` of the partial
  sums. Their biases stay whole and are added after the all-reduce (once, not N times). The
  residual-into-GEMV fusion no longer matches there; the residual + RMSNorm fusion still does.
- The LM head is vocabulary-parallel: rank r holds rows ``[r c, (r+1) c)`` with
  ``c = ceil(V / N)``, the last chunk zero-padded; ``all_gather_vocab`` puts the chunks together
  into full ``[B, V]`` logits, which every rank samples from alike (same seeds, same token).
  A tied LM head gets a value of its own (the embedding table stays whole on every rank).
- The on-demand prompt logprobs (``token_logprobs``) read the whole LM head; a rank graph
  drops them (``Plan`` says so if asked).

Shapes that cannot be split are a one-line ``ConfigError`` naming the dimension.
"""

from __future__ import annotations

from llamagraph.ir import KV_CACHE, OPS, WEIGHT, Graph, Shard
from llamagraph.ir.errors import ConfigError

COLUMN = ("qkv_gemm", "gate_proj", "up_proj")  # split along the weight's rows (output features)
ROW = ("o_proj", "down_proj")  # split along K: partial sums, all-reduced
HEAD_OPS = ("rope", "kv_append", "sdpa", "rope_kv_append")  # carry num_heads / num_kv_heads


def tp_heads(cfg: dict, tp: int) -> tuple[int, int]:
    """(q heads, KV heads) per rank, or a ConfigError naming the dimension that does not split."""
    H, KV = cfg["num_heads"], cfg["num_kv_heads"]
    if H % tp:
        raise ConfigError(f"tp {tp}: num_attention_heads {H} is not divisible by {tp}")
    if KV % tp and tp % KV:
        raise ConfigError(f"tp {tp}: num_key_value_heads {KV} neither divides nor is divisible by {tp} "
                          "(each rank must hold whole KV heads)")
    return H // tp, max(1, KV // tp)


def check_tp(cfg: dict, tp: int) -> None:
    """Every split the pass makes is possible, else a one-line ConfigError naming the dimension."""
    tp_heads(cfg, tp)
    if cfg["intermediate_size"] % tp:
        raise ConfigError(f"tp {tp}: intermediate_size {cfg['intermediate_size']} is not divisible by {tp}")


def shard_tensor_parallel(graph: Graph) -> Graph:
    out = graph.copy()
    if "tp" not in graph.meta:  # (the compiler sets it for tp > 1; a test may ask for a rank graph of one rank)
        return out
    tp = int(graph.meta["tp"])
    cfg = out.meta["config"]
    check_tp(cfg, tp)
    H, KV, HD, V = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["vocab_size"]
    I = cfg["intermediate_size"]
    Hl, KVl = tp_heads(cfg, tp)
    users = out.users()

    def shard(name: str, axis: int, blocks: tuple[int, ...], width: int) -> None:
        v = out.values[name]
        if v.shard is not None:  # a weight read by two nodes is cut once
            return
        shape = list(v.shape)
        shape[axis] = width
        v.shape, v.shard = tuple(shape), Shard(axis, tp, blocks=blocks)

    def column_blocks(op: str) -> tuple[tuple[int, ...], int]:
        return ((H, KV, KV), (Hl + 2 * KVl) * HD) if op == "qkv_gemm" else ((I,), I // tp)

    nodes = []
    for node in out.nodes:
        nodes.append(node)
        if node.op in COLUMN:
            blocks, width = column_blocks(node.op)
            shard(node.inputs[1], 0, blocks, width)
            for j in users[node.outputs[0]]:  # the builder adds a bias as a bias_add after the GEMM
                user = out.nodes[j]
                if user.op == "bias_add":
                    shard(user.inputs[1], 0, blocks, width)
        elif node.op in ROW:
            K = H * HD if node.op == "o_proj" else I
            shard(node.inputs[1], 1, (H,) if node.op == "o_proj" else (I,), K // tp)
            partial = node.outputs[0]
            total = out.add_value(out.fresh_name(partial + ".sum"), out.values[partial].shape,
                                  out.values[partial].dtype, layer=node.layer)
            for j in users[partial]:
                user = out.nodes[j]
                user.inputs = [total if i == partial else i for i in user.inputs]
            nodes.append(_node(out, "all_reduce", [partial], [total], node.layer, ranks=tp))
        elif node.op in HEAD_OPS:
            node.attrs.update(num_heads=Hl, num_kv_heads=KVl)
        elif node.op == "lm_head":
            nodes.extend(_vocab_parallel(out, node, tp, V))
            nodes.remove(node)
    out.nodes = [n for n in nodes if n.op != "token_logprobs"]
    dropped = [o for n in nodes if n.op == "token_logprobs" for o in n.outputs]
    out.outputs = [o for o in out.outputs if o not in dropped]
    for name in dropped:
        del out.values[name]
    for v in out.values.values():
        if v.kind == KV_CACHE:
            v.shape = (v.shape[0], v.shape[1], KVl, v.shape[3])
    _infer_shapes(out)
    out.meta["tp_heads"] = [Hl, KVl]
    return out


def _node(graph: Graph, op: str, inputs: list[str], outputs: list[str], layer, **attrs):
    n = graph.add_node(op, inputs, outputs, layer=layer, **attrs)
    graph.nodes.pop()  # placed by the caller, in schedule order
    return n


def _vocab_parallel(graph: Graph, node, tp: int, V: int) -> list:
    """lm_head over the rank's vocabulary chunk, then the all-gather of the chunks."""
    chunk = -(-V // tp)
    w = graph.values[node.inputs[1]]
    if w.role == "embedding_table":  # tied: the LM head gets its own (sharded) copy of the table
        name = graph.fresh_name("lm_head.w")
        graph.add_value(name, (chunk, w.shape[1]), w.dtype, WEIGHT, role="matrix", parts=w.attrs["parts"],
                        shard=Shard(0, tp, chunk=chunk))
    else:
        name = w.name
        w.shape, w.shard = (chunk, w.shape[1]), Shard(0, tp, chunk=chunk)
    logits = graph.values[node.outputs[0]]
    local = graph.add_value(graph.fresh_name(logits.name + ".local"), (logits.shape[0], chunk), logits.dtype)
    head = _node(graph, "lm_head", [node.inputs[0], name, *node.inputs[2:]], [local], node.layer, **node.attrs)
    gather = _node(graph, "all_gather_vocab", [local], [logits.name], None, vocab=V, ranks=tp)
    return [head, gather]


def _infer_shapes(graph: Graph) -> None:
    """Every activation's shape from its op's shape rule, in schedule order (the widths changed)."""
    for node in graph.nodes:
        inferred = OPS[node.op].infer([graph.values[i] for i in node.inputs], node.attrs)
        for name, (shape, _dtype) in zip(node.outputs, inferred):
            graph.values[name].shape = tuple(shape)
