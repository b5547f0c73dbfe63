"""Block timeline of one captured decode step: when every block of every launch starts, passes its
PDL wait (lg_pdl_wait) and ends, on the GPU's global timer, so the boundaries between kernels
(early-launched blocks, the wait's release after the kernel before ends, the tail of the last
wave) can be read as times, not inferred from replay totals.

    python tools/block_timeline.py CONFIG QUANT [OUT_DIR] [LAYERS] [--variant V]
    python tools/block_timeline.py examples/llama-3-8b.json int4 out
    python tools/block_timeline.py examples/llama-2-7b.json none out 1,2,3
    python tools/block_timeline.py examples/llama-2-7b.json int4 out --variant lcn

--variant V: the plan's kernels as tools/tuning_ab.py's variant V patches them (its npz is named for it),
to see where a variant's time goes, not only its tok/s.

How: the executor's module is compiled from a traced copy of the plan's source (the plan itself is
untouched): every kernel's body opens with an RAII recorder whose constructor, in thread 0 of each
block, reads the start time, then takes a record slot (one atomic) and stores them with the SM and
block index (the tables in docs/profiles/timeline_h100.txt read the time after the atomic, so their
starts include its L2 round trip, ~0.5 us), and whose
destructor stores thread 0's end time; lg_pdl_wait stores the time its wait returned. The decode
graph is replayed a few times, then once more with the records cleared. Records are matched to the
step's launches by kernel and start order (two launches of one kernel always have another between
them, so every block of the first starts before any of the second). The recorder costs a few
instructions and one atomic a block, so the figures are of a slightly heavier step than the real one.

Prints, per op position in a layer (mean over LAYERS, default all but the first and last):
  blocks        the launch's grid
  early         blocks that started before the launch before it had ended (programmatic dependent launch)
  release us    first block past its wait, after the launch before it ended (the wait's release latency)
  body us       last block's end after the wait's first release
  tail us       last block's end after the median block's end (the last wave's share)
  busy %        SMs holding a block past its wait, sampled over the body, of all SMs
and the step's total and the sum of the gaps (release latencies). Writes OUT_DIR/timeline_<name>.npz
with every record (launch index, block, SM, start, wait, end in ns from the step's first start) and
each launch's kernel, op and decoder layer (-1 outside the layers).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

import llamagraph
from llamagraph.codegen.compiled import defined_kernels
from llamagraph.ir import load_config
from llamagraph.runtime import cuda as rt

MAX_RECORDS = 1 << 18
TRACE = r"""
// ---- tools/block_timeline.py: per-block start / wait / end records ----
#define LG_TRACE_MAX %d
__device__ unsigned long long lg_trace_rec[LG_TRACE_MAX * 4];  // start, waited, end, id | sm << 16 | block << 32
__device__ unsigned int lg_trace_n;
__shared__ unsigned int lg_trace_slot;
__device__ __forceinline__ unsigned long long lg_trace_now() {
    unsigned long long t;
    asm volatile("mov.u64 %%0, %%%%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ bool lg_trace_lead() { return threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0; }
struct LgTrace {
    __device__ __forceinline__ explicit LgTrace(unsigned id) {
        if (!lg_trace_lead()) return;
        const unsigned long long t = lg_trace_now();  // before the slot's atomic, whose L2 round trip it would count
        unsigned sm;
        asm volatile("mov.u32 %%0, %%%%smid;" : "=r"(sm));
        const unsigned s = atomicAdd(&lg_trace_n, 1u);
        lg_trace_slot = s;
        if (s >= LG_TRACE_MAX) return;
        const unsigned long long blk = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        lg_trace_rec[4 * s] = t;
        lg_trace_rec[4 * s + 1] = t;
        lg_trace_rec[4 * s + 2] = 0;
        lg_trace_rec[4 * s + 3] = (unsigned long long)id | ((unsigned long long)sm << 16) | (blk << 32);
    }
    __device__ __forceinline__ ~LgTrace() {
        if (lg_trace_lead() && lg_trace_slot < LG_TRACE_MAX) lg_trace_rec[4 * lg_trace_slot + 2] = lg_trace_now();
    }
};
__device__ __forceinline__ void lg_trace_waited() {
    if (lg_trace_lead() && lg_trace_slot < LG_TRACE_MAX) lg_trace_rec[4 * lg_trace_slot + 1] = lg_trace_now();
}
""" % MAX_RECORDS
WAIT = 'asm volatile("griddepcontrol.wait;" ::: "memory");\n#endif\n'


def body_braces(source: str) -> list[int]:
    """Offset of the body's opening brace of every ``extern "C" __global__`` kernel, in source order
    (the first '{' outside parentheses after the declaration starts)."""
    out, at = [], 0
    while (at := source.find('extern "C" __global__', at)) >= 0:
        depth = 0
        while source[at] != "{" or depth:
            depth += {"(": 1, ")": -1}.get(source[at], 0)
            at += 1
        out.append(at)
    return out


def traced(source: str) -> tuple[str, list[str]]:
    """``source`` with the recorder in every kernel (id: its index in source order) and in
    lg_pdl_wait, and the kernel names in that order."""
    if source.count(WAIT) != 1:
        raise RuntimeError("lg_pdl_wait's body was not found once in the source: update block_timeline.WAIT")
    source = source.replace(WAIT, WAIT + "    lg_trace_waited();\n")
    names, braces = defined_kernels(source), body_braces(source)
    if len(names) != len(braces):
        raise RuntimeError(f"{len(braces)} kernel bodies found for {len(names)} kernels")
    for k, brace in reversed(list(enumerate(braces))):
        source = source[:brace + 1] + f" LgTrace lg_trace_obj({k}u);" + source[brace + 1:]
    return TRACE + source, names


def records(module) -> np.ndarray:
    """The records of the last replay: [n, 4] uint64 (start, waited, end, packed id)."""
    import cupy as cp

    n = int(cp.ndarray((1,), np.uint32, module.get_global("lg_trace_n")).get()[0])
    rec = cp.ndarray((MAX_RECORDS, 4), np.uint64, module.get_global("lg_trace_rec"))
    return rec[: min(n, MAX_RECORDS)].get()


def clear(module) -> None:
    import cupy as cp

    cp.ndarray((1,), np.uint32, module.get_global("lg_trace_n")).fill(0)


def apply_variant(variant: str):
    """Patch the codegen as tools/tuning_ab.py's ``variant`` does; returns that tool's module. The tool
    is loaded once (its DEFAULTS, the package's own functions, are taken as it loads: a second load
    after a patch would take the patched ones), so variants may follow one another ("base" undoes)."""
    ab = sys.modules.get("tuning_ab")
    if ab is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning_ab.py")
        spec = importlib.util.spec_from_file_location("tuning_ab", path)
        ab = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ab)
        sys.modules["tuning_ab"] = ab
    ab.patch(variant)
    return ab


def main(argv: list[str]) -> None:
    import cupy as cp

    variant = None
    if "--variant" in argv:
        at = argv.index("--variant")
        variant, argv = argv[at + 1], argv[:at] + argv[at + 2:]
        apply_variant(variant)
    config, quantize = argv[0], (None if argv[1] == "none" else argv[1])
    out_dir = argv[2] if len(argv) > 2 else "."
    cfg = load_config(config)
    modules, kernels = [], []
    plain = rt.load_module

    def load(source, arch):  # the executor's __init__ loads plan.source: it gets the traced copy
        source, kernels[:] = traced(source)
        modules.append(plain(source, arch))
        return modules[-1]

    rt.load_module = load
    plan = llamagraph.compile(cfg, "random", dtype="float16", max_batch=1, max_seq=256, backend="cuda",
                              quantize=quantize, group_size=128 if quantize == "int4" else None)
    ex = plan.executor
    module = modules[-1]
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 127)).tolist()
    plan.run(prompts)
    plan.run([[7]])  # one decode step: captured
    captured = {"T": 1, "B": 1, **ex.machine}
    launches = [launch for launch in ex.plan.phases["decode"] if not launch.on_demand and launch.runs(captured)]
    graph = ex.graphs[1]
    with ex.stream:
        for _ in range(5):
            graph.launch(ex.stream)
        ex.stream.synchronize()
        clear(module)
        ex.stream.synchronize()
        graph.launch(ex.stream)
        ex.stream.synchronize()
    rec = records(module)
    start, waited, end, packed = (rec[:, i].astype(np.int64) for i in range(4))
    fn_id, sm, blk = packed & 0xFFFF, (packed >> 16) & 0xFFFF, packed >> 32
    t0 = start.min()
    start, waited, end = start - t0, waited - t0, end - t0

    # records -> launches: per kernel, by start order, grid by grid
    launch_of = np.full(len(rec), -1)
    order = {}
    for k in range(len(kernels)):
        order[k] = list(np.flatnonzero(fn_id == k)[np.argsort(start[fn_id == k], kind="stable")])
    for i, launch in enumerate(launches):
        shape = launch.shape.at(captured)
        n = int(np.prod(shape.grid))
        k = kernels.index(launch.fn)
        take, order[k] = order[k][:n], order[k][n:]
        if len(take) != n:
            raise RuntimeError(f"launch {i} ({launch.fn}) expected {n} block records, found {len(take)}")
        launch_of[take] = i
    if (launch_of < 0).any():
        raise RuntimeError(f"{int((launch_of < 0).sum())} records matched no launch")

    n_sm = cp.cuda.Device().attributes["MultiProcessorCount"]
    g = ex.plan.graph
    rows = []
    prev_end = None
    for i, launch in enumerate(launches):
        sel = launch_of == i
        s, w, e = start[sel], waited[sel], end[sel]
        first_wait = w.min()
        body = e.max() - first_wait
        sms = sm[sel]
        # SMs holding a block past its wait, sampled over the body
        active = [len(np.unique(sms[(w <= t) & (e > t)])) for t in np.linspace(first_wait, e.max(), 65)[:-1]]
        rows.append(dict(i=i, op=g.nodes[launch.node].op, layer=g.nodes[launch.node].layer, fn=launch.fn,
                         blocks=int(sel.sum()),
                         early=int((s < prev_end).sum()) if prev_end is not None else 0,
                         release=(first_wait - prev_end) / 1e3 if prev_end is not None else 0.0,
                         body=body / 1e3, tail=(e.max() - np.median(e)) / 1e3,
                         busy=100.0 * float(np.mean(active)) / n_sm))
        prev_end = e.max()
    step_us = (end.max() - start.min()) / 1e3
    name = os.path.splitext(os.path.basename(config))[0] + (f"-{quantize}" if quantize else "") + (
        f"-{variant}" if variant else "")
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, f"timeline_{name}.npz"), launch=launch_of, block=blk, sm=sm,
                        start=start, waited=waited, end=end,
                        fns=np.array([launch.fn for launch in launches]),
                        ops=np.array([r["op"] for r in rows]),
                        layers=np.array([-1 if r["layer"] is None else r["layer"] for r in rows]))

    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    pick = [int(x) for x in argv[3].split(",")] if len(argv) > 3 else layers[1:-1] or layers
    print(f"{config} {quantize or 'float16'}{' ' + variant if variant else ''}: {len(launches)} launches, {len(rec)} block records, step "
          f"{step_us:.1f} us on the global timer; sum of releases {sum(r['release'] for r in rows):.1f} us, "
          f"of tails {sum(r['tail'] for r in rows):.1f} us")
    print(f"{'pos':>3} {'op':<24} {'blocks':>6} {'early':>6} {'release us':>10} {'body us':>8} {'tail us':>8} "
          f"{'busy %':>7}   (mean over layers {pick[0]}..{pick[-1]})")
    per_layer = {}
    for r in rows:
        if r["layer"] in pick:
            per_layer.setdefault(r["layer"], []).append(r)
    n_pos = min(len(v) for v in per_layer.values())
    for p in range(n_pos):
        rs = [v[p] for v in per_layer.values()]
        print(f"{p:>3} {rs[0]['op']:<24} {rs[0]['blocks']:>6} {np.mean([r['early'] for r in rs]):>6.0f} "
              f"{np.mean([r['release'] for r in rs]):>10.2f} {np.mean([r['body'] for r in rs]):>8.2f} "
              f"{np.mean([r['tail'] for r in rs]):>8.2f} {np.mean([r['busy'] for r in rs]):>7.1f}")
    print("outside the layers:")
    for r in rows:
        if r["layer"] is None:
            print(f"    {r['op']:<24} {r['blocks']:>6} {r['early']:>6} {r['release']:>10.2f} {r['body']:>8.2f} "
                  f"{r['tail']:>8.2f} {r['busy']:>7.1f}")
    ticks = np.unique(np.diff(np.unique(start)))
    print(f"global timer: smallest step between distinct start times {ticks[:3].tolist()} ns")


if __name__ == "__main__":
    main(sys.argv[1:])
