"""Tensor-parallel execution on N GPUs: one process drives them all, rank r on GPU r.

Every rank is an ordinary ``CudaExecutor`` of the same planned rank graph, bound to its own shard
of the weights (``Value.shard``) on its own device and stream, and holding its own NCCL
communicator (``cupy.cuda.nccl``, one clique made by ``NcclCommunicator.initAll``). A step walks
the phase's launch list once, in segments cut at the collectives: each rank issues the kernels
of a segment on its stream, then the collective is issued for every rank: an NCCL call inside one
NCCL group (one thread driving several devices must group its calls, or the first rank's call
would wait for ranks not yet called), or a peer kernel (the all-reduce) rank by rank. A peer
kernel reads and writes the other ranks' memory directly (peer access, enabled here; the
``peer_table`` workspace of each rank lists every rank's mailbox); where a pair of GPUs cannot,
the machine scalar ``no_peer_access`` switches the plan to its NCCL alternatives. A decode step is captured this way too: every rank's stream is in
capture at once (relaxed mode, as several captures are open in one thread), so each rank's
graph holds its kernels and its NCCL calls, and a step replays N graphs.

Why one process rather than one per GPU: the ``Plan`` API (``run``, ``generate``, ``chat``)
stays exactly as it is with no worker processes, pipes or shared-memory handoff of tokens and
logits; the host work per decode step is N graph launches, a few microseconds each, so one
thread keeps up. It stops scaling where one host thread cannot feed the GPUs (eager prefill
launches are issued N times in turn) and it cannot span machines; ``docs/multi_node.md``
describes the multi-process form that would.
"""

from __future__ import annotations

import os

import numpy as np

from llamagraph.codegen.compiled import CompiledPlan
from llamagraph.codegen.launch import ADVANCE, DECODE_GREEDY, NO_PEER_ACCESS
from llamagraph.ir import BackendError

from .cuda import CudaExecutor, _cupy, graph_key, run_ahead


class CudaTensorParallel:
    name = "cuda"

    def __init__(self, plan: CompiledPlan, weights: list, progress: bool = False):
        cp = self.cp = _cupy()
        self.plan, self.graph = plan, plan.graph
        tp = int(plan.graph.meta.get("tp", 1))
        if len(weights) != tp:
            raise ValueError(f"a tp {tp} plan needs {tp} weight sets, got {len(weights)}")
        found = cp.cuda.runtime.getDeviceCount()
        if found < tp:
            raise BackendError(f"tp {tp} needs {tp} GPUs (one per rank); this machine has {found}")
        self.ranks: list[CudaExecutor] = []
        for r in range(tp):
            with cp.cuda.Device(r):
                self.ranks.append(CudaExecutor(plan, weights[r], progress=progress))
        assert len({rank.input_bytes for rank in self.ranks}) == 1  # one plan: one input layout (stage_like)
        from cupy.cuda import nccl

        self.nccl = nccl
        self.comms = nccl.NcclCommunicator.initAll(list(range(tp)))
        for rank, comm in zip(self.ranks, self.comms):
            rank.comm = comm
        # peer kernels (the all-reduce) read and write the other ranks' memory; without peer access
        # between every pair (or with LLAMAGRAPH_P2P=0) the plan's NCCL alternatives run instead
        self.peer_access = os.environ.get("LLAMAGRAPH_P2P", "1") != "0" and self._enable_peer_access()
        for r, rank in enumerate(self.ranks):
            with cp.cuda.Device(r):
                rank.machine[NO_PEER_ACCESS] = 0 if self.peer_access else 1
                rank.set_peers(r, self.ranks)
        self.graphs: dict[int, list] = {}  # batch size -> every rank's captured decode step
        self.ahead_graphs: dict[int, list] = {}  # batch size -> every rank's decode + advance (decode_ahead)
        # each phase's launch list cut at its collectives, once: [(first, end, collective index or None)]
        self.segments = {phase: _segments([launch for launch, _, _ in prepared])
                         for phase, prepared in self.ranks[0].prepared.items()}

    def _enable_peer_access(self) -> bool:
        """Let every rank's GPU address every other's memory; False where a pair cannot."""
        rt = self.cp.cuda.runtime
        n = len(self.ranks)
        if not all(rt.deviceCanAccessPeer(r, q) for r in range(n) for q in range(n) if q != r):
            return False
        for r in range(n):
            with self.cp.cuda.Device(r):
                for q in range(n):
                    if q != r:
                        try:
                            rt.deviceEnablePeerAccess(q)
                        except rt.CUDARuntimeError as e:  # enabled already (an earlier runner in this process)
                            if "PeerAccessAlreadyEnabled" not in str(e):
                                raise
        return True

    def close(self) -> None:
        """Release the communicators (also when the runner is garbage-collected).

        ncclCommDestroy is a collective among the ranks of a node: one thread destroying the
        clique's communicators one after another (which is what letting cupy free them would do)
        waits in the first for the others and never returns. Every rank's work is finished first,
        then each communicator is aborted, which frees it locally."""
        comms, self.comms = getattr(self, "comms", []), []
        if not comms:
            return
        self.synchronize()
        self.graphs.clear()  # captured graphs hold NCCL calls on these communicators
        self.ahead_graphs.clear()
        for r, comm in enumerate(comms):
            with self.cp.cuda.Device(r):
                comm.abort()
        for rank in self.ranks:
            rank.comm = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass

    # the executor interface Plan uses -------------------------------------------------------------
    def reset(self) -> None:
        for r, rank in enumerate(self.ranks):
            with self.cp.cuda.Device(r):
                rank.reset()

    def step(self, inputs: dict[str, np.ndarray], n_tokens: int, n_seqs: int, fetch: list[str],
             greedy: bool = False) -> dict[str, np.ndarray]:
        """One step on every rank; rank 0's ``fetch``ed values (after the collectives every rank
        holds the same logits and tokens). ``greedy``: as ``CudaExecutor.step``."""
        cp = self.cp
        with cp.cuda.Device(0):  # the inputs are packed once, in rank 0's pinned buffer, and copied to every rank
            phase, first, wanted = self.ranks[0].stage(inputs, n_tokens, n_seqs, fetch, greedy)
        scalars = [first]
        for r, rank in enumerate(self.ranks[1:], 1):
            with cp.cuda.Device(r):
                scalars.append(rank.stage_like(self.ranks[0], first))
        if phase in self.plan.captured and not wanted:
            key = graph_key(phase, n_seqs)
            graphs = self.graphs.get(key)
            if graphs is None:
                graphs = self.graphs[key] = self._capture(phase, scalars)
            for r, (rank, graph) in enumerate(zip(self.ranks, graphs)):
                with cp.cuda.Device(r):
                    graph.launch(rank.stream)
        else:
            self.launch_phase(phase, scalars)
        # Rank 0's results are every rank's (after the gather); the other ranks are not waited for:
        # their next work is ordered on their streams, and they have read rank 0's pinned inputs,
        # which the next step rewrites, before their part in this step's collectives let rank 0 finish.
        with cp.cuda.Device(0):
            return self.ranks[0].collect(fetch, scalars[0])

    def decode_ahead(self, inputs: dict[str, np.ndarray], n_seqs: int, fetch: list[str], steps: int,
                     depth: int | None = None, greedy: bool = False):
        """``CudaExecutor.decode_ahead`` on every rank: each rank's graph of decode + advance
        moves its own inputs on (every rank samples the same tokens); rank 0's values are yielded."""
        cp = self.cp
        with cp.cuda.Device(0):
            phase, first, wanted = self.ranks[0].stage(inputs, n_seqs, n_seqs, fetch, greedy)
        if phase not in ("decode", DECODE_GREEDY) or wanted:
            raise ValueError("decode_ahead runs decode steps (one token per sequence) with no on-demand output")
        scalars = [first]
        for r, rank in enumerate(self.ranks[1:], 1):
            with cp.cuda.Device(r):
                scalars.append(rank.stage_like(self.ranks[0], first))
        key = graph_key(phase, n_seqs)
        graphs = self.ahead_graphs.get(key)
        if graphs is None:
            graphs = self.ahead_graphs[key] = self._capture(phase, scalars, (phase, ADVANCE))

        def launch() -> None:
            for r, (rank, graph) in enumerate(zip(self.ranks, graphs)):
                with cp.cuda.Device(r):
                    graph.launch(rank.stream)
        yield from run_ahead(self.ranks[0], launch, self.synchronize, fetch, first, steps, depth)

    # launching ------------------------------------------------------------------------------------
    def launch_phase(self, phase: str, scalars: list[dict[str, int]]) -> None:
        """Every launch of ``phase`` on every rank, kernels rank by rank between collectives."""
        cp = self.cp
        lists = [rank.prepared[phase] for rank in self.ranks]
        for first, end, collective in self.segments[phase]:
            for r, rank in enumerate(self.ranks):  # the kernels before the collective, rank by rank
                with cp.cuda.Device(r):
                    for launch, fn, bound in lists[r][first:end]:
                        rank._issue(launch, fn, bound, scalars[r])
            if collective is None or not lists[0][collective][0].runs(scalars[0]):
                continue
            self.issue(phase, collective, scalars)

    def issue(self, phase: str, index: int, scalars: list[dict[str, int]]) -> None:
        """Launch ``index`` of ``phase`` on every rank: a kernel rank by rank (a peer kernel waits
        on the GPU for the others), an NCCL call inside one group."""
        cp = self.cp
        lists = [rank.prepared[phase] for rank in self.ranks]
        group = lists[0][index][0].kind == "collective"
        if group:
            self.nccl.groupStart()
        try:
            for r, rank in enumerate(self.ranks):
                with cp.cuda.Device(r):
                    rank._issue(*lists[r][index], scalars[r])
        finally:
            if group:
                self.nccl.groupEnd()

    def synchronize(self) -> None:
        for r, rank in enumerate(self.ranks):
            with self.cp.cuda.Device(r):
                rank.stream.synchronize()

    def capture(self, issue) -> list:
        """Every rank's stream captured at once while ``issue()`` issues work on them: one graph per rank."""
        cp = self.cp
        begun = []
        try:
            for r, rank in enumerate(self.ranks):
                with cp.cuda.Device(r):
                    rank.stream.begin_capture(mode=cp.cuda.runtime.streamCaptureModeRelaxed)
                    begun.append(r)
            issue()
        finally:
            graphs = []
            for r in begun:
                with cp.cuda.Device(r):
                    graphs.append(self.ranks[r].stream.end_capture())
        return graphs

    def _capture(self, phase: str, scalars: list[dict[str, int]], phases: tuple[str, ...] | None = None) -> list:
        """Every rank's graph of ``phase`` (or of ``phases`` in turn, the first being ``phase``) for
        one batch size, captured together."""
        self.launch_phase(phase, scalars)  # once outside capture: lazy initialisation (NCCL's too)
        self.synchronize()

        def issue() -> None:
            for p in phases or (phase,):
                self.launch_phase(p, scalars)
        return self.capture(issue)


def _segments(launches: list) -> list[tuple[int, int, int | None]]:
    """(first, end, collective): launches[first:end] are kernels, then launch ``collective`` (None
    after the last collective): an NCCL call or a peer kernel, which every rank must have issued
    before any rank's next launch (a rank's queue could otherwise fill with launches stuck behind
    a peer kernel that waits for a rank not yet called)."""
    out, first = [], 0
    for i, launch in enumerate(launches):
        if launch.kind in ("collective", "peer_kernel"):
            out.append((first, i, i))
            first = i + 1
    out.append((first, len(launches), None))
    return out
