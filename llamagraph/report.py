"""What ``llamagraph compile`` and ``llamagraph dump`` produce: artifacts on disk and a text report.

The CLI is a thin face over this module, and this module a thin layer over the compiler
(``llamagraph.compiler``): nothing here changes what is compiled, and nothing here runs it.

Artifacts written by ``write_artifacts`` into one output directory:
  plan.json / kernels.cu     the compiled plan (``llamagraph.load`` and ``llamagraph run DIR`` read it)
  graph.txt / graph.json     the fused, memory-planned graph (text IR that parses back; JSON)
  graph_unfused.txt          the builder's graph before any pass
  memory_plan.json / .txt    the memory plan's totals and buffers, with the schedule; a buffer table
  graph.html                 picture of the fused graph (llamagraph.viz)
  memory_plan.html           picture of the memory plan (llamagraph.viz)
  kernels.txt                registers and spills per kernel, when NVRTC or nvcc is present
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field

from llamagraph import viz
from llamagraph.codegen.compiled import CompiledPlan, write_whole
from llamagraph.codegen.lowering import PEER_ROWS
from llamagraph.compiler import build_unfused, checkpoint_quantization, lower
from llamagraph.ir import WEIGHT, Graph, ModelConfig, load_config
from llamagraph.ir.dtypes import itemsize
from llamagraph.ir.dtypes import nbytes as dtype_nbytes
from llamagraph.ir.jsontext import dumps_lines
from llamagraph.ir.memory import buffers
from llamagraph.passes import run_pipeline


@dataclass
class Compiled:
    """A config compiled to its unfused graph and its compiled plan."""

    source: str  # the config path as given
    cfg: ModelConfig
    unfused: Graph
    plan: CompiledPlan

    @property
    def fused(self) -> Graph:
        return self.plan.graph


@dataclass
class Section:
    """A titled block of the text report, plus the files it wrote (paths relative to outdir)."""

    title: str
    lines: list[str]
    files: list[str] = field(default_factory=list)


def compile_model(config: str, *, dtype: str = "float16", max_batch: int = 1, max_seq: int | None = None,
                  max_tokens: int | None = None, dump_dir: str | None = None, quantize: str | None = None,
                  group_size: int | None = None, tp: int = 1) -> Compiled:
    cfg = load_config(config)
    quantize, group_size = checkpoint_quantization(cfg, quantize, group_size)
    unfused = build_unfused(cfg, dtype=dtype, max_batch=max_batch, max_seq=max_seq, max_tokens=max_tokens,
                            quantize=quantize, group_size=group_size, tp=tp)
    plan = lower(run_pipeline(unfused, None, dump_dir), os.path.abspath(os.fspath(config)))
    return Compiled(os.fspath(config), cfg, unfused, plan)


def default_outdir(config: str) -> str:
    """``./<config stem>.llamagraph``; a checkpoint's config.json / params.json is named by its directory."""
    path = os.path.abspath(os.fspath(config))
    if os.path.isdir(path) or os.path.basename(path) in ("config.json", "params.json"):
        stem = os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))
    else:
        stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(".", f"{stem or 'model'}.llamagraph")


# ---------------------------------------------------------------------------------------------
# numbers the report prints
# ---------------------------------------------------------------------------------------------

def _mib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def model_summary(cfg: ModelConfig, graph: Graph) -> list[str]:
    rope = cfg.rope_type
    rope_s = f"rope {rope}, theta {cfg.rope_theta:g}"
    if cfg.rope_scaling:
        rope_s += f", factor {cfg.rope_scaling['factor']:g}"
    extras = [f"{cfg.rope_layout} layout", "tied embeddings" if cfg.tie_word_embeddings else "untied lm_head"]
    if cfg.attention_bias:
        extras.append("attention bias")
    if cfg.mlp_bias:
        extras.append("mlp bias")
    m = graph.meta
    return [
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads x {cfg.head_dim}, vocab {cfg.vocab_size}",
        f"{rope_s}; {', '.join(extras)}; {cfg.source} config",
        f"{m['dtype']}, max_batch {m['max_batch']}, max_seq {m['max_seq']}, max_tokens {m['max_tokens']}",
    ]


def op_table(unfused: Graph, fused: Graph) -> list[str]:
    a, b = unfused.op_counts(), fused.op_counts()
    ops = sorted(set(a) | set(b))
    w = max([len(op) for op in ops] + [5])
    rows = [f"{'op':<{w}}  {'unfused':>7}  {'fused':>5}"]
    for op in ops:
        rows.append(f"{op:<{w}}  {a.get(op, 0) or '-':>7}  {b.get(op, 0) or '-':>5}")
    rows.append(f"{'total':<{w}}  {len(unfused.nodes):>7}  {len(fused.nodes):>5}")
    return rows


def memory_lines(graph: Graph, workspace_bytes: int = 0) -> list[str]:
    mem = graph.meta["memory"]
    arena, lb = mem["arena_bytes"], mem["lower_bound_bytes"]
    ratio = arena / lb if lb else 1.0
    rows = [
        ("arena", arena, f"{mem['buffers']} buffers"),
        ("lower bound", lb, f"arena / lower bound = {ratio:.3f}"),
        ("weights", mem["weight_bytes"], ""),
        ("kv cache", mem["kv_cache_bytes"], ""),
        ("step inputs", mem["input_bytes"], ""),
        ("workspaces", workspace_bytes, "scratch and tables of the launch lists"),
    ]
    rows.append(("total", sum(n for _, n, _ in rows[:1] + rows[2:]), "device memory the plan holds"))
    w = max(len(f"{n}") for _, n, _ in rows)
    return [f"{name:<12} {n:>{w}} bytes  {_mib(n):>11}" + (f"  {note}" if note else "") for name, n, note in rows]


def quantization_lines(graph: Graph) -> list[str]:
    """What the quantize_weights pass did: the scheme, how many weights, and weight bytes before and after."""
    spec = graph.meta.get("quantize")
    weights = [v for v in graph.values.values() if v.kind == WEIGHT]
    quantized = [v for v in weights if v.quant is not None]
    if not spec or not quantized:
        return []
    act = itemsize(graph.meta["dtype"])
    after = sum(v.nbytes(graph.dims) for v in weights)
    before = sum(act * v.numel(graph.dims) if v.quant is not None else v.nbytes(graph.dims)
                 for v in weights if "quant_of" not in v.attrs)
    q = quantized[0].quant
    if q.scheme == "int8":
        scheme = "int8, symmetric, one scale per output row"
    else:
        sizes = sorted({v.quant.group_size for v in quantized})
        scheme = f"int4, asymmetric, groups of {'/'.join(map(str, sizes))} columns (a scale and a zero each)"
    kept = "lm_head tied to the embedding (kept)" if not any(v.name.startswith("lm_head") for v in quantized) \
        else "lm_head quantized"
    return [f"{scheme}; {len(quantized)} weights, {kept}; embedding kept in {graph.meta['dtype']}",
            f"weights {before} -> {after} bytes ({_mib(before)} -> {_mib(after)}, {after / before:.3f}x; "
            "scales and zeros included)",
            f"logits error against the unquantized plan: `llamagraph run MODEL --quantize {q.scheme} --quant-error`"]


def unsharded_weight_bytes(graph: Graph) -> int:
    """Weight bytes of the same plan on one GPU, from a (rank) graph: a sharded value's whole size
    follows from its checkpoint parts' shapes (``attrs["parts"]``), and a part read by two values
    (a tied LM head's own copy of the embedding table) counts once, as one GPU would hold it once."""
    seen: set[str] = set()
    total = 0
    for v in graph.values.values():
        if v.kind != WEIGHT:
            continue
        parts = v.attrs.get("parts")
        if "quant_of" in v.attrs:  # a quantized weight's scales / zeros: cut as their weight is
            w = graph.values[v.attrs["quant_of"]]
            whole = sum(math.prod(shape) for _, shape in w.attrs.get("parts", ())) or math.prod(w.shape)
            total += v.nbytes(graph.dims) * whole // math.prod(w.shape)
            continue
        if not parts:
            total += v.nbytes(graph.dims)
            continue
        for name, shape in parts:
            if name not in seen:
                seen.add(name)
                total += dtype_nbytes(v.dtype, shape)  # (int4 codes: two to a byte)
    return total


def tensor_parallel_lines(graph: Graph) -> list[str]:
    """What the shard_tensor_parallel pass did, per rank: heads, FFN columns, vocabulary chunk,
    collectives per step, and weight and KV-cache bytes against the unsharded plan's."""
    tp = int(graph.meta.get("tp", 1))
    if tp <= 1:
        return []
    cfg = graph.meta["config"]
    H, KV, I, V = cfg["num_heads"], cfg["num_kv_heads"], cfg["intermediate_size"], cfg["vocab_size"]
    Hl, KVl = graph.meta["tp_heads"]
    chunk = -(-V // tp)
    pad = chunk * tp - V
    counts = graph.op_counts()
    mem = graph.meta["memory"]
    weights, whole = mem["weight_bytes"], unsharded_weight_bytes(graph)
    kv = mem["kv_cache_bytes"]
    kv_whole = kv * KV // KVl  # one GPU caches every KV head once
    if KV >= tp:
        kv_heads = f"{KVl} of {KV} KV heads"
    else:  # each rank holds whole heads, so a KV head is held (and its cache written) by tp / KV ranks
        kv_heads = f"{KVl} KV head (KV heads replicated: each of the {KV} held by {tp // KV} ranks)"
    last = f" (last rank: {pad} zero padding row{'s' if pad != 1 else ''})" if pad else ""
    fused = counts.get("all_reduce_residual", 0)
    reduces, gathers = counts.get("all_reduce", 0) + fused, counts.get("all_gather_vocab", 0)
    summed = [graph.values[n.inputs[0]] for n in graph.nodes if n.op in ("all_reduce", "all_reduce_residual")]
    row = itemsize(summed[0].dtype) * summed[0].shape[-1] if summed else 0  # bytes of one token's partial sums
    return [
        f"{tp} ranks, one GPU each, all running this graph (SPMD), each on its own shard of the weights",
        f"attention: {Hl} of {H} q heads and {kv_heads} per rank",
        f"ffn: {I // tp} of {I} intermediate columns per rank (gate and up by rows, down by columns)",
        f"lm head: {chunk} of {V} vocabulary rows per rank{last}; all_gather_vocab makes the [B, {V}] logits",
        f"collectives per step: {reduces} all_reduce (after o_proj and down_proj, {reduces / max(1, cfg['num_layers']):g} "
        f"per layer; {row} bytes per token each) + {gathers} all_gather_vocab",
        *([f"all-reduce: {fused} of them add the residual stream too (all_reduce_residual): one kernel over peer "
           f"memory for steps of up to {PEER_ROWS} tokens, NCCL then a residual kernel for longer ones or GPUs "
           "without peer access"] if fused else []),
        f"weights per rank: {weights} bytes ({_mib(weights)}) vs {whole} bytes ({_mib(whole)}) unsharded, "
        f"{weights / whole:.3f}x",
        f"kv cache per rank: {kv} bytes ({_mib(kv)}) vs {kv_whole} bytes ({_mib(kv_whole)}) unsharded, "
        f"{kv / kv_whole:.3f}x" if kv_whole else "kv cache: none",
    ]


def memory_doc(graph: Graph) -> dict:
    """memory_plan.json: the planner's totals, its buffers, and the schedule their steps index."""
    doc = dict(graph.meta["memory"])
    doc["buffers"] = [b.as_dict() for b in buffers(graph)]
    doc["schedule"] = [{"step": i, "op": n.op, "name": n.name} for i, n in enumerate(graph.nodes)]
    return doc


def memory_table(graph: Graph) -> str:
    """memory_plan.txt: one row per arena buffer (values last, so long lists need no truncation)."""
    mem = graph.meta["memory"]
    arena, lb = mem["arena_bytes"], mem["lower_bound_bytes"]
    head = [
        f"# memory plan: {graph.meta.get('dtype')} max_batch={graph.meta.get('max_batch')} "
        + " ".join(f"{k}={v}" for k, v in graph.dims.items()),
        f"# arena {arena} bytes, lower bound {lb} bytes, ratio {arena / lb if lb else 1.0:.3f}, "
        f"{mem['buffers']} buffers",
        "# first/last: schedule steps (node indices in graph.txt order); offset/size in bytes",
    ]
    rows = [("buffer", "offset", "size", "first", "last", "values")]
    for b in buffers(graph):
        rows.append((str(b.id), str(b.offset), str(b.size), str(b.first), str(b.last), ", ".join(b.values)))
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    body = ["  ".join(r[k].rjust(widths[k]) for k in range(5)) + "  " + r[5] for r in rows]
    return "\n".join(head + body) + "\n"


# ---------------------------------------------------------------------------------------------
# the compiled plan and its CUDA source
# ---------------------------------------------------------------------------------------------

def kernel_lines(plan: CompiledPlan) -> list[str]:
    g = plan.graph
    dec = [x for x in plan.phases["decode"] if not x.on_demand]
    pre = [x for x in plan.phases["prefill"] if not x.on_demand]
    demand = sorted({x.on_demand for ls in plan.phases.values() for x in ls if x.on_demand})
    return [
        f"kernels per decode step: {plan.kernel_launches('decode')} ({len(g.nodes)} nodes, "
        f"{plan.kernel_launches('decode') / max(1, g.meta['config']['num_layers']):.1f} per layer)",
        f"decode: {len(dec)} launches, captured as one CUDA graph per batch size",
        *([f"decode_greedy: {len(plan.phases['decode_greedy'])} launches, for steps that need only greedy tokens "
           "(each rank's candidates gathered, not the logits)"] if "decode_greedy" in plan.phases else []),
        *([f"advance: {len(plan.phases['advance'])} launch, replayed behind decode when generate runs steps ahead "
           "(feeds the sampled tokens back on the device)"] if "advance" in plan.phases else []),
        f"prefill: {len(pre)} launches ({sum(1 for x in pre if x.kind == 'library')} cuBLAS; "
        f"{sum(1 for x in pre if x.when)} chosen by the step's row count)",
        *([f"on demand (only when a step asks for it): {', '.join(demand)}"] if demand else []),
        "workspaces: " + ", ".join(f"{w.name} {_mib(w.nbytes)}" for w in plan.workspaces),
    ]


def write_cuda_artifacts(plan: CompiledPlan, outdir: str, arch: str) -> Section:
    """Write the plan (``plan.json``, ``kernels.cu``: deterministic) and, where NVRTC or nvcc is
    present, compile the source for ``arch`` and report kernels, registers and spills
    (``kernels.txt``)."""
    from llamagraph.codegen import nvrtc

    files = plan.write_files(outdir)
    source = plan.source
    lines = [f"kernels.cu: {len(plan.kernels)} distinct kernels, {len(source.encode())} bytes, "
             f"sha256 {hashlib.sha256(source.encode()).hexdigest()[:16]}"]
    if nvrtc.available() is None:
        lines.append("no NVRTC library or nvcc found: source written, not compiled")
        return Section(f"cuda ({arch})", lines, files)
    t = time.perf_counter()
    result = nvrtc.compile_source(source, arch)
    elapsed = time.perf_counter() - t
    rows = sorted(result.kernels.items())
    spills = sum(r.spill_stores + r.spill_loads for _, r in rows)
    lines.append(f"compiled with {result.compiler} for {arch} in {elapsed:.1f} s: {len(rows)} kernels, "
                 f"max {max((r.registers for _, r in rows), default=0)} registers, {spills} spill bytes")
    width = max((len(k) for k, _ in rows), default=6)
    table = [f"{'kernel':<{width}}  regs  spill_st  spill_ld  smem_static"]
    table += [f"{k:<{width}}  {r.registers:>4}  {r.spill_stores:>8}  {r.spill_loads:>8}  {r.shared_bytes:>11}" for k, r in rows]
    _write(outdir, "kernels.txt", "\n".join(table) + "\n", files)
    return Section(f"cuda ({arch})", lines, files)


# ---------------------------------------------------------------------------------------------
# writing and reporting
# ---------------------------------------------------------------------------------------------

def _write(outdir: str, name: str, text: str, files: list[str]) -> None:
    with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
        f.write(text)
    files.append(name)


def write_artifacts(c: Compiled, outdir: str, *, arch: str = "sm_90") -> list[Section]:
    """Write every artifact as the directory ``outdir``; return the report sections.

    The directory is written whole or not at all (``write_whole``): a failure part-way leaves no
    half-written plan, and an earlier plan directory there is replaced whole."""
    return write_whole(outdir, lambda tmp: _write_artifacts(c, tmp, outdir, arch))


def _write_artifacts(c: Compiled, folder: str, outdir: str, arch: str) -> list[Section]:
    files: list[str] = []
    g = c.fused
    name = os.path.basename(c.source.rstrip("/\\")) or c.source
    _write(folder, "graph.txt", str(g), files)
    _write(folder, "graph.json", g.to_json() + "\n", files)
    _write(folder, "graph_unfused.txt", str(c.unfused), files)
    _write(folder, "memory_plan.json", dumps_lines(memory_doc(g)) + "\n", files)
    _write(folder, "memory_plan.txt", memory_table(g), files)
    _write(folder, "graph.html", viz.graph_html(g, title=f"{name}: fused graph"), files)
    _write(folder, "memory_plan.html", viz.memory_plan_html(g, title=f"{name}: memory plan"), files)

    sections = [
        Section("model", model_summary(c.cfg, g)),
        Section("ops (unfused -> fused)", op_table(c.unfused, g)),
        Section("kernels", kernel_lines(c.plan)),
        Section("memory" + (" (per rank)" if g.meta.get("tp", 1) > 1 else ""),
                memory_lines(g, c.plan.sizes()["workspaces"])),
    ]
    if quantization_lines(g):
        sections.append(Section("quantization", quantization_lines(g)))
    if tensor_parallel_lines(g):
        sections.append(Section("tensor parallel", tensor_parallel_lines(g)))
    cuda = write_cuda_artifacts(c.plan, folder, arch)
    sections.append(cuda)
    files = cuda.files[:2] + files + cuda.files[2:]
    sections.append(Section(f"files written to {outdir}", _wrap(files)))
    return sections


def _wrap(names: list[str], width: int = 90) -> list[str]:
    lines: list[str] = []
    for name in names:
        if lines and len(lines[-1]) + 2 + len(name) <= width:
            lines[-1] += "  " + name
        else:
            lines.append(name)
    return lines


def format_report(title: str, sections: list[Section]) -> str:
    out = [title]
    for s in sections:
        out.append("")
        out.append(f"{s.title}:")
        out += [f"  {line}" for line in s.lines]
    return "\n".join(out) + "\n"
