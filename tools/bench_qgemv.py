"""The decode GEMVs of one layer, each alone with its weights cold in L2: the streaming rate of every GEMV
kernel of a plan (its own source, grid and arguments, as the plan launches it), per tuning_ab variant,
so a kernel change reads as GB/s of that kernel rather than as a whole decode step.

    python tools/bench_qgemv.py CONFIG QUANTS VARIANTS [--layer L]
    python tools/bench_qgemv.py examples/llama-2-7b.json int4,none base,ct16,noalu,tpf0

QUANTS: comma-separated none | int8 | int4 (G 128); VARIANTS: tools/tuning_ab.py's (applied to the
quantized plans; the 16-bit plan ("none") runs base only). For each GEMV launch of decode layer L and
the LM head it prints the time a launch takes, the bytes of its weight arguments (codes, scales, zeros,
norm weight, bias: what it must stream), that as GB/s and as % of a device copy measured in the same
run. Each launch is timed in a CUDA graph that cycles over enough copies of the weights that none is
still in L2 when read again (ROTATE_BYTES), two ways: launched one after another ("serial": each kernel's
ramp and tail in the figure), and with programmatic dependent launch as the plan launches them ("pdl":
the next launch's blocks start during this one's tail, as in a decode step) where the machine allows.
Non-weight buffers hold 0.5 (16-bit), 0 (the rest); weights random bits of their dtype's range. Not a
test: the numbers only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import numpy as np

from llamagraph.codegen.launch import Launch
from llamagraph.codegen.nvrtc import kernel_spans
from llamagraph.codegen.render import prelude
from llamagraph.ir import WEIGHT

ROTATE_BYTES = 256 << 20  # weights cycled per launch: far more than the 50 MB L2
DECODE = {"T": 1, "B": 1}  # the step scalars of a batch-1 decode step
HALF = {"float16": 0x3800, "bfloat16": 0x3F00}  # 0.5 as the raw 16-bit word
# 16-bit weights: raw words first .. first + span - 1, the positive numbers 2^-8 .. 0.5 of either dtype
WEIGHT_WORDS = {"float16": (0x1C00, 0x1C00), "bfloat16": (0x3B80, 0x0380)}


def gemv_launches(plan, layer: int) -> list[tuple[str, Launch]]:
    """(label, launch) of every GEMV the batch-1 decode step launches for ``layer``, then the LM head's
    (outside the layers); label = the fused op's name."""
    g = plan.graph
    out = []
    for la in plan.phases["decode"]:
        if la.kind != "kernel" or not la.fn.startswith("gemv_") or not la.runs(DECODE):
            continue
        node = g.nodes[la.node]
        if node.layer == layer or node.layer is None:
            out.append((node.op if node.layer == layer else f"{node.op} (head)", la))
    if not any(label.endswith("(head)") for label, _ in out):
        raise SystemExit("bench_qgemv: the plan's decode step has no LM head GEMV")
    return out


def kernel_source(plan, names: set[str]) -> str:
    """The prelude and the named kernels of the plan's source (each with the helpers it defines)."""
    spans = kernel_spans(plan.source)
    if spans is None or len(spans) != len(plan.kernels):
        raise SystemExit("bench_qgemv: the plan's source is not the prelude followed by its kernels")
    return prelude() + "".join(plan.source[a:b] for name, (a, b) in zip(plan.kernels, spans) if name in names)


def _fill(xp, v, nbytes: int, rng, weight: bool):
    """A device buffer of ``nbytes`` for value ``v``: weights random in their dtype's range (codes any
    byte, 16-bit floats small and finite), other 16-bit floats 0.5, everything else 0."""
    if weight and v.dtype in ("int8", "int4", "uint8"):
        return xp.asarray(rng.integers(0, 256, nbytes, dtype=np.uint8))
    if v.dtype in WEIGHT_WORDS:
        n = nbytes // 2
        if weight:
            first, span = WEIGHT_WORDS[v.dtype]
            return xp.asarray((first + rng.integers(0, span, n)).astype(np.uint16))
        return xp.full(n, HALF[v.dtype], dtype=xp.uint16)
    return xp.zeros(nbytes, dtype=xp.uint8)


def _another(xp, v, arr, i: int):
    """Copy i of a weight buffer made by _fill: its numbers moved within the same range (on the device,
    where arr is; one random draw a launch shape, not one a copy)."""
    if arr.dtype == xp.uint8:
        return (arr + np.uint8(i * 37 % 256)).astype(xp.uint8)
    first, span = WEIGHT_WORDS[v.dtype]
    return (first + (arr - first + i * 37) % span).astype(xp.uint16)


def weight_bytes(plan, launch: Launch) -> int:
    """The bytes of the weight arguments of ``launch``: what one launch must stream."""
    g = plan.graph
    dims = defaultdict(lambda: 1, DECODE)
    return sum(g.values[a.ref].nbytes(dims) for a in launch.args if a.kind == "value" and g.values[a.ref].kind == WEIGHT)


def launch_buffers(plan, launch: Launch, copies: int, xp=np, seed: int = 0) -> list[list]:
    """The arguments of ``launch`` for ``copies`` launches, each launch's weights its own copy: value
    arguments as (array, offset) pairs (``pointer`` makes the address), step scalars and int constants
    as ints, f32 constants as np.float32, nulls as np.uint64(0)."""
    g = plan.graph
    rng = np.random.default_rng(seed)
    dims = defaultdict(lambda: 1, DECODE)
    shared: dict[str, object] = {}
    per_copy = [[] for _ in range(copies)]
    for a in launch.args:
        if a.kind == "value":
            v = g.values[a.ref]
            n = v.nbytes(dims)
            if v.kind == WEIGHT:
                first = _fill(xp, v, n, rng, True)
                arrays = [first] + [_another(xp, v, first, i) for i in range(1, copies)]
            else:
                if a.ref not in shared:
                    shared[a.ref] = _fill(xp, v, max(n, a.offset + 16), rng, False)
                arrays = [shared[a.ref]] * copies
            for i in range(copies):
                per_copy[i].append((arrays[i], a.offset))
        elif a.kind == "workspace":
            if a.ref not in shared:
                shared[a.ref] = xp.zeros(plan.workspace(a.ref).nbytes, dtype=xp.uint8)
            for i in range(copies):
                per_copy[i].append((shared[a.ref], 0))
        elif a.kind == "step":
            for i in range(copies):
                per_copy[i].append(int(DECODE[a.ref]))
        elif a.kind == "const":
            c = np.float32(a.ref) if a.type == "f32" else int(a.ref)
            for i in range(copies):
                per_copy[i].append(c)
        elif a.kind == "null":
            for i in range(copies):
                per_copy[i].append(np.uint64(0))
        else:
            raise SystemExit(f"bench_qgemv: argument kind {a.kind!r} of {launch.fn}")
    return per_copy


def pointer(arg):
    """A launch argument: (array, offset) -> np.uint64 address; anything else as is."""
    if isinstance(arg, tuple):
        arr, offset = arg
        return np.uint64(arr.data.ptr + offset)
    return arg


def copies_for(weight_bytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // max(1, weight_bytes)))


def launcher(cp, fn, shape, args, early: bool):
    """launch(i): ``fn`` on argument copy i, on the current stream (bench_gemv.time_graph's), with
    programmatic dependent launch where ``early``."""
    from llamagraph.runtime.calls import launch_kernel, launch_kernel_early

    if early:
        return lambda i: launch_kernel_early(fn, shape, args[i], cp.cuda.get_current_stream())
    return lambda i: launch_kernel(fn, shape, args[i])


def bench_plan(cp, plan, layer: int, tag: str, copy_bw: float, early_ok: bool, arch: str) -> None:
    from bench_gemv import time_graph

    from llamagraph.runtime.cuda import load_module

    chosen = gemv_launches(plan, layer)
    module = load_module(kernel_source(plan, {la.fn for _, la in chosen}), arch)
    for label, la in chosen:
        moved = weight_bytes(plan, la)
        buffers = launch_buffers(plan, la, copies_for(moved), xp=cp)
        args = [[pointer(a) for a in one] for one in buffers]
        shape = la.shape.at(DECODE)
        fn = module.get_function(la.fn)
        cols = []
        for early in (False, True) if early_ok else (False,):
            sec = time_graph(launcher(cp, fn, shape, args, early), len(args))
            gbs = moved / sec / 1e9
            cols.append(f"{'pdl' if early else 'serial'} {sec * 1e6:7.2f} us {gbs:7.1f} GB/s {100 * gbs * 1e9 / copy_bw:5.1f}%")
        print(f"{tag:22s} {label:28s} {moved / 1e6:7.2f} MB  " + "  ".join(cols), flush=True)
        del args, buffers
        cp.get_default_memory_pool().free_all_blocks()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("quants")
    ap.add_argument("variants")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--dtype", default="float16")
    opts = ap.parse_args(argv)
    import cupy as cp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gemv import copy_bandwidth
    from block_timeline import apply_variant

    import llamagraph
    from llamagraph.runtime.calls import early_launch_supported

    dev = cp.cuda.Device()
    cc = dev.compute_capability
    arch = f"sm_{cc}"
    early_ok = early_launch_supported(cc)
    copy_bw = copy_bandwidth()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    print(f"{name}: copy bandwidth {copy_bw / 1e9:.0f} GB/s; pdl {'on' if early_ok else 'off (serial only)'}; "
          f"layer {opts.layer}", flush=True)
    for quant in opts.quants.split(","):
        q = None if quant == "none" else quant
        for variant in opts.variants.split(",") if q else ["base"]:
            apply_variant(variant)
            plan = llamagraph.compile_plan(opts.config, dtype=opts.dtype, max_batch=1, max_seq=512, quantize=q,
                                           group_size=128 if q == "int4" else None)
            bench_plan(cp, plan, opts.layer, f"{quant} {variant}", copy_bw, early_ok, arch)
    apply_variant("base")


if __name__ == "__main__":
    main(sys.argv[1:])
