"""Where does a decode step's time go? Run on a GPU machine:

    python tools/profile_decode.py examples/tinyllama-1.1b.json [--batch 1] [--context 192]

Prints (1) the wall time of a decode step through Plan.generate, (2) the GPU time of one
captured-graph replay (replays back to back, no host work), and (3) each node's GPU time when
replayed alone (a graph of 20 runs of its decode launches from the plan), summed per op, with the bytes its weights and KV reads move and the bandwidth
that implies.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np


def main() -> None:
    import cupy as cp

    import llamagraph

    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()

    B = args.batch
    plan = llamagraph.compile(args.config, "random", dtype=args.dtype, max_batch=B, max_seq=args.context + 64,
                              backend="cuda")
    ex = plan.executor
    prompts = np.random.default_rng(0).integers(0, plan.vocab_size, (B, args.context)).tolist()
    plan.generate(prompts, 8)
    t = time.perf_counter()
    plan.generate(prompts, 65)
    total = time.perf_counter() - t
    plan.reset()
    t = time.perf_counter()
    plan.run(prompts)
    prefill = time.perf_counter() - t
    print(f"decode step through Plan.generate: {1e3 * (total - prefill) / 64:.3f} ms (wall, host work included)")

    g = ex.graphs[B]
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    with ex.stream:
        for _ in range(5):
            g.launch(ex.stream)
        start.record(ex.stream)
        for _ in range(50):
            g.launch(ex.stream)
        stop.record(ex.stream)
        stop.synchronize()
    replay = cp.cuda.get_elapsed_time(start, stop) / 50
    print(f"one captured-graph replay: {replay:.3f} ms (GPU)")

    # each node alone: 20 launches captured into a graph, so Python launch cost is excluded
    per_op = defaultdict(float)
    per_op_bytes = defaultdict(int)
    count = defaultdict(int)
    reps = 20
    by_node = defaultdict(list)  # node index -> its decode launches, from the plan
    for launch in ex.plan.phases["decode"]:
        by_node[launch.node].append(launch)
    scalars = {"T": B, "B": B}
    with ex.stream:
        for i, launches in sorted(by_node.items()):
            node = ex.graph.nodes[i]
            ex.stream.begin_capture()
            for _ in range(reps):
                for launch in launches:
                    ex.launch(launch, scalars)
            node_graph = ex.stream.end_capture()
            node_graph.launch(ex.stream)
            start.record(ex.stream)
            node_graph.launch(ex.stream)
            stop.record(ex.stream)
            stop.synchronize()
            per_op[node.op] += cp.cuda.get_elapsed_time(start, stop) / reps
            count[node.op] += 1
            per_op_bytes[node.op] += sum(ex.graph.values[v].nbytes(ex.graph.dims) for v in node.inputs
                                         if ex.graph.values[v].kind == "weight")
    tot = sum(per_op.values())
    print(f"sum of nodes replayed alone (graph of {reps} launches each): {tot:.3f} ms")
    print(f"{'op':<16}{'count':>6}{'ms':>9}{'share':>8}{'weight GB/s':>13}")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1]):
        gbs = per_op_bytes[op] / (ms * 1e-3) / 1e9 if per_op_bytes[op] else float("nan")
        print(f"{op:<16}{count[op]:>6}{ms:>9.3f}{100 * ms / tot:>7.1f}%{gbs:>13.0f}")


if __name__ == "__main__":
    main()
