"""``llamagraph bench``: decode speed against the bandwidth floor and PyTorch peers.

Batch-``B`` decode is bound by memory bandwidth: one step must read every weight it uses
once plus the KV cache of every sequence. The floor for a step is those bytes over the
device-to-device copy bandwidth measured in the same run (bytes read + written / time).
Peers run in the same process on the same random-weight shape: HF transformers eager, and
HF with a static cache under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). They are
built from an HF ``config.json`` as transformers reads it, or, for a Meta ``params.json``, from
the equivalent ``LlamaConfig`` of llamagraph's own parsed config (``hf_peer_config``).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np

from llamagraph.ir import KV_CACHE, WEIGHT, Graph, ModelConfig, load_config


@dataclass
class Result:
    name: str
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_step: float
    note: str = ""


@dataclass
class BenchReport:
    config: str
    batch: int
    prompt_len: int
    gen_len: int
    dtype: str
    device: str
    copy_gb_s: float
    step_bytes: int
    floor_tok_s: float
    results: list[Result] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"{self.config}: batch {self.batch}, prompt {self.prompt_len}, {self.gen_len} new tokens, {self.dtype}, {self.device}",
            f"copy bandwidth {self.copy_gb_s:.0f} GB/s; one decode step reads {self.step_bytes / 1e9:.3f} GB "
            f"-> floor {self.floor_tok_s:.1f} tok/s",
            f"{'engine':<28} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>9} {'% floor':>8} {'vs HF eager':>12}",
        ]
        eager = next((r for r in self.results if r.name == "HF eager"), None)
        for r in self.results:
            pct = 100 * r.decode_tok_s / self.floor_tok_s if r.decode_tok_s else float("nan")
            ratio = f"{r.decode_tok_s / eager.decode_tok_s:.2f}x" if eager and r.decode_tok_s and eager.decode_tok_s else "-"
            lines.append(f"{r.name:<28} {r.prefill_tok_s:>14.0f} {r.decode_tok_s:>13.1f} {r.ms_per_step:>9.3f} "
                         f"{pct:>7.1f}% {ratio:>12}" + (f"  ({r.note})" if r.note else ""))
        return "\n".join(lines)


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


def decode_step_bytes(graph: Graph, cfg: ModelConfig, batch: int, context: float) -> int:
    """Bytes one decode step must read: every weight once (the embedding table only for the
    rows it gathers, unless tied to the LM head) plus ``context`` cached tokens per sequence."""
    total = 0
    embed_read_whole = cfg.tie_word_embeddings
    for v in graph.values.values():
        if v.kind == WEIGHT:
            if v.role == "embedding_table" and not embed_read_whole:
                total += batch * v.nbytes(graph.dims) // v.shape[0]
            else:
                total += v.nbytes(graph.dims)
    # every layer's K and V cache: [max_batch, max_seq, KV, D]; a token's row is nbytes / (max_batch * max_seq)
    caches = [v for v in graph.values.values() if v.kind == KV_CACHE and "alias" not in v.attrs]
    per_token = sum(v.nbytes(graph.dims) // (v.shape[0] * v.shape[1]) for v in caches)
    return int(total + batch * context * per_token)


def _sync_time(fn) -> float:
    import cupy as cp

    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    fn()
    cp.cuda.Device().synchronize()
    return time.perf_counter() - t


def bench_llamagraph(cfg: ModelConfig, prompts, gen_len: int, dtype: str, progress: bool):
    import llamagraph

    batch = len(prompts)
    plan = llamagraph.compile(cfg, "random", dtype=dtype, max_batch=batch, max_seq=len(prompts[0]) + gen_len,
                              backend="cuda", progress=progress)
    plan.generate(prompts, 4)  # warm up: module load, first capture
    plan.reset()
    prefill = min(_sync_time(lambda: (plan.reset(), plan.run(prompts))) for _ in range(3))
    total = min(_sync_time(lambda: plan.generate(prompts, gen_len)) for _ in range(2))
    decode = max(total - prefill, 1e-9)
    res = Result("llamagraph (CUDA graphs)", batch * len(prompts[0]) / prefill, batch * (gen_len - 1) / decode,
                 1e3 * decode / (gen_len - 1))
    graph = plan.graph
    plan = None  # free the GPU memory before the peers run
    gc.collect()
    return res, graph


def bench_hf(config: str, prompts, gen_len: int, dtype: str, compiled: bool) -> Result:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tdtype = getattr(torch, dtype)
    hf_cfg = hf_peer_config(config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    ids = torch.tensor(prompts, device="cuda")
    gen = GenerationConfig(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    name = "HF eager"
    if compiled:
        # HF's own path: a static KV cache, and generate() compiles the decode step with
        # torch.compile(mode="reduce-overhead"), which replays it as a CUDA graph.
        from transformers import CompileConfig

        name = "torch.compile + CUDA graphs"
        gen.cache_implementation = "static"
        gen.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")

    def run(n_new):
        g = GenerationConfig(**{**gen.to_dict(), "max_new_tokens": n_new, "min_new_tokens": n_new})
        with torch.inference_mode():
            model.generate(ids, generation_config=g, attention_mask=torch.ones_like(ids))
        torch.cuda.synchronize()

    for _ in range(2 if compiled else 1):  # compile / warm up both the prefill and decode shapes
        run(gen_len)
    t = time.perf_counter()
    run(1)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    run(gen_len)
    total = time.perf_counter() - t
    decode = max(total - prefill, 1e-9)
    batch = len(prompts)
    res = Result(name, batch * len(prompts[0]) / prefill, batch * (gen_len - 1) / decode, 1e3 * decode / (gen_len - 1))
    model = None
    gc.collect()
    torch.cuda.empty_cache()
    return res


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


def bench(config: str, *, batch: int = 1, prompt_len: int = 128, gen_len: int = 128, dtype: str = "float16",
          peers: tuple[str, ...] = ("hf", "compile"), seed: int = 0, progress: bool = False, log=print) -> BenchReport:
    import cupy as cp

    cfg = load_config(config)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    bw = copy_bandwidth()
    ours, graph = bench_llamagraph(cfg, prompts, gen_len, dtype, progress)
    step_bytes = decode_step_bytes(graph, cfg, batch, prompt_len + gen_len / 2)
    report = BenchReport(config, batch, prompt_len, gen_len, dtype, cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                         bw / 1e9, step_bytes, batch / (step_bytes / bw), [ours])
    log(f"  llamagraph: {ours.decode_tok_s:.1f} tok/s decode")
    for peer in peers:
        try:
            r = bench_hf(config, prompts, gen_len, dtype, compiled=(peer == "compile"))
        except Exception as e:  # a peer failing must not hide our numbers; say why in the table
            r = Result({"hf": "HF eager", "compile": "torch.compile + CUDA graphs"}[peer], 0.0, 0.0, 0.0,
                       f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
        report.results.append(r)
        log(f"  {r.name}: {r.decode_tok_s:.1f} tok/s decode")
    return report
