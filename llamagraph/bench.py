"""``llamagraph bench``: decode and prefill speed against the bandwidth floor and PyTorch peers.

Batch-``B`` decode is bound by memory bandwidth: one step must read every weight it uses once
plus the KV cache of every sequence. The floor for a step is those bytes over the
device-to-device copy bandwidth measured in the same run (bytes read + written / time).

Engines, run one after another in the same process on the same random-weight shape, each at
every batch size asked for (the prompts of batch ``b`` are the first ``b`` of one draw):

- ``llamagraph (CUDA graphs)``: a plan compiled for that batch, decode steps replayed as CUDA graphs;
- ``torch.compile (gpt-fast style)`` (peer ``gptfast``): ``llamagraph.gptfast``, a compact
  static-cache Llama with fused QKV and gate/up weights whose decode step is compiled with
  ``torch.compile(mode="reduce-overhead", fullgraph=True)``: the strongest plain-PyTorch peer;
- ``HF eager`` (peer ``hf``): transformers' ``LlamaForCausalLM.generate`` (SDPA attention);
- ``HF static cache + torch.compile`` (peer ``compile``): the same model through generate's own
  compile path (``cache_implementation="static"`` + ``compile_config``).

With ``quantize="int8" | "int4"`` (weight-only, ``llamagraph.ir.quant``), the llamagraph row is the
quantized plan (``llamagraph int4 (CUDA graphs)``), and the unquantized plan of the same shape and
batch (``llamagraph_unquantized``) is measured in the same run beside it: the table prints the
quantized plan's decode speed over it (``vs float16``). The gpt-fast-style peer is quantized the
same way from its own random float weights (``llamagraph.gptfast.quantize_model``): int8 as
gpt-fast's WeightOnlyInt8Linear under the same torch.compile, int4 through
``torch.ops.aten._weight_int4pack_mm`` where the installed torch runs it for this shape and
group size (``check_int4``; on CUDA it takes bfloat16 activations only, so a float16 benchmark
runs that peer in bfloat16 and says so; otherwise the row says "not supported: <why>"). The HF
rows stay unquantized. Each row's % floor is against the bytes its own weights take: the quantized
floor (codes + scales + zeros) for the quantized rows, the unquantized floor for the others.

With ``tp=N > 1`` (tensor parallelism, one process driving N GPUs over NCCL), the llamagraph row
is the plan compiled with ``tp=N`` (``llamagraph tp2 (CUDA graphs)``) and its floor is per GPU:
the bytes each rank reads in one decode step (its shard of the weights, the embedding rows it
gathers, its KV heads' cache: ``decode_step_bytes`` of the rank graph) over one GPU's copy
bandwidth. The same model at ``tp=1`` (``llamagraph_tp1``) is measured in the same run beside it
(``tp1=False`` skips it), with the one-GPU floor, and the table prints the TP plan's decode speed
over it (``vs tp1``). The peers run on one GPU; the command line runs none with ``--tp`` unless
asked.

HF peers are built from an HF ``config.json`` as transformers reads it, or, for a Meta
``params.json``, from the equivalent ``LlamaConfig`` of llamagraph's parsed config
(``hf_peer_config``); the gpt-fast peer is built from llamagraph's parsed config directly.

Figures, per engine and batch (``B`` sequences of ``P`` prompt tokens, ``G`` new tokens each):

- prefill tok/s: ``B * P`` over one forward pass of the prompts up to the last position's logits
  (llamagraph's prefill step samples the first token on the device, so its prefill is its TTFT);
- TTFT ms: from the prompts to the first sampled token in host memory, through the engine's
  generate call;
- decode tok/s and ms/step: the ``G - 1`` steps after the first token (a generate of ``G``
  tokens minus the TTFT, or timed directly for the gpt-fast peer, whose loop is ours);
  % floor is decode tok/s over the floor;
- compile s: ``llamagraph.compile``'s wall time (passes, codegen, NVRTC, random weights drawn
  on the device); for the torch.compile peers, their warm-up, in which Dynamo and Inductor
  compile the decode step and CUDA graphs are captured;
- warm-up s: other untimed first runs (llamagraph's first generate: module load, decode graph
  capture; HF eager's first generate).
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from llamagraph.ir import KV_CACHE, WEIGHT, Graph, ModelConfig, load_config
from llamagraph.ir.errors import LlamagraphError

ENGINES = {  # key -> the row's name, in table order
    "llamagraph": "llamagraph (CUDA graphs)",  # the plan as asked (quantized with quantize=...)
    "llamagraph_unquantized": "llamagraph unquantized (CUDA graphs)",  # beside a quantized plan only
    "gptfast": "torch.compile (gpt-fast style)",
    "hf": "HF eager",
    "compile": "HF static cache + torch.compile",
}
TP_ENGINES = {"llamagraph_tp1": "llamagraph tp1 (CUDA graphs)"}  # beside a tensor-parallel plan only
ROWS = {k: v for k, v in ENGINES.items() if k.startswith("llamagraph")} | TP_ENGINES | ENGINES  # table order
PEERS = ("gptfast", "hf", "compile")

LEGEND = (
    "prefill: one forward pass over the prompts (llamagraph's prefill step also samples the first token, so "
    "it is its TTFT); TTFT: prompts to the first token in host memory; decode: the gen_len - 1 steps after it.\n"
    "compile s: llamagraph.compile wall time (passes, codegen, NVRTC, random weights drawn on the device); for "
    "the torch.compile rows, their warm-up, in which the decode step is compiled and its CUDA graph captured. "
    "warm-up s: other untimed first runs."
)
QUANT_LEGEND = (
    "Quantized: % floor of a quantized row is against the bytes its weights take (int codes + scales (+ zeros)), "
    "of an unquantized row against the unquantized plan's; 'vs <dtype>': decode speed over the unquantized "
    "llamagraph plan of the same shape in this run. gpt-fast int4: torch.ops.aten._weight_int4pack_mm with "
    "scale s and zero (8 - z) * s (torch dequantizes (q - 8) * scale + zero; ours (q - z) * s)."
)
TP_LEGEND = (
    "Tensor parallel: the floor of the tp{tp} row is per GPU: the bytes each rank reads in one decode step (its "
    "shard of the weights, the embedding rows it gathers, its KV heads' cache) over one GPU's copy bandwidth; the "
    "all-reduces are not in it. The tp1 row and any peers run on one GPU, against the one-GPU floor. 'vs tp1': "
    "decode speed over the tp1 llamagraph plan in this run. Peers are single-GPU: none run with --tp unless "
    "--peers names them."
)


@dataclass
class Result:
    """One engine at one batch size. Figures an engine did not produce are None."""

    engine: str  # a key of ENGINES
    decode_tok_s: float | None = None
    ms_per_step: float | None = None
    prefill_tok_s: float | None = None
    ttft_ms: float | None = None
    compile_s: float | None = None
    warmup_s: float | None = None
    note: str = ""
    scheme: str | None = None  # "int8" / "int4": this row's weights are quantized (its floor is the quantized one)
    label: str = ""  # the row's name where it is not ENGINES[engine] (e.g. "llamagraph int4 (CUDA graphs)")
    tp: int = 1  # GPUs the row runs on (its floor is per GPU)

    @property
    def name(self) -> str:
        return self.label or ROWS[self.engine]


def engine_label(engine: str, scheme: str | None, dtype: str, tp: int = 1) -> str:
    """A row's name: ENGINES' name, with the weight format where the benchmark quantizes and the
    rank count of a tensor-parallel plan."""
    if engine == "llamagraph_unquantized":
        return f"llamagraph {dtype} (CUDA graphs)"
    if engine == "llamagraph" and tp > 1:
        return f"llamagraph {scheme + ' ' if scheme else ''}tp{tp} (CUDA graphs)"
    if engine == "llamagraph_tp1" and scheme:
        return f"llamagraph {scheme} tp1 (CUDA graphs)"
    if scheme is None:
        return ROWS[engine]
    return {"llamagraph": f"llamagraph {scheme} (CUDA graphs)",
            "gptfast": f"torch.compile (gpt-fast {scheme})"}.get(engine, ROWS[engine])


@dataclass
class BatchReport:
    batch: int
    step_bytes: int  # bytes one decode step of the plan must read (weights as stored + KV cache at the mean context)
    floor_tok_s: float
    results: list[Result] = field(default_factory=list)
    # quantizing: the same for the unquantized plan of the same shape (the floor of the unquantized rows);
    # tensor parallel: for the tp1 plan (the floor of the one-GPU rows; step_bytes is then per GPU)
    base_step_bytes: int | None = None
    base_floor_tok_s: float | None = None

    def result(self, engine: str) -> Result | None:
        return next((r for r in self.results if r.engine == engine), None)

    def floor_of(self, r: Result) -> float:
        """The floor a row is measured against: the quantized one for quantized weights, the per-GPU
        one for a tensor-parallel row; the base plan's for the others where there is one."""
        own = r.scheme or r.tp > 1
        return self.floor_tok_s if own or self.base_floor_tok_s is None else self.base_floor_tok_s

    def pct_floor(self, r: Result) -> float | None:
        return None if not r.decode_tok_s else 100 * r.decode_tok_s / self.floor_of(r)

    def ratio(self, r: Result, engine: str, figure: str = "decode_tok_s") -> float | None:
        """r's ``figure`` over the same figure of ``engine``'s row (None where either is missing)."""
        base = self.result(engine)
        a, b = _num(getattr(r, figure)), _num(getattr(base, figure)) if base else None
        return a / b if a and b else None


@dataclass
class BenchReport:
    config: str
    prompt_len: int
    gen_len: int
    dtype: str
    device: str
    copy_gb_s: float
    model: dict = field(default_factory=dict)  # the shape benchmarked
    peers: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    batches: list[BatchReport] = field(default_factory=list)
    quantize: str | None = None  # "int8" / "int4": the llamagraph plan's (and the gpt-fast peer's) weights
    group_size: int | None = None  # int4: columns per scale and zero (-1: one group per row)
    tp: int = 1  # the llamagraph plan's ranks, one GPU each (device names one of them)

    # ---- text ------------------------------------------------------------------------------------
    COLUMNS = (  # header, width, figure -> text
        ("prefill tok/s", 13, lambda b, r: _fmt(r.prefill_tok_s, ".0f")),
        ("decode tok/s", 12, lambda b, r: _fmt(r.decode_tok_s, ".1f")),
        ("ms/step", 8, lambda b, r: _fmt(r.ms_per_step, ".3f")),
        ("% floor", 7, lambda b, r: _fmt(b.pct_floor(r), ".1f", "%")),
        ("TTFT ms", 8, lambda b, r: _fmt(r.ttft_ms, ".1f")),
        ("compile s", 9, lambda b, r: _fmt(r.compile_s, ".1f")),
        ("warm-up s", 9, lambda b, r: _fmt(r.warmup_s, ".1f")),
        ("vs gpt-fast", 11, lambda b, r: _fmt(b.ratio(r, "gptfast"), ".2f", "x")),
        ("vs HF eager", 11, lambda b, r: _fmt(b.ratio(r, "hf"), ".2f", "x")),
    )
    NAME_WIDTH = 33

    def columns(self) -> tuple:
        """COLUMNS, and when quantizing, each row's decode speed over the unquantized llamagraph plan."""
        if self.tp > 1:  # each row's decode speed over the tp1 llamagraph plan
            return self.COLUMNS + (("vs tp1", 7, lambda b, r: _fmt(b.ratio(r, "llamagraph_tp1"), ".2f", "x")),)
        if not self.quantize:
            return self.COLUMNS
        return self.COLUMNS + ((f"vs {self.dtype}", 11,
                                lambda b, r: _fmt(b.ratio(r, "llamagraph_unquantized"), ".2f", "x")),)

    def weights_text(self) -> str:
        """How the weights are stored: "int4 weights, G 128" (empty when unquantized)."""
        if self.quantize == "int4":
            return f", int4 weights, {'a group per row' if self.group_size == -1 else f'G {self.group_size}'}"
        return f", {self.quantize} weights" if self.quantize else ""

    def batch_table(self, b: BatchReport) -> str:
        cols = self.columns()
        floor = (f"copy bandwidth {self.copy_gb_s:.0f} GB/s; one decode step reads {b.step_bytes / 1e9:.3f} GB "
                 f"-> floor {b.floor_tok_s:.1f} tok/s")
        if self.tp > 1:  # each rank reads its own shard: the floor is per GPU
            floor = (f"copy bandwidth {self.copy_gb_s:.0f} GB/s per GPU; one decode step reads {b.step_bytes / 1e9:.3f} "
                     f"GB per GPU (tp{self.tp}) -> floor {b.floor_tok_s:.1f} tok/s")
            if b.base_step_bytes is not None:
                floor += f"; tp1: {b.base_step_bytes / 1e9:.3f} GB on one GPU -> floor {b.base_floor_tok_s:.1f} tok/s"
        elif b.base_step_bytes is not None:  # quantized: the bytes read are codes + scales + zeros
            floor += (f" ({self.quantize}: codes + scales{' + zeros' if self.quantize == 'int4' else ''}); "
                      f"{self.dtype}: {b.base_step_bytes / 1e9:.3f} GB -> floor {b.base_floor_tok_s:.1f} tok/s")
        gpus = f"tensor parallel over {self.tp} GPUs, floor per GPU, " if self.tp > 1 else ""
        lines = [
            f"{self.config}: batch {b.batch}, prompt {self.prompt_len}, {self.gen_len} new tokens, {self.dtype}"
            f"{self.weights_text()}, {gpus}{self.device}",
            floor,
            f"{'engine':<{self.NAME_WIDTH}}" + "".join(f" {h:>{w}}" for h, w, _ in cols),
        ]
        for r in sorted(b.results, key=lambda r: list(ROWS).index(r.engine)):
            row = f"{r.name:<{self.NAME_WIDTH}}" + "".join(f" {f(b, r):>{w}}" for _, w, f in cols)
            lines.append(row + (f"  ({r.note})" if r.note else ""))
        ours = b.result("llamagraph")
        q = (f" {self.quantize}" if self.quantize else "") + (f" tp{self.tp}" if self.tp > 1 else "")
        base = b.result("llamagraph_unquantized")
        tp1 = b.result("llamagraph_tp1")
        if ours and tp1:
            lines.append(f"llamagraph{q} vs llamagraph{' ' + self.quantize if self.quantize else ''} tp1: decode {_fmt(b.ratio(ours, tp1.engine), '.2f', 'x')} "
                         f"(floor {_fmt(b.base_step_bytes / b.step_bytes if b.base_step_bytes else None, '.2f', 'x')}: "
                         "bytes read per GPU per step)")
        if ours and base:
            lines.append(f"llamagraph{q} vs llamagraph {self.dtype}: decode {_fmt(b.ratio(ours, base.engine), '.2f', 'x')} "
                         f"(floor {_fmt(b.base_step_bytes / b.step_bytes if b.base_step_bytes else None, '.2f', 'x')}: "
                         "bytes read per step)")
        for peer, label in (("gptfast", f"gpt-fast{q}"), ("hf", "HF eager")):
            other = b.result(peer)
            if ours and other:
                lines.append(f"llamagraph{q} vs {label}: decode {_fmt(b.ratio(ours, peer), '.2f', 'x')}, "
                             f"prefill {_fmt(b.ratio(ours, peer, 'prefill_tok_s'), '.2f', 'x')}, "
                             f"TTFT {_fmt(ours.ttft_ms, '.1f')} ms vs {_fmt(other.ttft_ms, '.1f')} ms")
        return "\n".join(lines)

    def table(self) -> str:
        legend = LEGEND + ("\n" + QUANT_LEGEND if self.quantize else "") + \
            ("\n" + TP_LEGEND.format(tp=self.tp) if self.tp > 1 else "")
        return "\n\n".join(self.batch_table(b) for b in self.batches) + "\n\n" + legend

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def engine(b: BatchReport, r: Result) -> dict:
            return {
                "name": r.name,
                "decode_tok_s": _num(r.decode_tok_s),
                "pct_floor": _num(b.pct_floor(r)),
                "ms_per_step": _num(r.ms_per_step),
                "prefill_tok_s": _num(r.prefill_tok_s),
                "ttft_ms": _num(r.ttft_ms),
                "compile_s": _num(r.compile_s),
                "warmup_s": _num(r.warmup_s),
                "vs_gptfast": _num(b.ratio(r, "gptfast")),
                "vs_hf_eager": _num(b.ratio(r, "hf")),
                "prefill_vs_gptfast": _num(b.ratio(r, "gptfast", "prefill_tok_s")),
                "prefill_vs_hf_eager": _num(b.ratio(r, "hf", "prefill_tok_s")),
                "vs_unquantized": _num(b.ratio(r, "llamagraph_unquantized")),
                "scheme": r.scheme,
                "note": r.note,
                **({"vs_tp1": _num(b.ratio(r, "llamagraph_tp1")), "tp": r.tp} if self.tp > 1 else {}),
            }

        return {
            "config": self.config,
            "model": self.model,
            "dtype": self.dtype,
            "quantize": self.quantize,
            "group_size": self.group_size,
            "tp": self.tp,
            "floor": "per GPU",  # step_bytes / floor_tok_s: what one GPU reads (a tp > 1 plan's rank)
            "device": self.device,
            "prompt_len": self.prompt_len,
            "gen_len": self.gen_len,
            "copy_gb_s": _num(self.copy_gb_s),
            "peers": list(self.peers),
            "versions": self.versions,
            "batches": [
                {"batch": b.batch, "step_bytes": b.step_bytes, "floor_tok_s": _num(b.floor_tok_s),
                 "base_step_bytes": b.base_step_bytes, "base_floor_tok_s": _num(b.base_floor_tok_s),
                 "engines": {r.engine: engine(b, r) for r in b.results}}
                for b in self.batches
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")


def _num(x) -> float | None:
    """A finite figure, or None (JSON null) where there is none."""
    return float(x) if x is not None and math.isfinite(x) else None


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if _num(x) is None else f"{x:{spec}}{suffix}"


# ---- the floor -----------------------------------------------------------------------------------

def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import cupy as cp

    src = cp.random.random(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats + 3):
        start.record()
        dst[...] = src
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * src.nbytes / float(np.median(times[3:]))


def host_copy_bandwidth(nbytes: int = 1 << 26, repeats: int = 5) -> float:
    """The same figure for host memory (a benchmark run on the CPU: tests)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / min(times)


def decode_step_bytes(graph: Graph, cfg: ModelConfig, batch: int, context: float) -> int:
    """Bytes one decode step must read: every weight once as the plan stores it (the embedding
    table only for the rows it gathers, unless tied to the LM head) plus ``context`` cached tokens
    per sequence.

    A quantized weight is read as stored: its codes (int8 [N, K], or int4 packed two to a byte,
    [N, K/2]) and its scales (and int4 zeros), which are weight values of their own (roles
    "scales" / "zeros", ``attrs["quant_of"]``); the float weight it came from is never read.

    Of a tensor-parallel plan's rank graph, the bytes one rank reads (its shards; a tied LM head
    there has its own sharded value, so the table itself is only gathered from)."""
    total = 0
    # the table is read whole where a node other than the embedding gather reads it (a tied LM head)
    embed_read_whole = any(graph.values[i].role == "embedding_table" for n in graph.nodes if n.op != "embedding"
                           for i in n.inputs)
    for v in graph.values.values():
        if v.kind != WEIGHT:
            continue
        if v.role == "embedding_table" and not embed_read_whole:
            total += batch * v.nbytes(graph.dims) // v.shape[0]
        else:  # codes at their own width (Value.nbytes packs int4), scales and zeros in their dtype
            total += v.nbytes(graph.dims)
    # every layer's K and V cache: [max_batch, max_seq, KV, D]; a token's row is nbytes / (max_batch * max_seq)
    caches = [v for v in graph.values.values() if v.kind == KV_CACHE and "alias" not in v.attrs]
    per_token = sum(v.nbytes(graph.dims) // (v.shape[0] * v.shape[1]) for v in caches)
    return int(total + batch * context * per_token)


# ---- timing --------------------------------------------------------------------------------------

def _timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def _best(fn, sync, repeats: int) -> float:
    return min(_timed(fn, sync) for _ in range(repeats))


def _decode_time(plan, prompts, gen_len: int, sync) -> float:
    """Seconds from the first token in host memory to the last of a ``gen_len`` generation: its
    decode steps, timed inside one run (the difference of two separately timed runs is noise on
    a model whose whole decode takes a millisecond)."""
    first: list[float] = []

    def on_token(_seq: int, _tok: int) -> None:
        if not first:
            first.append(time.perf_counter())

    sync()
    plan.generate(prompts, gen_len, on_token=on_token)
    sync()
    return time.perf_counter() - first[0]


def _no_sync() -> None:
    pass


def _cupy_sync() -> None:
    import cupy as cp

    cp.cuda.Device().synchronize()


def _cupy_sync_all(devices: int):
    """Wait for GPUs 0 .. devices - 1 (a tensor-parallel plan's ranks: rank 0 may finish first)."""
    import cupy as cp

    def sync() -> None:
        for d in range(devices):
            cp.cuda.Device(d).synchronize()
    return sync


def _free_cupy(devices: int) -> None:
    """Give the blocks cupy caches back on GPUs 0 .. devices - 1 (its pool is per device)."""
    import cupy as cp

    gc.collect()
    for d in range(devices):
        with cp.cuda.Device(d):
            cp.get_default_memory_pool().free_all_blocks()


def _torch_sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else _no_sync


def _figures(engine: str, batch: int, prompt_len: int, gen_len: int, *, prefill_s: float | None, ttft_s: float,
             decode_s: float, compile_s: float | None = None, warmup_s: float | None = None, note: str = "") -> Result:
    steps = gen_len - 1
    decode_s = max(decode_s, 1e-9)
    return Result(engine, batch * steps / decode_s, 1e3 * decode_s / steps,
                  batch * prompt_len / prefill_s if prefill_s else None, 1e3 * ttft_s, compile_s, warmup_s, note)


def _failed(engine: str, e: BaseException) -> Result:
    """A peer failing must not hide the other figures: its row says why."""
    first = str(e).splitlines()[0][:100] if str(e) else ""
    return Result(engine, note=f"failed: {type(e).__name__}: {first}")


# ---- engines -------------------------------------------------------------------------------------

def bench_llamagraph(cfg: ModelConfig, prompts, gen_len: int, dtype: str, backend: str = "cuda",
                     progress: bool = False, quantize: str | None = None, group_size: int | None = None,
                     engine: str = "llamagraph", tp: int = 1) -> tuple[Result, Graph]:
    """llamagraph at ``len(prompts)`` sequences: a plan compiled for that batch (``quantize``d
    weight-only when asked, over ``tp`` GPUs when tp > 1); the row is ``engine``'s."""
    import llamagraph

    batch, prompt_len = len(prompts), len(prompts[0])
    sync = (_cupy_sync if tp == 1 else _cupy_sync_all(tp)) if backend == "cuda" else _no_sync
    t = time.perf_counter()
    plan = llamagraph.compile(cfg, "random", dtype=dtype, max_batch=batch, max_seq=prompt_len + gen_len,
                              backend=backend, progress=progress, quantize=quantize, group_size=group_size, tp=tp)
    compile_s = time.perf_counter() - t
    warmup_s = _timed(lambda: plan.generate(prompts, min(4, gen_len)), sync)  # module load, decode graph capture
    ttft = _best(lambda: plan.generate(prompts, 1), sync, 3)
    decode = min(_decode_time(plan, prompts, gen_len, sync) for _ in range(2))
    res = _figures(engine, batch, prompt_len, gen_len, prefill_s=ttft, ttft_s=ttft, decode_s=decode,
                   compile_s=compile_s, warmup_s=warmup_s)
    res.scheme, res.label, res.tp = quantize, engine_label(engine, quantize, dtype, tp), tp
    graph = plan.graph
    close = getattr(plan.executor, "close", None)
    if close is not None:  # a tensor-parallel runner: its NCCL clique is released now, not whenever gc runs
        close()
    plan = None  # free the device memory (every rank's) before the next engine
    gc.collect()
    if backend == "cuda":
        _free_cupy(tp)
    return res, graph


def bench_gptfast(cfg: ModelConfig, batches: list[int], prompts, gen_len: int, dtype: str, device: str = "cuda",
                  seed: int = 0, log=None, quantize: str | None = None, group_size: int | None = None) -> list[Result]:
    """The gpt-fast-style peer at each batch size: weights drawn once (and quantized weight-only
    with ``quantize``), caches and the compiled decode step per batch. Compiled on CUDA only (on
    the CPU it runs eagerly: tests)."""
    import torch

    from llamagraph.gptfast import GPTFastPeer, Int4Unsupported, Transformer, quantize_model

    def row(r: Result) -> Result:
        r.scheme, r.label = quantize, engine_label("gptfast", quantize, dtype)
        return r

    try:
        run_dtype, note = dtype, ""
        if quantize == "int4":
            run_dtype, note = int4_peer_dtype(cfg, dtype, device, group_size)
        model = Transformer(cfg, dtype=getattr(torch, run_dtype), device=device).init_random(seed)
        if quantize:
            quantize_model(model, quantize, group_size)
        peer = GPTFastPeer(model, compile=device == "cuda")
    except Int4Unsupported as e:
        model = peer = None
        _free_torch(device)
        return [row(Result("gptfast", note=f"not supported: {e}")) for _ in batches]
    except Exception as e:
        model = peer = None
        _free_torch(device)
        return [row(_failed("gptfast", e)) for _ in batches]
    out = []
    for b in batches:
        try:
            out.append(row(_gptfast_batch(peer, prompts[:b], gen_len, device, note)))
        except Exception as e:
            out.append(row(_failed("gptfast", e)))
            _free_torch(device)
        if log:
            log(f"  batch {b}: {_summary(out[-1])}")
    peer = model = None
    _free_torch(device)
    return out


def int4_peer_dtype(cfg: ModelConfig, dtype: str, device: str, group_size: int | None) -> tuple[str, str]:
    """The activation dtype the int4 peer runs in, and a note when it is not ``dtype``: torch's
    int4 kernel is probed at ``dtype`` on the K of every weight the peer quantizes; where only
    bfloat16 runs (CUDA's tinygemm takes bfloat16 activations only), the peer runs in bfloat16
    (the same bytes per weight). Raises ``Int4Unsupported`` with the reason at ``dtype`` where
    neither runs."""
    import torch

    from llamagraph.gptfast import Int4Unsupported, check_int4

    ks = [cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size]  # QKV/gate-up/LM head, O, down
    try:
        check_int4(device, getattr(torch, dtype), ks, group_size)
        return dtype, ""
    except Int4Unsupported as e:
        if dtype == "bfloat16":
            raise
        try:
            check_int4(device, torch.bfloat16, ks, group_size)
        except Int4Unsupported:
            raise e from None
        return "bfloat16", f"runs in bfloat16: at {dtype}, {e}"


def _gptfast_batch(peer, prompts, gen_len: int, device: str, note: str = "") -> Result:
    import torch

    sync = _torch_sync(device)
    ids = torch.tensor(prompts, device=device)
    batch, prompt_len = ids.shape
    peer.setup(batch, prompt_len + gen_len)

    def warm_up():  # compile and capture: cudagraph trees run a step, record it, then replay it
        tok = peer.prefill(ids)
        for _ in range(3):
            peer.decode(tok, prompt_len, 1)

    compile_s = _timed(warm_up, sync)
    prefill_s = _best(lambda: peer.prefill(ids), sync, 3)
    runs = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        first = peer.prefill(ids)
        first.tolist()  # the first token in host memory (a synchronising copy)
        t1 = time.perf_counter()
        peer.decode(first, prompt_len, gen_len - 1)
        sync()
        runs.append((t1 - t0, time.perf_counter() - t1))
    return _figures("gptfast", batch, prompt_len, gen_len, prefill_s=prefill_s, ttft_s=min(r[0] for r in runs),
                    decode_s=min(r[1] for r in runs), compile_s=compile_s if peer.compiled else None,
                    warmup_s=None if peer.compiled else compile_s, note=note)


def bench_hf(config: str, batches: list[int], prompts, gen_len: int, dtype: str, which: tuple[str, ...],
             device: str = "cuda", log=None) -> dict[str, list[Result]]:
    """HF eager (``hf``) and HF's static-cache compile path (``compile``) at each batch size, on
    one model built once (eager first: the compile path leaves its compiled forward on it)."""
    keys = [k for k in ("hf", "compile") if k in which]
    out: dict[str, list[Result]] = {}
    try:
        model = _hf_model(config, dtype, device)
    except Exception as e:
        _free_torch(device)
        return {k: [_failed(k, e) for _ in batches] for k in keys}
    for key in keys:
        out[key] = []
        for b in batches:
            try:
                out[key].append(_hf_batch(model, prompts[:b], gen_len, key, device))
            except Exception as e:
                out[key].append(_failed(key, e))
                _free_torch(device)
            if log:
                log(f"  {ENGINES[key]}, batch {b}: {_summary(out[key][-1])}")
    model = None
    _free_torch(device)
    return out


def _hf_model(config: str, dtype: str, device: str):
    import torch
    from transformers import LlamaForCausalLM

    hf_cfg = hf_peer_config(config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    # generate() fills unset fields from the model's generation config: no eos may stop a timed run
    model.generation_config.eos_token_id = None
    return model


def _hf_batch(model, prompts, gen_len: int, key: str, device: str) -> Result:
    import torch
    from transformers import GenerationConfig

    sync = _torch_sync(device)
    ids = torch.tensor(prompts, device=device)
    batch, prompt_len = ids.shape
    compiled = key == "compile"
    extra = {}
    if compiled:
        # HF's own path: a static KV cache, and generate() compiles the decode step with
        # torch.compile(mode="reduce-overhead"), which replays it as a CUDA graph.
        from transformers import CompileConfig

        extra = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")}

    def generate(n: int) -> None:
        gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, **extra)
        with torch.inference_mode():
            model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))

    # compiled: the first generate compiles and captures the decode step (at this cache length)
    first_s = _timed(lambda: generate(gen_len if compiled else 2), sync)
    prefill_s, note = _hf_prefill(model, ids, compiled, prompt_len + gen_len, sync)
    ttft = _best(lambda: generate(1), sync, 3)
    total = _best(lambda: generate(gen_len), sync, 2 if compiled else 1)  # eager: host-bound, steady
    return _figures(key, batch, prompt_len, gen_len, prefill_s=prefill_s, ttft_s=ttft, decode_s=total - ttft,
                    compile_s=first_s if compiled else None, warmup_s=None if compiled else first_s, note=note)


def _hf_prefill(model, ids, static: bool, max_len: int, sync) -> tuple[float | None, str]:
    """Seconds of one forward over the prompts with the cache generate would use (a fresh one per
    run, made outside the timing), keeping only the last position's logits as generate does."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    keep = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})

    def cache():
        if not static:
            return None  # the forward makes a DynamicCache
        from transformers import StaticCache

        # transformers 4.x takes the batch, device and dtype; 5.x sizes the cache at its first update
        sig = inspect.signature(StaticCache.__init__).parameters
        kw = {"config": model.config, "max_cache_len": max_len}
        for name, value in (("max_batch_size", ids.shape[0]), ("batch_size", ids.shape[0]),
                            ("device", ids.device), ("dtype", model.dtype)):
            if name in sig:
                kw[name] = value
        return StaticCache(**kw)

    def forward(c) -> None:
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=c, use_cache=True, **keep)

    try:
        times = []
        for _ in range(3):
            c = cache()
            times.append(_timed(lambda: forward(c), sync))
        return min(times), ""
    except Exception as e:  # the other figures still stand
        return None, f"prefill forward failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _free_torch(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch._dynamo.reset()  # drops compiled steps and their CUDA graph memory pools
        gc.collect()
        torch.cuda.empty_cache()


def _summary(r: Result) -> str:
    if r.decode_tok_s is None:
        return r.note
    return (f"{r.decode_tok_s:.1f} tok/s decode, prefill {_fmt(r.prefill_tok_s, '.0f')} tok/s, "
            f"TTFT {_fmt(r.ttft_ms, '.1f')} ms" + (f", compile {r.compile_s:.1f} s" if r.compile_s else ""))


# ---- HF configs ----------------------------------------------------------------------------------

def hf_peer_config(config: str):
    """The ``transformers.LlamaConfig`` the HF peers are built from, for the config file llamagraph
    compiles (``load_config`` picks it: config.json before params.json in a directory)."""
    from transformers import LlamaConfig

    cfg = load_config(config)
    if cfg.source == "hf":
        return LlamaConfig.from_json_file(cfg.path)  # HF's own reading of its own file
    return llama_config(cfg)


def llama_config(cfg: ModelConfig):
    """A ``transformers.LlamaConfig`` with the shapes and math of ``cfg`` (e.g. from a Meta params.json).

    The rope layout is not carried: Meta checkpoints rotate interleaved pairs where HF rotates
    halves, the same work on the same shapes, and the peers run on random weights."""
    from transformers import LlamaConfig

    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if scaling and scaling["rope_type"] == "dynamic":
        # ours records the length it rescales against; HF's dynamic rope takes max_position_embeddings
        scaling.pop("original_max_position_embeddings", None)
    # rope_theta + rope_scaling: the spelling transformers 4.x reads and 5.x converts to rope_parameters
    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_ids or None,
    )


# ---- the whole run -------------------------------------------------------------------------------

def model_summary(cfg: ModelConfig) -> dict:
    return {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab": cfg.vocab_size, "rope_type": (cfg.rope_scaling or {}).get("rope_type", "default"),
            "tied_embeddings": cfg.tie_word_embeddings}


def _versions() -> dict:
    out = {}
    for name in ("numpy", "cupy", "torch", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def check_request(config: str, *, batch: int | list[int] = 1, prompt_len: int = 128, gen_len: int = 128,
                  dtype: str = "float16", quantize: str | None = None, group_size: int | None = None,
                  tp: int = 1) -> ModelConfig:
    """The config, once the compiler has accepted the plan asked for (sizes, quantization, a rank
    count its shapes split by): a bad request is its one-line error before any GPU work."""
    from llamagraph.compiler import build_unfused, checkpoint_quantization

    cfg = load_config(config)
    quantize, group_size = checkpoint_quantization(cfg, quantize, group_size)
    build_unfused(cfg, dtype=dtype, max_batch=max([batch] if isinstance(batch, int) else batch),
                  max_seq=prompt_len + gen_len, quantize=quantize, group_size=group_size, tp=tp)
    return cfg


def bench(config: str, *, batch: int | list[int] = 1, prompt_len: int = 128, gen_len: int = 128,
          dtype: str = "float16", peers: tuple[str, ...] = PEERS, seed: int = 0, progress: bool = False,
          log=print, device: str = "cuda", quantize: str | None = None, group_size: int | None = None,
          tp: int = 1, tp1: bool = True) -> BenchReport:
    """Benchmark ``config`` on random weights at each batch size in ``batch``.

    ``quantize`` ("int8" / "int4", with int4's ``group_size``): the llamagraph plan and the
    gpt-fast-style peer quantize their weights; the unquantized llamagraph plan of each batch is
    measured beside the quantized one (module docstring).

    ``tp`` > 1: the llamagraph plan is tensor-parallel over GPUs 0 .. tp - 1 with a per-GPU floor;
    the same model at tp 1 is measured beside it unless ``tp1`` is False (its floor, the one-GPU
    rows' floor, is computed either way).

    ``device="cpu"`` runs llamagraph's reference backend and the peers uncompiled on the CPU:
    only for tests of the benchmark itself (its figures mean nothing).
    """
    batches = [batch] if isinstance(batch, int) else list(batch)
    peers = tuple(p for p in PEERS if p in peers)
    if gen_len < 2:
        raise ValueError("gen_len must be at least 2: decode is timed over the steps after the first token")
    cfg = check_request(config, batch=batches, prompt_len=prompt_len, gen_len=gen_len, dtype=dtype,
                        quantize=quantize, group_size=group_size, tp=tp)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.vocab_size, (max(batches), prompt_len)).tolist()  # batch b: the first b
    if device == "cuda":
        import cupy as cp

        bw, name = copy_bandwidth(), cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        bw, name = host_copy_bandwidth(), "cpu"
    if tp > 1:
        name = f"{tp} x {name}"
    if quantize == "int4" and group_size is None:
        from llamagraph.ir.quant import DEFAULT_GROUP_SIZE

        group_size = DEFAULT_GROUP_SIZE  # the compiler's default, named in the table
    report = BenchReport(str(config), prompt_len, gen_len, dtype, name, bw / 1e9, model_summary(cfg), list(peers),
                         quantize=quantize, group_size=group_size if quantize == "int4" else None, tp=tp)
    backend = "cuda" if device == "cuda" else "reference"
    context = prompt_len + gen_len / 2  # the mean number of cached tokens a decode step reads

    def floor(step_bytes: int, b: int) -> float:
        return b / (step_bytes / bw)

    def baseline(rep: BatchReport, engine: str, run: bool = True, scheme: str | None = None) -> None:
        """The unquantized plan, or the tp1 plan (quantized as the tp plan is), of the same shape, in
        the same run: its row (when ``run``) and its floor (the floor of the rows on one GPU)."""
        b = rep.batch
        base_graph = None
        quant = dict(quantize=scheme, group_size=group_size if scheme else None)
        if run:
            log(f"{engine_label(engine, scheme, dtype)}, batch {b}:")
            try:
                base, base_graph = bench_llamagraph(cfg, prompts[:b], gen_len, dtype, backend, progress,
                                                    engine=engine, **quant)
            except LlamagraphError as e:  # e.g. a 70B fp16 plan does not fit the GPU its int4 / tp plan runs on
                base = _failed(engine, e)
            base.label = engine_label(engine, scheme, dtype)
            rep.results.append(base)
            log(f"  {_summary(base)}")
        if base_graph is None:
            from llamagraph.compiler import compile_graph

            base_graph = compile_graph(cfg, dtype=dtype, max_batch=b, max_seq=prompt_len + gen_len, **quant)
        rep.base_step_bytes = decode_step_bytes(base_graph, cfg, b, context)
        rep.base_floor_tok_s = floor(rep.base_step_bytes, b)

    sharded = {"tp": tp} if tp > 1 else {}
    for b in batches:
        log(f"{engine_label('llamagraph', quantize, dtype, tp)}, batch {b}:")
        ours, graph = bench_llamagraph(cfg, prompts[:b], gen_len, dtype, backend, progress, quantize, group_size,
                                       **sharded)
        step_bytes = decode_step_bytes(graph, cfg, b, context)  # per GPU for a tp plan: its rank graph's
        rep = BatchReport(b, step_bytes, floor(step_bytes, b), [ours])
        log(f"  {_summary(ours)}")
        if tp > 1:  # (quantized too: against the same quantized plan on one GPU)
            baseline(rep, "llamagraph_tp1", run=tp1, scheme=quantize)
        elif quantize:
            baseline(rep, "llamagraph_unquantized")
        report.batches.append(rep)
    by_engine: dict[str, list[Result]] = {}
    if "gptfast" in peers:
        log(f"{engine_label('gptfast', quantize, dtype)}:")
        by_engine["gptfast"] = bench_gptfast(cfg, batches, prompts, gen_len, dtype, device, seed, log, quantize,
                                             group_size)
    if "hf" in peers or "compile" in peers:
        log("HF transformers:")
        by_engine.update(bench_hf(config, batches, prompts, gen_len, dtype, peers, device, log))
    for key in peers:
        for rep, r in zip(report.batches, by_engine[key]):
            rep.results.append(r)
    report.versions = _versions()
    return report
