"""The numpy reference executor: runs a compiled plan's *planned* graph inside one flat arena.

Every activation is a view at its planned byte offset in a single uint8 arena, so a
memory-planning or fusion bug shows up as wrong numbers on a CPU. Each node runs its op's
numpy reference from the registry in fp32, and its outputs are rounded to their storage dtype
where they are stored, as the GPU kernels do. It reads no launch list: it is the semantics the
launch lists must reproduce.
"""

from __future__ import annotations

import numpy as np

from llamagraph.codegen.compiled import CompiledPlan
from llamagraph.codegen.sample import advance_decode_ref
from llamagraph.ir import ACTIVATION, INPUT, KV_CACHE, OPS, Graph
from llamagraph.ir.dtypes import DTYPES, to_float32, to_storage
from llamagraph.ir.quant import dequantize


class ReferenceExecutor:
    name = "reference"

    def __init__(self, plan: CompiledPlan | Graph, weights: dict[str, np.ndarray]):
        self.graph = graph = plan.graph if isinstance(plan, CompiledPlan) else plan
        self.arena = np.zeros(graph.meta["memory"]["arena_bytes"], np.uint8)
        # Weights are read in fp32 every step; convert once (they are already rounded to storage).
        self.weights = {k: to_float32(w, graph.values[k].dtype) for k, w in weights.items()}
        for name, w in list(self.weights.items()):  # a quantized weight is read as w' (llamagraph.ir.quant)
            q = graph.values[name].quant
            if q is not None:
                zeros = self.weights[q.zeros] if q.zeros else None
                self.weights[name] = dequantize(w, self.weights[q.scales], zeros, q.scheme, q.group_size)
        self.persistent: dict[str, np.ndarray] = {}
        for v in graph.values.values():
            if v.kind in (INPUT, KV_CACHE) and "alias" not in v.attrs:
                self.persistent[v.name] = np.zeros(v.concrete_shape(graph.dims), DTYPES[v.dtype].storage)

    def reset(self) -> None:
        for arr in self.persistent.values():
            arr[...] = 0

    def decode_ahead(self, inputs: dict[str, np.ndarray], n_seqs: int, fetch: list[str], steps: int, depth=None,
                     greedy: bool = False):
        return decode_by_advancing(self, inputs, n_seqs, fetch, steps)

    def _storage(self, name: str, dims: dict[str, int]) -> np.ndarray:
        v = self.graph.values[name]
        if v.kind == ACTIVATION:
            shape = v.concrete_shape(dims)
            return np.ndarray(shape, DTYPES[v.dtype].storage, buffer=self.arena, offset=v.attrs["offset"])
        arr = self.persistent[v.attrs.get("alias", name)]
        if v.kind == INPUT:
            return arr[: v.concrete_shape(dims)[0]]
        return arr

    def _read(self, name: str, dims: dict[str, int]) -> np.ndarray:
        if name in self.weights:
            return self.weights[name]
        return to_float32(self._storage(name, dims), self.graph.values[name].dtype)

    def step(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int, fetch: list[str],
             greedy: bool = False) -> dict[str, np.ndarray]:
        """Run one step and return the ``fetch``ed values, cut to this step's rows (``greedy``
        changes nothing here: the CUDA executors' decode_greedy phase computes the same tokens).

        Any activation, step input or KV cache can be fetched; an intermediate activation holds
        its own data only in a plan compiled with ``keep_values=True`` (otherwise later nodes
        may have reused its buffer)."""
        dims = self.feed(inputs, n_tokens, n_seqs)
        for node in self.graph.nodes:
            if OPS[node.op].on_demand and not set(node.outputs) & set(fetch):
                continue  # computed only for a step that asks for it, as on the GPU
            self.write(node, OPS[node.op].reference(self.read(node, dims), node.attrs), dims)
        return self.fetch(fetch, dims)

    # one step in pieces, so that TensorParallelReference can run several ranks node by node
    def feed(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int) -> dict[str, int]:
        dims = {"T": n_tokens, "B": n_seqs}
        for name, arr in inputs.items():
            self._storage(name, dims)[...] = arr
        return dims

    def read(self, node, dims: dict[str, int]) -> list[np.ndarray]:
        return [self._read(i, dims) for i in node.inputs]

    def write(self, node, outs: list[np.ndarray], dims: dict[str, int]) -> None:
        for name, arr in zip(node.outputs, outs):
            dst = self._storage(name, dims)
            dst[...] = to_storage(arr, self.graph.values[name].dtype).reshape(dst.shape)

    def fetch(self, names: list[str], dims: dict[str, int]) -> dict[str, np.ndarray]:
        return {name: self._storage(name, dims).copy() for name in names}


class TensorParallelReference:
    """N ranks of a tensor-parallel plan simulated in one process: each rank is a
    ``ReferenceExecutor`` over the same planned rank graph with its own shard of the weights (its
    own arena and KV cache); they run node by node in lockstep, and a collective node (its op marked
    ``collective`` in the registry) reads every rank's inputs and writes every rank's outputs, partial sums added
    in rank order. Rank 0's values are what a step returns (after a collective every rank holds
    the same ones)."""

    name = "reference"

    def __init__(self, plan: CompiledPlan | Graph, weights: list[dict[str, np.ndarray]]):
        self.graph = plan.graph if isinstance(plan, CompiledPlan) else plan
        self.ranks = [ReferenceExecutor(plan, w) for w in weights]

    def reset(self) -> None:
        for rank in self.ranks:
            rank.reset()

    def decode_ahead(self, inputs: dict[str, np.ndarray], n_seqs: int, fetch: list[str], steps: int, depth=None,
                     greedy: bool = False):
        return decode_by_advancing(self, inputs, n_seqs, fetch, steps)

    def step(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int, fetch: list[str],
             greedy: bool = False) -> dict[str, np.ndarray]:
        dims = [rank.feed(inputs, n_tokens, n_seqs) for rank in self.ranks][0]
        for node in self.graph.nodes:
            op = OPS[node.op]
            if op.on_demand and not set(node.outputs) & set(fetch):
                continue
            if op.collective:
                outs = op.reference([rank.read(node, dims) for rank in self.ranks], node.attrs)
                for rank, rank_outs in zip(self.ranks, outs):
                    rank.write(node, rank_outs, dims)
            else:
                for rank in self.ranks:
                    rank.write(node, op.reference(rank.read(node, dims), node.attrs), dims)
        return self.ranks[0].fetch(fetch, dims)


def decode_by_advancing(executor, inputs: dict[str, np.ndarray], n_seqs: int, fetch: list[str], steps: int):
    """``CudaExecutor.decode_ahead``'s meaning, step by step: ``steps`` decode steps, each after
    the first fed the inputs the plan's advance phase makes of the step before
    (``advance_decode_ref``: its sampled tokens, one position on). Yields each step's values."""
    token = executor.graph.with_role("next_token")
    for _ in range(steps):
        got = executor.step(inputs, n_seqs, n_seqs, list(dict.fromkeys(fetch + [token])))
        inputs = advance_decode_ref({**inputs, "next_token": got[token]})
        yield {name: got[name] for name in fetch}
