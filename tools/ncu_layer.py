"""Nsight Compute on one decoder layer of a decode step: every kernel of layer LAYER (qkv, attention,
o_proj, gate/up, down) profiled with the full section set, so a GEMV's warp stall reasons, memory
throughput and per-instruction samples can be read beside the block timelines (block_timeline.py).

    python tools/ncu_layer.py CONFIG QUANT [LAYER] [OUT_DIR]
    python tools/ncu_layer.py examples/llama-2-7b.json int4 10 out
    python tools/ncu_layer.py examples/llama-2-7b.json none 10 out     (the fp16 plan, for comparison)

QUANT: none | int8 | int4 (G 128). Writes OUT_DIR/ncu_<model>_<quant>_l<LAYER>.txt (ncu's details page,
then its raw page: every metric as CSV, the warp stall breakdown among them) and .source.csv (per-SASS-
instruction samples, where this ncu prints them); the report itself (.ncu-rep) stays in NCU_REPORTS
(default /tmp/ncu_reports: two files a run keep a device call's $OUT within its file count). Prints the
details page's stall and throughput lines.

How: the plan is lowered here without a GPU to find which launches of the decode phase belong to
LAYER (the launch index of its first kernel among the launches of the same kernels, ncu's
--launch-skip). Then ncu runs this script with --step: it compiles the plan on the GPU with random
weights, prefills a 128-token prompt outside the profiled range, and runs one decode step inside
it (the step's first run launches every kernel once, eagerly, before capturing the graph, so those
launches come first and in the phase's order). ncu serializes kernels and flushes the caches before
each (its defaults), so a kernel's PDL overlap with its neighbours is not in these figures and its
weights come from HBM as in a real step; clocks are left as they run (--clock-control none).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

PLAN_ARGS = dict(dtype="float16", max_batch=1, max_seq=256)
PROMPT = 128
DECODE = {"T": 1, "B": 1}  # one token of one sequence: the scalars of a batch-1 decode step


def plan_kwargs(quant: str) -> dict:
    q = None if quant == "none" else quant
    return dict(PLAN_ARGS, quantize=q, group_size=128 if q == "int4" else None)


@dataclass(frozen=True)
class LayerSpec:
    """What ncu must select: kernels named in ``names`` (a regex of exactly those), skipping ``skip``
    of their launches and profiling ``count``: the decode step's launches of layer ``layer``."""

    layer: int
    names: tuple[str, ...]  # the layer's kernels in launch order
    skip: int
    count: int

    @property
    def regex(self) -> str:
        return "regex:^(" + "|".join(re.escape(n) for n in sorted(set(self.names))) + ")$"


def layer_spec(plan, layer: int) -> LayerSpec:
    """The selection for ``layer`` in the eager decode launches of a lowered plan (CompiledPlan)."""
    g = plan.graph
    launches = [la for la in plan.phases["decode"] if la.runs(DECODE)]
    layers = sorted({g.nodes[la.node].layer for la in launches if g.nodes[la.node].layer is not None})
    if layer not in layers:
        raise SystemExit(f"ncu_layer: layer {layer} is not in the plan (layers {layers[0]}..{layers[-1]})")
    mine = [i for i, la in enumerate(launches) if g.nodes[la.node].layer == layer]
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise SystemExit(f"ncu_layer: layer {layer}'s launches are not contiguous in the decode phase")
    names = tuple(launches[i].fn for i in mine)
    skip = sum(1 for la in launches[: mine[0]] if la.fn in names)
    return LayerSpec(layer, names, skip, len(mine))


def ncu_command(spec: LayerSpec, report: str, config: str, quant: str, ncu: str = "ncu") -> list[str]:
    return [ncu, "--profile-from-start", "off", "--kernel-name", spec.regex, "--launch-skip", str(spec.skip),
            "--launch-count", str(spec.count), "--set", "full", "--import-source", "no", "--clock-control", "none",
            "--target-processes", "all", "-f", "-o", report,
            sys.executable, os.path.abspath(__file__), "--step", config, quant]


def step(config: str, quant: str) -> None:
    """The profiled process: prefill outside the profiler's range, one decode step inside it."""
    import cupy as cp

    import llamagraph
    from llamagraph.ir import load_config

    cfg = load_config(config)
    plan = llamagraph.compile(cfg, "random", backend="cuda", **plan_kwargs(quant))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, PROMPT)).tolist()
    plan.run(prompt)
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.profiler.start()
    plan.run([[7]])
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.profiler.stop()


def main(argv: list[str]) -> None:
    from llamagraph.compiler import compile_plan

    config, quant = argv[0], argv[1]
    layer = int(argv[2]) if len(argv) > 2 else 10
    out = argv[3] if len(argv) > 3 else "."
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("ncu_layer: no ncu on PATH (Nsight Compute)")
    spec = layer_spec(compile_plan(config, **plan_kwargs(quant)), layer)
    reports = os.environ.get("NCU_REPORTS", "/tmp/ncu_reports")
    os.makedirs(out, exist_ok=True)
    os.makedirs(reports, exist_ok=True)
    stem = f"ncu_{os.path.splitext(os.path.basename(config))[0]}_{quant}_l{layer}"
    report = os.path.join(reports, stem)
    print(f"{config} {quant}: layer {layer}: {spec.count} kernels {list(spec.names)}, skipping {spec.skip} launches",
          flush=True)
    subprocess.run(ncu_command(spec, report, config, quant, ncu), check=True)

    def page(*args: str) -> str:
        done = subprocess.run([ncu, "--import", report + ".ncu-rep", *args], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else f"ncu {' '.join(args)} failed: {done.stderr[-2000:]}\n"

    details = page("--page", "details")
    with open(os.path.join(out, stem + ".txt"), "w") as f:
        f.write(details + "\n# ---- raw page (CSV) ----\n" + page("--page", "raw", "--csv"))
    with open(os.path.join(out, stem + ".source.csv"), "w") as f:
        f.write(page("--page", "source", "--csv", "--print-source", "sass"))
    keep = re.compile(r"^\s*(gemv_|attn_|Duration|DRAM Throughput|Memory Throughput|L2 Hit Rate|Achieved Occupancy|"
                      r"Registers Per Thread|Warp Cycles Per Issued|Issued Ipc|.*[Ss]tall)")
    for line in details.splitlines():
        if keep.match(line):
            print(line)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--step"]:
        step(*sys.argv[2:4])
    else:
        main(sys.argv[1:])
