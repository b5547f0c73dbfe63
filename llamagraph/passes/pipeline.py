"""The ordered pass pipeline. A verifier runs after every pass; ``dump_dir`` gets the IR
after each pass (``NN_<pass>.txt``) with a short note of what the pass changed, and beside it a
unified diff from the previous stage's dump (``NN_<pass>.diff``; stage 00, the build, has none)."""

from __future__ import annotations

import difflib
import os
from typing import Callable

from llamagraph.ir import Graph, verify

from .dce import dce
from .fuse_all_reduce_residual import fuse_all_reduce_residual
from .fuse_gate_up_silu import fuse_gate_up_silu
from .fuse_gemm_bias import fuse_gemm_bias
from .fuse_linear_residual import fuse_linear_residual
from .fuse_norm_prologue import fuse_norm_prologue
from .fuse_residual_rmsnorm import fuse_residual_rmsnorm
from .fuse_rope_kv_append import fuse_rope_kv_append
from .fuse_silu_mul import fuse_silu_mul
from .plan_memory import plan_memory
from .quantize_weights import quantize_weights
from .shard_tensor_parallel import shard_tensor_parallel

Pass = Callable[[Graph], Graph]

# Order matters (tests/test_passes.py pins each of these):
# - shard_tensor_parallel first: every fusion works on the rank graph (a row-parallel projection
#   is followed by its all_reduce, so the residual add no longer folds into it); it does nothing
#   unless the compiler asked for tp > 1.
# - fuse_all_reduce_residual right after it, before anything reads a residual add: it takes the
#   residual add after each all_reduce (with the projection's bias), so, as in a one-GPU graph,
#   the norms after them stay plain for fuse_norm_prologue and fuse_residual_rmsnorm finds nothing.
# - fuse_linear_residual first: it takes every residual add fed by a projection (with its bias),
#   so the norms after them stay plain and can move into the next GEMV's prologue.
# - fuse_residual_rmsnorm before fuse_gemm_bias: where a residual add is left (linear_residual
#   switched off), the residual+norm fusion takes the o_proj/down biases into add_rmsnorm;
#   fuse_gemm_bias then folds the remaining ones (qkv, gate, up) into their GEMMs. The other way
#   round, o_proj/down would keep a bias epilogue of their own.
# - fuse_silu_mul before fuse_gate_up_silu: the gate/up fusion matches silu_mul, not silu + mul.
# - fuse_gemm_bias before fuse_gate_up_silu: the biased gate/up pattern reads biased GEMMs.
# - fuse_norm_prologue after fuse_gate_up_silu and fuse_rope_kv_append: it matches the norms
#   under gate_up_silu and under qkv_gemm -> rope_kv_append.
# - dce after the fusions (they leave the separate gate/up weights unread).
# - quantize_weights after the fusions and dce: it quantizes the fused weights whole, and only
#   weights still read; it does nothing unless the compiler asked for quantization.
# - plan_memory last.
PIPELINE: list[Pass] = [
    shard_tensor_parallel,
    fuse_all_reduce_residual,
    fuse_linear_residual,
    fuse_residual_rmsnorm,
    fuse_gemm_bias,
    fuse_silu_mul,
    fuse_gate_up_silu,
    fuse_rope_kv_append,
    fuse_norm_prologue,
    dce,
    quantize_weights,
    plan_memory,
]
FUSION_PASSES = [p.__name__ for p in PIPELINE if p.__name__.startswith("fuse_")]
PASS_NAMES = [p.__name__ for p in PIPELINE]


def change_note(before: Graph, after: Graph) -> str:
    """One line per op whose count changed, e.g. ``rmsnorm 45 -> 1``; or 'no change'."""
    a, b = before.op_counts(), after.op_counts()
    lines = [f"{op}: {a.get(op, 0)} -> {b.get(op, 0)}" for op in sorted(set(a) | set(b)) if a.get(op, 0) != b.get(op, 0)]
    dv = len(after.values) - len(before.values)
    if dv:
        lines.append(f"values: {len(before.values)} -> {len(after.values)}")
    if "memory" in after.meta and "memory" not in before.meta:
        mem = after.meta["memory"]
        lines.append(f"arena {mem['arena_bytes']} bytes, lower bound {mem['lower_bound_bytes']} bytes, {mem['buffers']} buffers")
    return "\n".join(lines) or "no change"


def run_pipeline(graph: Graph, passes: list[str] | None = None, dump_dir: str | None = None) -> Graph:
    """Run the named passes (default: all) in pipeline order, verifying after each."""
    selected = PIPELINE if passes is None else [p for p in PIPELINE if p.__name__ in passes]
    unknown = set(passes or []) - set(PASS_NAMES)
    if unknown:
        raise ValueError(f"unknown pass(es) {sorted(unknown)}; passes are {PASS_NAMES}")
    verify(graph, "build")
    previous = None  # (file name, text) of the last stage dumped
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        previous = _dump(dump_dir, 0, "build", graph, "the unfused graph from the builder", None)
    for k, p in enumerate(selected, 1):
        after = p(graph)
        verify(after, p.__name__)
        if dump_dir:
            previous = _dump(dump_dir, k, p.__name__, after, change_note(graph, after), previous)
        graph = after
    graph.meta["passes"] = [p.__name__ for p in selected]
    return graph


def _dump(dump_dir: str, k: int, name: str, graph: Graph, note: str,
          previous: tuple[str, str] | None) -> tuple[str, str]:
    """Write ``NN_<name>.txt`` and, after a previous stage, ``NN_<name>.diff``; return (file name, text)."""
    stem = f"{k:02d}_{name}"
    text = f"# after {name}\n# " + note.replace("\n", "\n# ") + "\n\n" + str(graph)
    if not text.endswith("\n"):
        text += "\n"  # a unified diff of a last line without a newline would not apply
    with open(os.path.join(dump_dir, f"{stem}.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    if previous is not None:
        # whole files, labelled with their names: `patch -o - PREV.txt NN_<name>.diff` gives this dump
        prev_file, prev_text = previous
        diff = difflib.unified_diff(prev_text.splitlines(keepends=True), text.splitlines(keepends=True),
                                    fromfile=prev_file, tofile=f"{stem}.txt")
        with open(os.path.join(dump_dir, f"{stem}.diff"), "w", encoding="utf-8") as f:
            f.writelines(diff)
    return f"{stem}.txt", text
