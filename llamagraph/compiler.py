"""The compiler: config -> graph -> passes -> lowerings -> a checked ``CompiledPlan``.

This module only orchestrates: the IR builds the graph, ``passes`` rewrite and plan it,
``codegen`` lowers every node and holds the plan type. Executors (``llamagraph.runtime``) take
the result and never call back in here.
"""

from __future__ import annotations

import numbers
import os

from llamagraph.codegen.compiled import CompiledPlan
from llamagraph.codegen.launch import ADVANCE, DECODE_GREEDY
from llamagraph.codegen.lowering import lower_graph
from llamagraph.codegen.render import module_source
from llamagraph.ir import ConfigError, Graph, ModelConfig, build_graph, load_config
from llamagraph.ir.dtypes import FLOAT_DTYPES
from llamagraph.ir.quant import DEFAULT_GROUP_SIZE, SCHEMES as QUANT_SCHEMES
from llamagraph.passes import PASS_NAMES, run_pipeline
from llamagraph.passes.shard_tensor_parallel import check_tp

BUILD = "build"  # the stage name of the unfused graph, before any pass


def stage_names() -> list[str]:
    """The stages a graph can be dumped after, in order: ``build`` then every pass."""
    return [BUILD, *PASS_NAMES]


def positive_int(name: str, value) -> int:
    """``value`` as a plain int (numpy integers too), or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def quantize_spec(quantize: str | None, group_size: int | None) -> dict | None:
    """The checked quantization request (``graph.meta["quantize"]``), or None for none."""
    if quantize is None:
        return None
    if not isinstance(quantize, str) or quantize not in QUANT_SCHEMES:
        raise ConfigError(f"quantize {quantize!r} is not one of {', '.join(QUANT_SCHEMES)} (or None)")
    if quantize == "int8":
        return {"scheme": "int8"}
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    elif group_size != -1:  # -1: one group per row (G = K of each weight), as GPTQ writes it
        group_size = positive_int("group_size", group_size)
    return {"scheme": "int4", "group_size": int(group_size)}


def checkpoint_quantization(cfg: ModelConfig, quantize: str | None, group_size: int | None) -> tuple:
    """(quantize, group_size) for ``cfg``: a GPTQ / AWQ checkpoint is int4 with its own group size."""
    q = getattr(cfg, "quantization", None)
    if not q:
        return quantize, group_size
    if quantize not in (None, "int4"):
        raise ConfigError(f"quantize {quantize!r}: this checkpoint is {q['method']} int4 (config.json "
                          "quantization_config); it loads as int4 only")
    if group_size is not None and group_size != q["group_size"]:
        raise ConfigError(f"group_size {group_size}: this checkpoint's quantization_config.group_size is "
                          f"{q['group_size']}")
    return "int4", q["group_size"]


def build_unfused(cfg: ModelConfig, *, dtype: str = "float16", max_batch: int = 1, max_seq: int | None = None,
                  max_tokens: int | None = None, quantize: str | None = None, group_size: int | None = None,
                  tp: int = 1) -> Graph:
    """Check the sizes, fill their defaults (the one place that decides them), build the graph."""
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    max_batch = positive_int("max_batch", max_batch)
    max_seq = min(cfg.max_position_embeddings, 4096) if max_seq is None else positive_int("max_seq", max_seq)
    if max_tokens is None:
        max_tokens = min(max_batch * max_seq, 4096)
    else:
        max_tokens = positive_int("max_tokens", max_tokens)
        if max_tokens > max_batch * max_seq:
            raise ConfigError(f"max_tokens {max_tokens} exceeds max_batch * max_seq = {max_batch * max_seq}, "
                              "the most tokens the KV caches can take in one step")
    spec = quantize_spec(quantize, group_size)
    tp = positive_int("tp", tp)
    if tp > 1:
        check_tp(cfg.to_dict(), tp)
        if getattr(cfg, "quantization", None):
            raise ConfigError(f"tp {tp}: this checkpoint is {cfg.quantization['method']} int4 (config.json "
                              "quantization_config); its packed weights are not sharded yet: use tp 1, or quantize "
                              "a float checkpoint at compile time")
    graph = build_graph(cfg, dtype=dtype, max_batch=max_batch, max_seq=max_seq, max_tokens=max_tokens)
    if spec:
        q = getattr(cfg, "quantization", None)
        if q:  # a GPTQ / AWQ checkpoint keeps its LM head in float unless it says otherwise
            spec["lm_head"] = bool(q.get("lm_head"))
        graph.meta["quantize"] = spec  # read by the quantize_weights pass
    if tp > 1:
        graph.meta["tp"] = tp  # read by the shard_tensor_parallel pass and the executors
    return graph


def compile_graph(cfg: ModelConfig, *, dtype: str = "float16", max_batch: int = 1, max_seq: int | None = None,
                  max_tokens: int | None = None, passes: list[str] | None = None, dump_dir: str | None = None,
                  keep_values: bool = False, quantize: str | None = None, group_size: int | None = None,
                  tp: int = 1) -> Graph:
    """Build the unfused graph and run the pass pipeline (DCE and the memory planner always run).

    keep_values: give every activation its own arena buffer (no reuse), so any intermediate
    can be fetched after a step; costs memory, meant for debugging (``llamagraph.bisect``).
    """
    quantize, group_size = checkpoint_quantization(cfg, quantize, group_size)
    graph = build_unfused(cfg, dtype=dtype, max_batch=max_batch, max_seq=max_seq, max_tokens=max_tokens,
                          quantize=quantize, group_size=group_size, tp=tp)
    if keep_values:
        graph.meta["keep_values"] = True  # read by plan_memory
    if passes is not None:
        passes = ["shard_tensor_parallel"] + check_passes(passes) + ["dce", "quantize_weights", "plan_memory"]
    return run_pipeline(graph, passes, dump_dir)


def check_passes(passes) -> list[str]:
    """``passes`` as a list of known pass names (a lone string is refused, not read letter by letter)."""
    if isinstance(passes, str) or not isinstance(passes, (list, tuple)):
        raise ConfigError(f"passes must be a list of pass names, got {passes!r}; passes are {', '.join(PASS_NAMES)}")
    for name in passes:
        if name not in PASS_NAMES:
            raise ConfigError(f"unknown pass {name!r}; passes are {', '.join(PASS_NAMES)}")
    return list(passes)


def graph_after(model, after: str | None = None, **sizes) -> Graph:
    """The IR after the named stage (``build`` or a pass name; default: the last pass)."""
    names = stage_names()
    after = after or names[-1]
    if after not in names:
        raise ValueError(f"unknown pass {after!r}; valid names: {', '.join(names)}")
    unfused = build_unfused(load_config(model), **sizes)
    if after == BUILD:
        return unfused
    return run_pipeline(unfused, PASS_NAMES[: PASS_NAMES.index(after) + 1])


def lower(graph: Graph, model: str | None = None) -> CompiledPlan:
    """Lower a planned graph into a checked plan: kernels, launch lists, workspaces."""
    low = lower_graph(graph)
    # advance: replayed behind decode (or decode_greedy)
    captured = tuple(p for p in ("decode", DECODE_GREEDY, ADVANCE) if p in low.phases)
    plan = CompiledPlan(graph=graph, source=module_source(low.kernels), kernels=[k.name for k in low.kernels],
                        workspaces=low.workspaces, phases=low.phases, captured=captured, model=model)
    plan.check()  # consistent, and every captured phase graph-safe
    return plan


def compile_plan(model, *, dtype: str = "float16", max_batch: int = 1, max_seq: int | None = None,
                 max_tokens: int | None = None, passes: list[str] | None = None,
                 dump_dir: str | None = None, keep_values: bool = False, quantize: str | None = None,
                 group_size: int | None = None, tp: int = 1) -> CompiledPlan:
    """Config (path, checkpoint directory, dict or ModelConfig) -> a checked ``CompiledPlan``."""
    if not isinstance(model, (str, os.PathLike, dict, ModelConfig)):
        raise ConfigError(f"model must be a config path, a checkpoint directory or a config dict, got {model!r}")
    cfg = load_config(model)
    graph = compile_graph(cfg, dtype=dtype, max_batch=max_batch, max_seq=max_seq, max_tokens=max_tokens,
                          passes=passes, dump_dir=dump_dir, keep_values=keep_values, quantize=quantize,
                          group_size=group_size, tp=tp)
    source = os.path.abspath(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else None
    return lower(graph, source)
