"""The CUDA executor: binds a compiled plan's launch lists to device memory and runs them.

It has no code per op. Memory is allocated once: weights, the KV cache, one region of step
inputs (with the workspaces the host rebuilds each step; filled from a pinned host buffer with
a single copy per step), the planned activation arena, and the plan's other workspaces
(scratch, constant tables). A launch binds generically: each argument is a value's or a
workspace's address, a constant, or a step scalar; a grid extent may follow a step scalar; a
launch may be conditional on one (``llamagraph.codegen.launch``).

A step with one token per sequence runs the "decode" phase, captured into a CUDA graph the
first time each batch size is seen and replayed after that (the plan proved the phase
graph-safe when it was compiled); any other step runs "prefill" eagerly, library calls
(cuBLAS) included. ``decode_ahead`` replays decode followed by the plan's "advance" phase (the
sampled tokens fed back as the next step's inputs) several steps ahead of the host. A step that fetches an on-demand output (``wants.<output>``) runs its
phase eagerly with those launches switched on.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from llamagraph.codegen.compiled import CompiledPlan
from llamagraph.codegen.launch import ADVANCE, DECODE_GREEDY, STEP_FILLS, WANTS, Arg, Launch
from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, WEIGHT, BackendError, WeightError
from llamagraph.ir.dtypes import DTYPES, to_storage
from llamagraph.ir.memory import align

from llamagraph.ir.layout import assemble
from llamagraph.ir.quant import order_codes

from .calls import COLLECTIVES, LIBRARY, early_launch_supported, launch_kernel, launch_kernel_early
from .weights import check_fits, nonfinite_counts, nonfinite_error, part_seed, quantize_value

ALIGN = 256
SYNC_EACH = os.environ.get("LLAMAGRAPH_SYNC_EACH") == "1"


def _cupy():
    try:
        import cupy
    except ImportError:
        raise BackendError("backend 'cuda' needs cupy: pip install 'llamagraph[cuda]' (cupy-cuda13x)") from None
    return cupy


def cache_dir() -> str:
    return os.environ.get("LLAMAGRAPH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llamagraph"))


def load_module(source: str, arch: str):
    """Compile ``source`` for ``arch`` (cached on disk by source hash) and load it."""
    from llamagraph.codegen.nvrtc import compile_source

    cp = _cupy()
    key = hashlib.sha256(f"{arch}\n{source}".encode()).hexdigest()[:24]
    path = os.path.join(cache_dir(), "kernels", f"{key}.cubin")
    if not os.path.exists(path):
        cubin = compile_source(source, arch, jobs=1).cubin  # one program: the module the runtime loads
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    return cp.RawModule(path=path)


class _Progress:
    """A one-line upload progress bar on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = max(total, 1), enabled, 0

    def __call__(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        if self.enabled:
            frac = self.done / self.total
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r  uploading weights [{bar:<30}] {frac:6.1%} {self.done / 2**30:6.2f} GiB  {name[:28]:<28}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class RandomOnDevice:
    """Marker: draw random weights on the GPU (fast for 7B-size benchmark shapes); for rank
    ``rank`` of a tensor-parallel plan, its slice of them."""

    def __init__(self, seed: int = 0, scale: float = 0.02, rank: int = 0):
        self.seed, self.scale, self.rank = seed, scale, rank


class CudaExecutor:
    name = "cuda"

    @staticmethod
    def check_available() -> None:
        cp = _cupy()
        try:
            n = cp.cuda.runtime.getDeviceCount()
        except Exception as e:  # cupy raises CUDARuntimeError without a driver
            raise BackendError(f"backend 'cuda' found no usable CUDA GPU ({e})") from None
        if n == 0:
            raise BackendError("backend 'cuda' found no CUDA GPU")

    def __init__(self, plan: CompiledPlan, weights, progress: bool = False):
        cp = self.cp = _cupy()
        self.plan = plan
        self.graph = g = plan.graph
        self.arch = f"sm_{cp.cuda.Device().compute_capability}"
        self.early = early_launch_supported(cp.cuda.Device().compute_capability)  # programmatic dependent launch
        self.device_id = cp.cuda.Device().id
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._check_memory(weights)  # one clear line rather than an allocation failing half-way
        module = load_module(plan.source, self.arch)
        self.fns = {name: module.get_function(name) for name in plan.kernels}
        step_filled = [w for w in plan.workspaces if w.fill in STEP_FILLS]

        # Everything is allocated and uploaded on the executor's own (non-blocking) stream, which
        # does not wait for cupy's default stream; one synchronize before the first step.
        with self.stream:
            self.weights = self._upload_weights(weights, progress)
            self.persistent = {v.name: cp.zeros(v.concrete_shape(g.dims), DTYPES[v.dtype].storage)
                               for v in g.values.values() if v.kind == KV_CACHE and "alias" not in v.attrs}
            # step inputs and step-filled workspaces: one device region, one pinned host mirror
            self.input_offsets, total = {}, 0
            for name, nbytes in [(v.name, v.nbytes(g.dims)) for v in g.values.values() if v.kind == INPUT] + \
                                [(w.name, w.nbytes) for w in step_filled]:
                self.input_offsets[name] = total
                total += align(nbytes, ALIGN)
            self.input_bytes = max(total, 1)
            self.inputs_dev = cp.zeros(self.input_bytes, np.uint8)
            self.inputs_host = cp.cuda.alloc_pinned_memory(self.input_bytes)
            self.inputs_host_np = np.frombuffer(self.inputs_host, np.uint8, self.input_bytes)
            self.arena = cp.empty(max(g.meta["memory"]["arena_bytes"], 1), np.uint8)
            self.workspaces = {}
            for w in plan.workspaces:
                if w.fill == "table":
                    self.workspaces[w.name] = cp.asarray(np.asarray(w.data, np.float32))
                elif w.fill == "scratch":
                    self.workspaces[w.name] = cp.empty(max(w.nbytes, 1), np.uint8)
                elif w.fill in ("zeros", "peer_mailbox"):
                    self.workspaces[w.name] = cp.zeros(max(w.nbytes, 1), np.uint8)
                elif w.fill == "peer_table":
                    self.workspaces[w.name] = cp.zeros(max(w.nbytes // 8, 1), np.uint64)
            self.out_host = {o: cp.cuda.alloc_pinned_memory(max(g.values[o].nbytes(g.dims), 1)) for o in g.outputs}
        self.stream.synchronize()

        self.addr = {name: self._address(name) for name in g.values}
        for w in plan.workspaces:
            base = self.inputs_dev.data.ptr + self.input_offsets[w.name] if w.fill in STEP_FILLS \
                else self.workspaces[w.name].data.ptr
            self.addr[w.name] = np.uint64(base)
        self.machine: dict[str, int] = {}  # machine.* scalars: fixed for the executor's life (launch.MACHINE)
        self.set_peers(0, [self])  # alone: rank 0 of 1 (a tensor-parallel runner sets every rank's)
        # workspaces each phase reads that the host rebuilds before every step
        self.fills = {p: [w for w in step_filled if any(a.kind == "workspace" and a.ref == w.name
                                                        for launch in ls for a in launch.args)]
                      for p, ls in plan.phases.items()}
        self.prepared = {p: [self._prepare(launch) for launch in ls] for p, ls in plan.phases.items()}
        self.graphs = {}  # batch size -> captured decode step
        self.ahead_graphs = {}  # batch size -> captured decode step + advance (decode_ahead)
        self.rings: dict[tuple[str, int], object] = {}  # (value, slot) -> pinned buffer of decode_ahead
        # outputs computed only by steps that fetch them (launches gated by wants.<output>)
        self.on_demand = {launch.on_demand for ls in plan.phases.values() for launch in ls if launch.on_demand}

    # ---- memory ---------------------------------------------------------------------------------
    def _check_memory(self, weights) -> None:
        """Fail before allocating when the plan needs more device memory than is free."""
        cp, g = self.cp, self.graph
        sizes = self.plan.sizes()
        if isinstance(weights, RandomOnDevice):  # float32 draws of the largest value, then its rounding
            # (quantizing holds the draws, their quotient and the codes: about three float32 copies)
            sizes["random draws"] = max(((12 if v.quant is not None else 8) * v.numel(g.dims)
                                         for v in g.values.values() if v.kind == WEIGHT), default=0)
        free, _ = cp.cuda.runtime.memGetInfo()
        free += cp.get_default_memory_pool().free_bytes()  # cached by cupy, reusable
        detail = ", ".join(f"{k} {n / 2**30:.2f} GiB" for k, n in sizes.items())
        check_fits(f"the plan on GPU {cp.cuda.Device().id}", sum(sizes.values()), free, detail)

    def _upload_weights(self, weights, progress: bool) -> dict:
        cp, g = self.cp, self.graph
        values = [v for v in g.values.values() if v.kind == WEIGHT]
        bar = _Progress(sum(v.nbytes(g.dims) for v in values), progress)
        out = {}
        if isinstance(weights, RandomOnDevice):
            for v in values:
                if "quant_of" in v.attrs:
                    continue  # scales / zeros: made with their weight's codes
                # every part drawn whole with a generator of its own, then cut: a plan gets the same
                # model whatever its fusions and however many ranks it is split over
                x = self._random_slice(v, weights)
                items = quantize_value(g, v.name, x, xp=cp) if v.quant is not None else [(v.name, to_storage(x, v.dtype, xp=cp))]
                del x
                for name, arr in items:
                    out[name] = self._device_order(name, arr)
                    bar(g.values[name].nbytes(g.dims), name)
            return out
        # a dict of arrays (checked on the host when it was resolved), or an iterator of (name,
        # array) streamed from a checkpoint, checked here on the device, where it is cheap
        streamed = not isinstance(weights, dict)
        items = weights if streamed else weights.items()
        for name, arr in items:
            arr = np.ascontiguousarray(arr)
            out[name] = self._device_order(name, cp.asarray(arr))
            dtype = g.values[name].dtype
            if streamed and DTYPES[dtype].kind == "float" and nonfinite_counts(out[name], dtype, xp=cp) != (0, 0):
                raise nonfinite_error(g, name, arr)  # found on the device; named from the host copy
            bar(arr.nbytes, name)
        missing = [v.name for v in values if v.name not in out]
        if missing:
            raise WeightError(f"no array for graph weight {missing[0]!r}")
        return out

    def _device_order(self, name: str, arr):
        """A weight array as the kernels read it: int8 / int4 codes in their value's code order
        (``llamagraph.ir.quant.order_codes``; the loaders hand over the row-major logical array)."""
        q = self.graph.values[name].quant
        return arr if q is None or q.code_order is None else order_codes(arr, q.code_order, xp=self.cp)

    def _random_slice(self, v, weights: RandomOnDevice):
        """Rank ``weights.rank``'s slice of weight ``v`` drawn on the device part by part (each part
        with its own generator, seeded as ``random_part`` seeds it on the host)."""
        cp = self.cp
        parts = []
        for name, shape in v.attrs["parts"]:
            x = cp.random.default_rng(part_seed(name, weights.seed)).standard_normal(tuple(shape), dtype=np.float32)
            parts.append(1.0 + 0.1 * x if v.role == "norm" else weights.scale * x)
        return assemble(v.attrs, parts, v.shard, weights.rank)

    def _address(self, name: str) -> np.uint64:
        """Device address of a value: arena offset, persistent region, input slot or weight."""
        v = self.graph.values[name]
        if v.kind == ACTIVATION:
            return np.uint64(self.arena.data.ptr + v.attrs["offset"])
        if v.kind == WEIGHT:
            return np.uint64(self.weights[name].data.ptr)
        if v.kind == INPUT:
            return np.uint64(self.inputs_dev.data.ptr + self.input_offsets[name])
        return np.uint64(self.persistent[v.attrs.get("alias", name)].data.ptr)

    def set_peers(self, rank: int, ranks: list["CudaExecutor"]) -> None:
        """Write every "peer_table" workspace: this executor's rank, then the address of the
        table's source workspace on each rank (the other ranks' kernels write into it)."""
        for w in self.plan.workspaces:
            if w.fill == "peer_table":
                table = [rank] + [int(ex.addr[w.source]) for ex in ranks]
                table += [0] * (self.workspaces[w.name].size - len(table))  # (a plan for more ranks: unused)
                self.workspaces[w.name].set(np.asarray(table, np.uint64), stream=self.stream)
        self.stream.synchronize()

    def reset(self) -> None:
        with self.stream:
            for arr in self.persistent.values():
                arr.fill(0)
        self.stream.synchronize()

    # ---- binding and launching ----------------------------------------------------------------
    def _bind(self, a: Arg):
        """An argument as passed to the call, resolved once: addresses and constants are fixed for
        the plan's lifetime; a step scalar stays an ``Arg`` until the step supplies it."""
        if a.kind in ("value", "workspace"):
            return np.uint64(int(self.addr[a.ref]) + a.offset)
        if a.kind == "null":
            return np.uint64(0)
        if a.kind == "step":
            return a
        return {"i32": np.int32, "f32": np.float32}.get(a.type, lambda v: v)(a.ref)

    def _prepare(self, launch: Launch) -> tuple:
        return launch, self.fns.get(launch.fn), [self._bind(a) for a in launch.args]

    def _issue(self, launch: Launch, fn, bound: list, scalars: dict[str, int]) -> None:
        if not launch.runs(scalars):
            return
        args = [np.int32(scalars[a.ref]) if isinstance(a, Arg) else a for a in bound]
        if launch.kind == "library":
            LIBRARY[launch.fn](*args, stream=self.stream)
            return
        if launch.kind == "collective":  # NCCL on this rank's communicator (a tensor-parallel plan)
            COLLECTIVES[launch.fn](self.comm, *args, stream=self.stream)
            return
        shape = launch.shape.at(scalars)
        if launch.early and self.early:
            launch_kernel_early(fn, shape, args, self.stream)
        else:
            launch_kernel(fn, shape, args, self.stream)  # raises the smem limit if needed
        if SYNC_EACH and not self.stream.is_capturing():  # debugging aid: name the kernel that faults
            try:
                self.stream.synchronize()
            except Exception as e:
                raise RuntimeError(f"{launch.describe()} grid {shape.grid} block {shape.block} failed: {e}") from e

    def launch(self, launch: Launch, scalars: dict[str, int]) -> None:
        """Bind one launch to this step's scalars and issue it on the executor's stream."""
        self._issue(*self._prepare(launch), scalars)

    def launch_phase(self, phase: str, scalars: dict[str, int]) -> None:
        """Launch every call of ``phase`` on the executor's stream, without a graph."""
        for launch, fn, bound in self.prepared[phase]:
            self._issue(launch, fn, bound, scalars)

    def _capture(self, scalars: dict[str, int], phases: tuple[str, ...] = ("decode",)):
        """Capture a decode phase (``phases[0]``: decode or decode_greedy; followed by
        ``phases[1:]``) for one batch size (its T and B are fixed per graph)."""
        # launch it once outside capture so every lazy initialisation happens before capturing
        # (it rewrites what the captured step will: the step's outputs and its KV-cache rows; the
        # advance phase is not run here, as it would move the staged inputs on)
        self.launch_phase(phases[0], scalars)
        self.stream.begin_capture()
        try:
            for phase in phases:
                self.launch_phase(phase, scalars)
        finally:
            g = self.stream.end_capture()
        return g

    # ---- stepping -----------------------------------------------------------------------------
    def step(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int, fetch: list[str],
             greedy: bool = False) -> dict[str, np.ndarray]:
        """Run one step and return the ``fetch``ed values, cut to this step's rows.

        Any value with an address can be fetched (graph outputs, activations, the KV cache);
        an intermediate activation holds its own data only in a plan compiled with
        ``keep_values=True`` (otherwise later nodes may have reused its buffer). ``greedy``: every
        row is greedy and no logits are fetched (the plan's decode_greedy phase runs, if it has one)."""
        phase, scalars, wanted = self.stage(inputs, n_tokens, n_seqs, fetch, greedy)
        with self.stream:
            if phase in self.plan.captured and not wanted:  # captures leave on-demand launches out
                key = graph_key(phase, n_seqs)
                graph = self.graphs.get(key)
                if graph is None:
                    graph = self.graphs[key] = self._capture(scalars, (phase,))
                graph.launch(self.stream)
            else:
                self.launch_phase(phase, scalars)
        return self.collect(fetch, scalars)

    # one step in pieces, so that a tensor-parallel runner can interleave its ranks
    def stage(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int, fetch: list[str],
              greedy: bool = False) -> tuple:
        """Write the step inputs (and step-filled workspaces) and copy them to the device on the
        executor's stream; return (phase, step scalars, the on-demand outputs wanted)."""
        g = self.graph
        phase = "decode" if n_tokens == n_seqs else "prefill"
        if phase == "decode" and greedy and DECODE_GREEDY in self.plan.phases:
            phase = DECODE_GREEDY
        scalars = {"T": n_tokens, "B": n_seqs, **self.machine}
        wanted = {WANTS + name: 1 for name in fetch if name in self.on_demand}
        scalars.update(wanted)
        for name, arr in inputs.items():
            off = self.input_offsets[name]
            raw = np.ascontiguousarray(arr, DTYPES[g.values[name].dtype].storage).view(np.uint8).reshape(-1)
            self.inputs_host_np[off : off + raw.size] = raw
        for w in self.fills[phase]:
            table = STEP_FILLS[w.fill](inputs[w.source], w)
            raw = np.ascontiguousarray(table).view(np.uint8).reshape(-1)
            off = self.input_offsets[w.name]
            self.inputs_host_np[off : off + raw.size] = raw
            scalars[w.name + ".n"] = len(table)
        self._upload_inputs(self.inputs_host)
        return phase, scalars, wanted

    def stage_like(self, other: "CudaExecutor", scalars: dict[str, int]) -> dict[str, int]:
        """Stage the step ``other`` (an executor of the same plan, on another device) has just staged:
        copy its pinned host inputs to this device on this executor's stream; this step's scalars."""
        self._upload_inputs(other.inputs_host)
        return {**scalars, **self.machine}

    def _upload_inputs(self, host) -> None:
        """The step-input region from pinned ``host`` memory, one copy on the executor's stream."""
        cp = self.cp
        cp.cuda.runtime.memcpyAsync(self.inputs_dev.data.ptr, host.ptr, self.input_bytes,
                                    cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)

    def collect(self, fetch: list[str], scalars: dict[str, int]) -> dict[str, np.ndarray]:
        """Copy the ``fetch``ed values to the host after the step's work on the stream."""
        for name in fetch:
            if name not in self.out_host:  # not a graph output: a pinned host buffer on first fetch
                self.out_host[name] = self.cp.cuda.alloc_pinned_memory(max(self.graph.values[name].nbytes(self.graph.dims), 1))
        self.copy_out(fetch, scalars, self.out_host)
        self.stream.synchronize()
        return self.read_out(fetch, scalars, self.out_host)

    def copy_out(self, fetch: list[str], scalars: dict[str, int], host: dict) -> None:
        """Queue copies of the ``fetch``ed values into the pinned buffers ``host`` (by name)."""
        cp, g = self.cp, self.graph
        for name in fetch:
            cp.cuda.runtime.memcpyAsync(host[name].ptr, int(self.addr[name]), g.values[name].nbytes(scalars),
                                        cp.cuda.runtime.memcpyDeviceToHost, self.stream.ptr)

    def read_out(self, fetch: list[str], scalars: dict[str, int], host: dict) -> dict[str, np.ndarray]:
        """The ``fetch``ed values from the pinned buffers ``host``, once their copies are done."""
        out = {}
        for name in fetch:
            v = self.graph.values[name]
            shape = v.concrete_shape(scalars)
            out[name] = np.frombuffer(host[name], DTYPES[v.dtype].storage, int(np.prod(shape))).reshape(shape).copy()
        return out

    # ---- pipelined decode -------------------------------------------------------------------------
    def decode_ahead(self, inputs: dict[str, np.ndarray], n_seqs: int, fetch: list[str], steps: int,
                     depth: int | None = None, greedy: bool = False):
        """``steps`` decode steps, the first from ``inputs``, each later one from the step before:
        its sampled tokens fed back on the device (the plan's advance phase). Yields each step's
        ``fetch``ed values in order, while up to ``depth`` steps are in flight. Closing the
        generator early waits for the steps already issued (their results are dropped)."""
        phase, scalars, wanted = self.stage(inputs, n_seqs, n_seqs, fetch, greedy)
        if phase not in ("decode", DECODE_GREEDY) or wanted:
            raise ValueError("decode_ahead runs decode steps (one token per sequence) with no on-demand output")
        key = graph_key(phase, n_seqs)
        graph = self.ahead_graphs.get(key)
        if graph is None:
            with self.stream:
                graph = self.ahead_graphs[key] = self._capture(scalars, (phase, ADVANCE))

        def launch() -> None:
            graph.launch(self.stream)
        yield from run_ahead(self, launch, self.stream.synchronize, fetch, scalars, steps, depth)


def graph_key(phase: str, n_seqs: int):
    """The key of a captured graph: its batch size, with the phase when it is not decode."""
    return n_seqs if phase == "decode" else (phase, n_seqs)


AHEAD_DEPTH = 3  # decode steps in flight in decode_ahead: the host reads one while two more run


def run_ahead(ex: CudaExecutor, launch, synchronize, fetch: list[str], scalars: dict[str, int], steps: int,
              depth: int | None = None):
    """Issue ``steps`` replays with ``launch()``, each followed by copies of ``ex``'s ``fetch``ed
    values into a ring of pinned buffers and an event; yield each step's values once its event has
    passed, keeping at most ``depth`` steps in flight. ``synchronize()`` waits for every stream
    the steps run on (when the generator finishes or is closed)."""
    from collections import deque

    cp, g = ex.cp, ex.graph
    depth = max(1, AHEAD_DEPTH if depth is None else int(depth))
    ring, events = [], []  # per slot: pinned buffers by value name, and the event after their copies
    with cp.cuda.Device(ex.device_id):  # events belong to the device whose stream records them
        for slot in range(depth):
            bufs = {}
            for name in fetch:
                key = (name, slot)
                if key not in ex.rings:
                    ex.rings[key] = cp.cuda.alloc_pinned_memory(max(g.values[name].nbytes(g.dims), 1))
                bufs[name] = ex.rings[key]
            ring.append(bufs)
            events.append(cp.cuda.Event(block=False, disable_timing=True))
    pending: deque = deque()
    issued = 0
    try:
        while issued < steps or pending:
            while issued < steps and len(pending) < depth:
                launch()
                slot = issued % depth  # free: the step that used it last has been read
                with cp.cuda.Device(ex.device_id):  # the caller may have another device current
                    ex.copy_out(fetch, scalars, ring[slot])
                    events[slot].record(ex.stream)
                pending.append(slot)
                issued += 1
            slot = pending.popleft()
            events[slot].synchronize()
            yield ex.read_out(fetch, scalars, ring[slot])
    finally:
        synchronize()
