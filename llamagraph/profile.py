"""``llamagraph profile``: one decode step, kernel by kernel, against the copy bandwidth.

A decode step is a list of launches (``plan.compiled.phases["decode"]``) that the CUDA
executor replays as one captured graph. ``profile`` times each launch alone: about 20
repetitions of that one launch captured into a CUDA graph, replayed once to warm up, then
timed with CUDA events, so Python's launch cost is not in the figure. Each launch gets the
bytes it must move (``launch_bytes``), the GB/s that implies and its % of the device-to-device
copy bandwidth measured in the same run (``bench.copy_bandwidth``). The totals compare the sum
of the kernels with one replay of the whole captured step, and the step's bytes
(``bench.decode_step_bytes``: the floor ``llamagraph bench`` uses) with that replay time.

Then each op's marginal cost (one GPU): the profiled launches are captured anew with that op's
launches left out, and the replay time it saves is set beside the op's launches timed alone. A
kernel costs the step more than its own time by what its boundaries with different neighbours
cost (waits, ramps, tails); that difference per launch is printed too. (The data the step computes
is wrong without an op; its timing is what is measured.)

A launch repeated back to back finds in L2 what the previous repetition left there, so a
launch whose bytes fit in L2 can read above the copy bandwidth; the whole-step replay, which
streams every weight once, is the figure that cannot flatter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from llamagraph.bench import copy_bandwidth, decode_step_bytes
from llamagraph.codegen.launch import Launch
from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, OPS, WEIGHT, Graph, InputError, load_config

REPS = 20  # launches of one kernel captured into the graph that times it
REPLAYS = 50  # whole-step graph replays timed


def launch_bytes(graph: Graph, launch: Launch, batch: int, context: int) -> int:
    """Bytes a decode launch must move, from its ``value`` arguments, each value counted once.

    - a weight: all of it, except the weight of a gathering op (``OpDef.gather``: the embedding
      lookup of ``tokens``), which moves only ``batch`` rows (one token per sequence); a tied LM
      head reads the same table whole;
    - a KV cache: only the rows the step touches, ``[.., KV, D]`` each: ``batch`` rows (one new
      token per sequence) for the node that writes the cache, ``batch * context`` rows for a
      node that reads it (attention over ``context`` cached tokens per sequence);
    - an activation or a step input: its size at T = B = ``batch``.

    Workspaces (scratch such as split-KV partials, constant tables) are not counted: they are
    the plan's own traffic, not the model's, and small.
    """
    node = graph.nodes[launch.node]
    dims = {"T": batch, "B": batch}
    gathers = OPS[node.op].gather
    written = {graph.values[o].attrs.get("alias", o) for o in node.outputs}  # caches this node writes
    total = 0
    seen: set[str] = set()
    for a in launch.args:
        if a.kind != "value" or a.ref in seen:
            continue
        seen.add(a.ref)
        v = graph.values[a.ref]
        if v.kind == WEIGHT:
            if gathers:
                total += batch * v.nbytes(graph.dims) // v.shape[0]
            else:
                total += v.nbytes(graph.dims)
        elif v.kind == KV_CACHE:
            row = v.nbytes(graph.dims) // (v.shape[0] * v.shape[1])  # one token of one sequence: [KV, D]
            rows = batch if v.attrs.get("alias", v.name) in written else batch * context
            total += rows * row
        elif v.kind in (ACTIVATION, INPUT):
            total += v.nbytes(dims)
    return int(total)


def layer_label(layer: int | None, after_layers: bool) -> str:
    """The group a launch is drawn in: its decoder layer, else embedding (before the layers) or
    head (after them)."""
    if layer is not None:
        return f"layer {layer}"
    return "head" if after_layers else "embedding"


@dataclass
class KernelRow:
    index: int  # position in the decode step
    layer: int | None
    group: str  # "embedding", "layer <i>" or "head"
    op: str
    node: str
    kernel: str
    us: float
    bytes: int
    gb_s: float
    pct_copy: float  # GB/s as % of the copy bandwidth


@dataclass
class ProfileResult:
    config: str
    batch: int
    context: int
    dtype: str
    device: str
    copy_gb_s: float
    replay_us: float  # one replay of the captured decode step
    step_bytes: int  # bench's floor bytes for the step
    rows: list[KernelRow] = field(default_factory=list)
    tp: int = 1  # ranks: the rows are rank 0's launches, each timed with every rank running it
    launches_replay_us: float = 0.0  # one replay of the profiled launches captured anew (the baseline of `without`)
    without: dict[str, float] = field(default_factory=dict)  # op -> replay us of the step without that op's launches

    @property
    def collective_rows(self) -> list[KernelRow]:
        return [r for r in self.rows if OPS[r.op].collective]

    @property
    def kernels_us(self) -> float:
        return sum(r.us for r in self.rows)

    @property
    def kernel_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def pct_floor(self) -> float:
        """The floor time (step bytes over the copy bandwidth) as % of the replay time."""
        return 100 * (self.step_bytes / (self.copy_gb_s * 1e9)) / (self.replay_us * 1e-6)

    def totals(self) -> dict:
        out = {"kernels": len(self.rows), "kernels_us": self.kernels_us, "replay_us": self.replay_us,
               "kernel_bytes": self.kernel_bytes, "step_bytes": self.step_bytes,
               "replay_gb_s": self.step_bytes / (self.replay_us * 1e-6) / 1e9, "pct_floor": self.pct_floor}
        if self.tp > 1:
            out["collectives"] = len(self.collective_rows)
            out["collectives_us"] = sum(r.us for r in self.collective_rows)
        return out

    def header(self) -> str:
        ranks = (f"; tensor parallel over {self.tp} GPUs: rank 0's launches (each timed with every rank running it), "
                 "bytes and floor per GPU") if self.tp > 1 else ""
        return (f"{self.config}: decode step, batch {self.batch}, context {self.context}, {self.dtype}, {self.device}; "
                f"copy bandwidth {self.copy_gb_s:.0f} GB/s{ranks}")

    def totals_line(self) -> str:
        t = self.totals()
        line = (f"total: {t['kernels']} kernels, {t['kernels_us']:.1f} us summed alone; graph replay "
                f"{t['replay_us']:.1f} us; step moves {t['step_bytes'] / 1e6:.2f} MB "
                f"({t['replay_gb_s']:.0f} GB/s over the replay) -> {t['pct_floor']:.1f}% of floor")
        if self.tp > 1:
            line += (f"\nall-reduce and gather: {t['collectives']} launches of collective ops, {t['collectives_us']:.1f} us per step "
                     f"summed alone ({100 * t['collectives_us'] / t['replay_us']:.1f}% of the replay)")
        return line

    def table(self) -> str:
        lines = [self.header(),
                 f"{'#':>4} {'group':<10} {'op':<16} {'kernel':<44} {'us':>9} {'bytes':>12} {'GB/s':>8} {'% copy':>7}"]
        for r in self.rows:
            lines.append(f"{r.index:>4} {r.group:<10} {r.op:<16} {r.kernel[:44]:<44} {r.us:>9.2f} {r.bytes:>12,} "
                         f"{r.gb_s:>8.0f} {r.pct_copy:>6.1f}%")
        lines.append(self.totals_line())
        return "\n".join(lines)

    def marginal(self) -> list[dict]:
        """Per op: what the whole step's replay saves without its launches (its marginal cost), next to
        its launches' time alone; the difference, per launch, is what a boundary between it and its
        neighbours costs in the step (negative: alone overstates it, e.g. L2 kept warm across repetitions)."""
        out = []
        for op, us in self.without.items():
            rows = [r for r in self.rows if r.op == op]
            alone = sum(r.us for r in rows)
            margin = self.launches_replay_us - us
            out.append({"op": op, "launches": len(rows), "alone_us": alone, "without_us": us, "marginal_us": margin,
                        "boundary_us": (margin - alone) / len(rows)})
        return out

    def marginal_table(self) -> str:
        lines = [f"replay of the profiled launches {self.launches_replay_us:.1f} us; without each op's launches:",
                 f"{'op':<24} {'launches':>8} {'alone us':>10} {'marginal us':>12} {'(marginal - alone) / launch':>28}"]
        for m in self.marginal():
            lines.append(f"{m['op']:<24} {m['launches']:>8} {m['alone_us']:>10.1f} {m['marginal_us']:>12.1f} "
                         f"{m['boundary_us']:>28.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"config": self.config, "batch": self.batch, "context": self.context, "dtype": self.dtype,
                "device": self.device, "copy_gb_s": self.copy_gb_s, "tp": self.tp, "totals": self.totals(),
                "rows": [asdict(r) for r in self.rows], "launches_replay_us": self.launches_replay_us,
                "marginal": self.marginal()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def html(self) -> str:
        from llamagraph.viz import profile_html

        return profile_html([asdict(r) for r in self.rows], title=f"decode step profile: {self.config}",
                            subtitle=[self.header(), self.totals_line()])


def _time_graph(cp, graph, stream, reps: int, replays: int = 1, warmup: int = 1) -> float:
    """Microseconds per repetition of the work a captured graph holds ``reps`` times: ``replays``
    replays timed back to back, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        graph.launch(stream)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(replays):
        graph.launch(stream)
    stop.record(stream)
    stop.synchronize()
    return 1e3 * cp.cuda.get_elapsed_time(start, stop) / (reps * replays)


def _time_ranks(cp, runner, graphs, reps: int, replays: int = 1) -> float:
    """Microseconds per repetition of every rank's captured graph (``reps`` repetitions of the
    timed work) replayed together ``replays`` times, on rank 0's clock, after one warm-up replay."""
    def replay():
        for r, (rank, graph) in enumerate(zip(runner.ranks, graphs)):
            with cp.cuda.Device(r):
                graph.launch(rank.stream)

    stream = runner.ranks[0].stream
    replay()
    with cp.cuda.Device(0):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
    for _ in range(replays):
        replay()
    with cp.cuda.Device(0):
        stop.record(stream)
    runner.synchronize()
    return 1e3 * cp.cuda.get_elapsed_time(start, stop) / (reps * replays)


def profile(config: str, *, batch: int = 1, context: int = 128, dtype: str = "float16", seed: int = 0,
            progress: bool = False, log=None, quantize: str | None = None, group_size: int | None = None,
            tp: int = 1) -> ProfileResult:
    """Profile one decode step of ``config`` on random weights on the GPU.

    Prefills ``context - 1`` random tokens per sequence and runs one decode step (the graph is
    captured), so the profiled step attends over ``context`` cached tokens per sequence; then
    times each of its launches alone and one replay of the whole step (see the module doc).
    With ``tp`` > 1 the plan runs over that many GPUs: each launch is captured and replayed on
    every rank at once (a collective needs them all) and timed on rank 0."""
    import cupy as cp

    import llamagraph

    if context < 2:
        raise InputError(f"context must be at least 2 (a prompt token and the decoded one), got {context}")
    cfg = load_config(config)
    say = log or (lambda m: None)
    bw = copy_bandwidth()
    say(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    plan = llamagraph.compile(cfg, "random", dtype=dtype, max_batch=batch, max_seq=context, backend="cuda",
                              seed=seed, progress=progress, quantize=quantize, group_size=group_size, tp=tp)
    runner = plan.executor if tp > 1 else None  # the tensor-parallel runner, whose ranks are executors
    ex = runner.ranks[0] if runner else plan.executor
    prompts = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, context - 1)).tolist()
    # prefill, then one decode step (captured), step by step: its inputs stay on the device as staged
    # (generate's pipelined steps would leave them moved on to the next position, past max_seq)
    plan.run(prompts)
    plan.run([[int(t)] for t in np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, batch)])
    if batch not in (runner or ex).graphs:
        raise RuntimeError("the decode step was not captured as a graph")
    # a captured decode launch reads no step scalar but T and B (check_capturable proved it), and the
    # executor's machine scalars
    captured = {"T": batch, "B": batch, **ex.machine}
    ranks = [{"T": batch, "B": batch, **rank.machine} for rank in runner.ranks] if runner else []
    graph, stream = plan.graph, ex.stream
    launches = [(i, launch) for i, launch in enumerate(ex.plan.phases["decode"])
                if not launch.on_demand and launch.runs(captured)]
    say(f"timing {len(launches)} decode launches" + (f" on {tp} GPUs" if runner else ""))

    result = ProfileResult(str(config), batch, context, dtype,
                           cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode(), bw / 1e9,
                           0.0, decode_step_bytes(graph, cfg, batch, context), tp=tp)
    after_layers = False
    with stream:
        for i, (index, launch) in enumerate(launches):
            if runner:
                graphs = runner.capture(lambda: [runner.issue("decode", index, ranks) for _ in range(REPS)])
                us = _time_ranks(cp, runner, graphs, REPS)
            else:
                stream.begin_capture()
                try:
                    for _ in range(REPS):
                        ex.launch(launch, captured)
                finally:
                    one = stream.end_capture()
                us = _time_graph(cp, one, stream, REPS)
            node = graph.nodes[launch.node]
            after_layers = after_layers or node.layer is not None
            nbytes = launch_bytes(graph, launch, batch, context)
            gb_s = nbytes / (us * 1e-6) / 1e9 if us > 0 else float("nan")
            result.rows.append(KernelRow(i, node.layer, layer_label(node.layer, after_layers), node.op, node.name,
                                         launch.fn, us, nbytes, gb_s, 100 * gb_s / (bw / 1e9)))
        if runner:
            result.replay_us = _time_ranks(cp, runner, runner.graphs[batch], 1, REPLAYS)
        else:
            result.replay_us = _time_graph(cp, ex.graphs[batch], stream, 1, REPLAYS, warmup=5)

            def step_without(op: str | None):
                # the profiled launches captured anew, less op's: the step's cost of op in place
                stream.begin_capture()
                try:
                    for _, launch in launches:
                        if graph.nodes[launch.node].op != op:
                            ex.launch(launch, captured)
                finally:
                    g = stream.end_capture()
                return _time_graph(cp, g, stream, 1, REPLAYS, warmup=5)

            result.launches_replay_us = step_without(None)
            for op in dict.fromkeys(r.op for r in result.rows):
                say(f"replay without {op}")
                result.without[op] = step_without(op)
    if runner:
        runner.close()
    return result
