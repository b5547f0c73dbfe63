"""The CUDA backend: generated kernels launched through cupy, decode steps as CUDA graphs.

Memory is allocated once: weights, the KV cache, one region of step inputs (filled from a
pinned host buffer with a single copy per step), the planned activation arena, and
workspaces (split-KV attention partials; the prefill GEMM scratch). A decode step (one token
per sequence) is captured into a CUDA graph the first time each batch size is seen and
replayed after that; everything that changes between replays (positions, lengths, sampling
parameters, RNG steps) lives in the input region, never in kernel arguments. Prefill launches
the same kernels eagerly, with cuBLAS for large GEMMs (cupy refuses cuBLAS during capture).
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from llamagraph.codegen import attention as attn_codegen
from llamagraph.codegen import dense as dense_codegen
from llamagraph.codegen.plan import LINEAR_OPS, ROPE_MODES, NodeKernels, plan_kernels, plan_source
from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, WEIGHT, BackendError, Graph, WeightError

from .cuda_dense import launch as launch_kernel
from .cuda_dense import linear_cublas
from .dtypes import NUMPY_STORAGE

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
        cubin = compile_source(source, arch).cubin
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


def _ptr(arr) -> np.uint64:
    return np.uint64(arr.data.ptr)


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

    def __init__(self, graph: Graph, weights, progress: bool = False):
        cp = _cupy()
        self.cp = cp
        self.graph = graph
        self.dtype = graph.meta["dtype"]
        self.max_batch = graph.meta["max_batch"]
        self.max_tokens = graph.meta["max_tokens"]
        self.max_seq = graph.meta["max_seq"]
        cc = cp.cuda.Device().compute_capability
        self.arch = f"sm_{cc}"
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.kernels = plan_kernels(graph)
        self.module = load_module(plan_source(graph), self.arch)
        self.fns = {}
        for nk in self.kernels:
            for k in nk.kernels.values():
                if k.name not in self.fns:
                    self.fns[k.name] = self.module.get_function(k.name)

        # Everything is allocated and uploaded on the executor's own (non-blocking) stream, which
        # does not wait for cupy's default stream; one synchronize before the first step.
        with self.stream:
            # ---- persistent memory ----------------------------------------------------------------
            self.weights = self._upload_weights(weights, progress)
            self.persistent = {}
            for v in graph.values.values():
                if v.kind == KV_CACHE and "alias" not in v.attrs:
                    self.persistent[v.name] = cp.zeros(v.concrete_shape(graph.dims), NUMPY_STORAGE[v.dtype])
            # step inputs: one device region, one pinned host mirror, one copy per step
            self.input_offsets, total = {}, 0
            for v in graph.values.values():
                if v.kind == INPUT:
                    self.input_offsets[v.name] = total
                    total += (v.nbytes(graph.dims) + ALIGN - 1) // ALIGN * ALIGN
            self.input_bytes = total
            self.inputs_dev = cp.zeros(total, np.uint8)
            self.inputs_host = cp.cuda.alloc_pinned_memory(total)
            self.inputs_host_np = np.frombuffer(self.inputs_host, np.uint8, total)
            self.arena = cp.empty(max(graph.meta["memory"]["arena_bytes"], 1), np.uint8)
            # workspaces
            self._attn_ws = None
            for nk in self.kernels:
                if nk.node.op == "sdpa":
                    p = nk.params
                    nbytes = attn_codegen.attention_decode_workspace_bytes(self.max_batch, p["H"], p["D"], self.max_seq)
                    self._attn_ws = cp.empty(max(nbytes, 1), np.uint8)
                    break
            scratch = 0
            for nk in self.kernels:
                if nk.node.op in LINEAR_OPS:
                    scratch = max(scratch, self.max_tokens * nk.params["N"] * 4)
            self._gemm_scratch = cp.empty(max(scratch, 1), np.uint8)
            self._inv_freq = {}
            self._prefill_tiles: dict = {}  # rows per tile -> tile table of this prefill step
            self.graphs = {}  # batch size -> captured decode step
            out_logits, out_next = graph.outputs
            self._logits_host = cp.cuda.alloc_pinned_memory(self.max_batch * graph.values[out_logits].shape[1] * 4)
            self._next_host = cp.cuda.alloc_pinned_memory(self.max_batch * 4)
        self.stream.synchronize()

    # ---- memory ---------------------------------------------------------------------------------
    def _upload_weights(self, weights, progress: bool) -> dict:
        cp = self.cp
        values = [v for v in self.graph.values.values() if v.kind == WEIGHT]
        total = sum(v.nbytes(self.graph.dims) for v in values)
        bar = _Progress(total, progress)
        out = {}
        if isinstance(weights, RandomOnDevice):
            gen = cp.random.default_rng(weights.seed)
            for v in values:
                shape = v.concrete_shape(self.graph.dims)
                if v.name.endswith("norm.w"):
                    x = 1.0 + 0.1 * gen.standard_normal(shape, dtype=np.float32)
                else:
                    x = weights.scale * gen.standard_normal(shape, dtype=np.float32)
                out[v.name] = self._device_storage(x, v.dtype)
                bar(v.nbytes(self.graph.dims), v.name)
            return out
        # a dict of arrays, or an iterator of (name, array) streamed from a checkpoint
        items = weights.items() if isinstance(weights, dict) else weights
        for name, arr in items:
            arr = np.ascontiguousarray(arr)
            out[name] = cp.asarray(arr)
            bar(arr.nbytes, name)
        missing = [v.name for v in values if v.name not in out]
        if missing:
            raise WeightError(f"no array for graph weight {missing[0]!r}")
        return out

    def _device_storage(self, x, dtype: str):
        cp = self.cp
        if dtype == "bfloat16":
            u = x.astype(cp.float32).view(cp.uint32)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16)
        return x.astype(NUMPY_STORAGE[dtype])

    def reset(self) -> None:
        with self.stream:
            for arr in self.persistent.values():
                arr.fill(0)
        self.stream.synchronize()

    def ptr(self, name: str) -> np.uint64:
        """Device address of a value: arena offset, persistent region, input slot or weight."""
        v = self.graph.values[name]
        if v.kind == ACTIVATION:
            return np.uint64(self.arena.data.ptr + v.attrs["offset"])
        if v.kind == WEIGHT:
            return _ptr(self.weights[name])
        if v.kind == INPUT:
            return np.uint64(self.inputs_dev.data.ptr + self.input_offsets[name])
        return _ptr(self.persistent[v.attrs.get("alias", name)])

    def inv_freq(self, attrs: dict):
        key = (attrs["head_dim"], attrs["theta"], repr(attrs.get("scaling")))
        if key not in self._inv_freq:
            table = attn_codegen.rope_inv_freq_table(attrs["head_dim"], attrs["theta"], attrs.get("scaling"))
            self._inv_freq[key] = self.cp.asarray(np.ascontiguousarray(table, np.float32))
        return self._inv_freq[key]

    # ---- stepping -----------------------------------------------------------------------------
    def step(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int, want_logits: bool = True):
        cp = self.cp
        for name, arr in inputs.items():
            off = self.input_offsets[name]
            raw = np.ascontiguousarray(arr, NUMPY_STORAGE[self.graph.values[name].dtype]).view(np.uint8).reshape(-1)
            self.inputs_host_np[off : off + raw.size] = raw
        decode = n_tokens == n_seqs
        with self.stream:
            cp.cuda.runtime.memcpyAsync(self.inputs_dev.data.ptr, self.inputs_host.ptr, self.input_bytes,
                                        cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
            if decode:
                g = self.graphs.get(n_seqs)
                if g is None:
                    g = self._capture(n_seqs)
                g.launch(self.stream)
            else:
                self._prepare_prefill(inputs)
                self._launch_all(n_tokens, n_seqs, prefill=True)
            logits_name, next_name = self.graph.outputs
            V = self.graph.values[logits_name].shape[1]
            nxt = np.frombuffer(self._next_host, np.int32, n_seqs)
            cp.cuda.runtime.memcpyAsync(self._next_host.ptr, int(self.ptr(next_name)), n_seqs * 4,
                                        cp.cuda.runtime.memcpyDeviceToHost, self.stream.ptr)
            logits = None
            if want_logits:
                cp.cuda.runtime.memcpyAsync(self._logits_host.ptr, int(self.ptr(logits_name)), n_seqs * V * 4,
                                            cp.cuda.runtime.memcpyDeviceToHost, self.stream.ptr)
            self.stream.synchronize()
        if want_logits:
            logits = np.frombuffer(self._logits_host, np.float32, n_seqs * V).reshape(n_seqs, V).copy()
        return logits, nxt.copy()

    def _capture(self, n_seqs: int):
        """Capture one decode step for ``n_seqs`` sequences (one token each)."""
        # launch once outside capture so every lazy initialisation happens before capturing
        self._launch_all(n_seqs, n_seqs, prefill=False)
        self.stream.begin_capture()
        try:
            self._launch_all(n_seqs, n_seqs, prefill=False)
        finally:
            g = self.stream.end_capture()
        self.graphs[n_seqs] = g
        return g

    def launch_eager(self, n_tokens: int, n_seqs: int) -> None:
        """Run the decode kernels without a graph (tests compare this with the replay)."""
        with self.stream:
            self._launch_all(n_tokens, n_seqs, prefill=False)
            self.stream.synchronize()

    def _prepare_prefill(self, inputs: dict[str, np.ndarray]) -> None:
        """Tile table of the tiled prefill attention: tiles never cross a sequence."""
        seq_ids = np.asarray(inputs["seq_ids"])
        starts = np.flatnonzero(np.r_[True, seq_ids[1:] != seq_ids[:-1]])
        counts = np.diff(np.r_[starts, len(seq_ids)])
        self._prefill_tiles = {}
        for nk in self.kernels:
            if nk.node.op == "sdpa":
                bq = attn_codegen.attention_prefill_rows(nk.params["D"])
                if bq not in self._prefill_tiles:
                    tiles = attn_codegen.prefill_tiles(starts, counts, bq)
                    self._prefill_tiles[bq] = self.cp.asarray(np.ascontiguousarray(tiles, np.int32))

    def _launch_all(self, T: int, B: int, prefill: bool) -> None:
        for nk in self.kernels:
            getattr(self, "_launch_" + _family(nk.node.op))(nk, T, B, prefill)

    def _go(self, kernel, launch, args) -> None:
        launch_kernel(self.fns[kernel.name], launch, args, self.stream)  # raises the smem limit if needed
        if SYNC_EACH and not self.stream.is_capturing():  # debugging aid: name the kernel that faults
            try:
                self.stream.synchronize()
            except Exception as e:
                raise RuntimeError(f"kernel {kernel.name} grid {launch.grid} block {launch.block} failed: {e}") from e

    # ---- one launcher per op family ----------------------------------------------------------------
    def _rows(self, name: str, T: int, B: int) -> int:
        return T if self.graph.values[name].shape[0] == "T" else B

    def _launch_embedding(self, nk: NodeKernels, T, B, prefill) -> None:
        tok, table = nk.node.inputs
        launch = dense_codegen.embedding_launch(self.dtype, nk.params["D"], T)
        self._go(nk.kernels["main"], launch, (self.ptr(tok), self.ptr(table), self.ptr(nk.node.outputs[0]), np.int32(T)))

    def _launch_norm(self, nk: NodeKernels, T, B, prefill) -> None:
        n, ins, outs = nk.node, nk.node.inputs, nk.node.outputs
        rows = self._rows(outs[-1], T, B)
        null = np.uint64(0)
        if n.op == "rmsnorm":
            args = (self.ptr(ins[0]), null, null, self.ptr(ins[1]), null, self.ptr(outs[0]), np.int32(rows))
        else:
            bias = self.ptr(ins[3]) if len(ins) == 4 else null
            args = (self.ptr(ins[0]), self.ptr(ins[1]), bias, self.ptr(ins[2]), self.ptr(outs[0]), self.ptr(outs[1]),
                    np.int32(rows))
        self._go(nk.kernels["main"], dense_codegen.add_rmsnorm_launch(self.dtype, nk.params["D"], rows), args)

    def _launch_linear(self, nk: NodeKernels, T, B, prefill) -> None:
        p, ins, out = nk.params, nk.node.inputs, nk.node.outputs[0]
        rows = self._rows(out, T, B)
        bias = self.ptr(ins[2]) if p["has_bias"] else np.uint64(0)
        if not prefill or rows <= 2 * p["row_tile"]:
            launch = dense_codegen.gemv_launch(self.dtype, p["N"], p["K"], p["row_tile"], rows, p["epilogue"])
            self._go(nk.kernels["main"], launch, (self.ptr(ins[0]), self.ptr(ins[1]), bias, self.ptr(out), np.int32(rows)))
            return
        # prefill: cuBLAS GEMM, then the epilogue as element-wise kernels
        silu = p["epilogue"] == "silu_mul"
        gemm_out = np.uint64(self._gemm_scratch.data.ptr) if silu else self.ptr(out)
        gemm_dtype = self.dtype if silu else p["out_dtype"]
        linear_cublas(int(self.ptr(ins[0])), int(self.ptr(ins[1])), int(gemm_out), rows, p["N"], p["K"], self.dtype,
                      gemm_dtype, stream=self.stream)
        if p["has_bias"]:
            k = nk.kernels["bias"]
            self._go(k, dense_codegen.elementwise_launch("bias_add", gemm_dtype, p["N"], rows),
                     (gemm_out, bias, gemm_out, np.int32(rows)))
        if silu:
            I = p["N"] // 2
            self._go(nk.kernels["silu_halves"], dense_codegen.elementwise_launch("silu_mul_halves", self.dtype, I, rows),
                     (gemm_out, np.uint64(0), self.ptr(out), np.int32(rows)))

    def _launch_rope(self, nk: NodeKernels, T, B, prefill) -> None:
        n, p = nk.node, nk.params
        mode = p["mode"]
        if mode == "append":
            src, positions, seq_ids, kc, vc = n.inputs
            seq_lens = "seq_lens"
            q_out = np.uint64(0)
            kout, vout = self.ptr(kc), self.ptr(vc)
        else:
            src, positions, seq_ids, seq_lens = n.inputs[:4]
            q_out = self.ptr(n.outputs[0])
            if mode == "fused":
                kout, vout = self.ptr(n.inputs[4]), self.ptr(n.inputs[5])
            else:
                kout = vout = np.uint64(0)
        inv = self.inv_freq(n.attrs) if "theta" in n.attrs else None
        args = (self.ptr(src), self.ptr(positions), self.ptr(seq_ids), self.ptr(seq_lens),
                _ptr(inv) if inv is not None else np.uint64(0), q_out, kout, vout, np.int32(T))
        if mode == "append":  # kv_append has no rope attrs; the kernel ignores inv_freq
            args = args[:4] + (np.uint64(0),) + args[5:]
        launch = attn_codegen.rope_kv_append_launch(T, p["H"], p["KV"], p["D"], mode)
        self._go(nk.kernels["main"], launch, args)

    def _launch_sdpa(self, nk: NodeKernels, T, B, prefill) -> None:
        n, p = nk.node, nk.params
        q, kc, vc, positions, seq_ids = n.inputs
        out = self.ptr(n.outputs[0])
        if prefill:
            tiles = self._prefill_tiles[attn_codegen.attention_prefill_rows(p["D"])]
            launch = attn_codegen.attention_prefill_launch(int(tiles.shape[0]), p["H"], p["D"])
            self._go(nk.kernels["prefill"], launch, (self.ptr(q), self.ptr(kc), self.ptr(vc), self.ptr(positions),
                                                      self.ptr(seq_ids), _ptr(tiles), out, np.int32(tiles.shape[0])))
            return
        ws = _ptr(self._attn_ws)
        split, combine = attn_codegen.attention_decode_launch(T, p["H"], p["KV"], p["D"], self.max_seq)
        self._go(nk.kernels["split"], split, (self.ptr(q), self.ptr(kc), self.ptr(vc), self.ptr(positions),
                                              self.ptr(seq_ids), ws, np.int32(T)))
        self._go(nk.kernels["combine"], combine, (ws, self.ptr(positions), out, np.int32(T)))

    def _launch_gather(self, nk: NodeKernels, T, B, prefill) -> None:
        x, idx = nk.node.inputs
        launch = dense_codegen.gather_rows_launch(self.dtype, nk.params["D"], B)
        self._go(nk.kernels["main"], launch, (self.ptr(x), self.ptr(idx), self.ptr(nk.node.outputs[0]), np.int32(B)))

    def _launch_sample(self, nk: NodeKernels, T, B, prefill) -> None:
        args = tuple(self.ptr(v) for v in nk.node.inputs) + (self.ptr(nk.node.outputs[0]), np.int32(B))
        self._go(nk.kernels["main"], attn_codegen.sample_launch(B), args)

    def _launch_elementwise(self, nk: NodeKernels, T, B, prefill) -> None:
        n = nk.node
        rows = self._rows(n.outputs[0], T, B)
        b = self.ptr(n.inputs[1]) if len(n.inputs) > 1 else np.uint64(0)
        launch = dense_codegen.elementwise_launch(n.op, self.dtype, nk.params["D"], rows)
        self._go(nk.kernels["main"], launch, (self.ptr(n.inputs[0]), b, self.ptr(n.outputs[0]), np.int32(rows)))


def _family(op: str) -> str:
    if op in LINEAR_OPS:
        return "linear"
    if op in ROPE_MODES:
        return "rope"
    return {"embedding": "embedding", "rmsnorm": "norm", "add_rmsnorm": "norm", "sdpa": "sdpa",
            "gather_last": "gather", "topk_sample": "sample"}.get(op, "elementwise")


class RandomOnDevice:
    """Marker: draw random weights on the GPU (fast for 7B-size benchmark shapes)."""

    def __init__(self, seed: int = 0, scale: float = 0.02):
        self.seed, self.scale = seed, scale
