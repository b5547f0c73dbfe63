"""The numpy reference backend: executes the *planned* graph inside one flat arena.

Every activation is a view at its planned byte offset in a single uint8 arena, so a
memory-planning or fusion bug shows up as wrong numbers on a CPU. Each op runs its numpy
reference in fp32 and its outputs are rounded to their storage dtype where they are stored,
as the GPU kernels do.
"""

from __future__ import annotations

import numpy as np

from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, OPS, Graph

from .dtypes import NUMPY_STORAGE, to_float32, to_storage


class ReferenceExecutor:
    name = "reference"

    def __init__(self, graph: Graph, weights: dict[str, np.ndarray]):
        self.graph = graph
        self.arena = np.zeros(graph.meta["memory"]["arena_bytes"], np.uint8)
        # Weights are read in fp32 every step; convert once (they are already rounded to storage).
        self.weights = {k: to_float32(w, graph.values[k].dtype) for k, w in weights.items()}
        self.persistent: dict[str, np.ndarray] = {}
        for v in graph.values.values():
            if v.kind in (INPUT, KV_CACHE) and "alias" not in v.attrs:
                self.persistent[v.name] = np.zeros(v.concrete_shape(graph.dims), NUMPY_STORAGE[v.dtype])

    def reset(self) -> None:
        for arr in self.persistent.values():
            arr[...] = 0

    def _storage(self, name: str, dims: dict[str, int]) -> np.ndarray:
        v = self.graph.values[name]
        if v.kind == ACTIVATION:
            shape = v.concrete_shape(dims)
            return np.ndarray(shape, NUMPY_STORAGE[v.dtype], buffer=self.arena, offset=v.attrs["offset"])
        base = v.attrs.get("alias", name)
        arr = self.persistent[base]
        if v.kind == INPUT:
            return arr[: v.concrete_shape(dims)[0]]
        return arr

    def _read(self, name: str, dims: dict[str, int]) -> np.ndarray:
        v = self.graph.values[name]
        if name in self.weights:
            return self.weights[name]
        return to_float32(self._storage(name, dims), v.dtype)

    def step(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int,
             want_logits: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        dims = {"T": n_tokens, "B": n_seqs}
        for name, arr in inputs.items():
            self._storage(name, dims)[...] = arr
        for node in self.graph.nodes:
            ins = [self._read(i, dims) for i in node.inputs]
            outs = OPS[node.op].reference(ins, node.attrs)
            for name, arr in zip(node.outputs, outs):
                dst = self._storage(name, dims)
                dst[...] = to_storage(arr, self.graph.values[name].dtype).reshape(dst.shape)
        logits, nxt = self.graph.outputs
        out = self._read(logits, dims).astype(np.float32).copy() if want_logits else None
        return out, self._storage(nxt, dims).copy()
