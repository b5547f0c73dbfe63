"""Launches as data: what a lowering says about running a node, and what an executor evaluates.

A ``Launch`` names a generated kernel (or a library function), its grid, block and dynamic
shared memory, and its arguments. Each argument is one of:

- ``value``: the device address of a graph value (arena offset, weight, KV cache, step input);
- ``workspace``: the address of a plan workspace (``Workspace``);
- ``const``: a number (or, for library calls, a dtype name) fixed at compile time;
- ``step``: a step scalar, known when the step runs: ``T`` tokens in the step, ``B`` sequences
  in the step, and ``<workspace>.n`` the rows of a step-filled workspace;
- ``null``: a null pointer (an optional input that is absent).

A ``value`` argument may carry a byte ``offset`` into the value (a chunk of rows). Grid extents
are numbers or ``Scaled`` step scalars. ``when`` makes a launch conditional on step scalars
(prefill picks cuBLAS or the GEMV by the row count this way).

A ``peer_kernel`` launch is a generated kernel that waits for the same launch on the other
tensor-parallel ranks (it reads and writes their memory directly); a runner driving several
ranks issues it on every rank before the launches after it. Its ``when`` may read a machine
scalar (``machine.<name>``): a fact about the executor that never changes while it lives (a
machine without peer access takes the collective's NCCL launches instead), 0 unless the
executor sets it.

On-demand launches compute an output only a step that asks for it needs (the prompt's
logprobs): their ``when`` holds ``wants(output)``, the step scalar ``wants.<output>`` that the
executor sets to 1 when the step fetches that output and to 0 otherwise. A captured phase is
captured with every ``wants.*`` at 0, so its graph leaves them out; a step that wants one runs
the phase's launches directly instead of replaying the graph. Workspaces are
scratch memory, constant tables uploaded once, or tables the executor rebuilds from a step
input before every step (``STEP_FILLS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Step scalars that are the same for every replay of a graph captured for one batch size.
BUCKET_SCALARS = ("T", "B")
WANTS = "wants."  # prefix of the on-demand step scalars: wants.<output value> is 1 when fetched
MACHINE = "machine."  # prefix of the scalars an executor fixes for its lifetime (0 unless it sets them)
NO_PEER_ACCESS = MACHINE + "no_peer_access"  # 1: the ranks cannot read each other's memory (use NCCL)
KERNEL_KINDS = ("kernel", "peer_kernel")  # launches of a generated kernel of the plan
# the phase that turns a decode step's inputs into the next decode step's on the device (its sampled
# tokens fed back), captured behind the decode phase for pipelined generation
ADVANCE = "advance"
# decode for a step that needs only greedy tokens and no logits: a plan whose vocabulary is split over
# tensor-parallel ranks gathers every rank's candidates instead of the logits (absent otherwise)
DECODE_GREEDY = "decode_greedy"


@dataclass(frozen=True)
class Scaled:
    """A grid extent that follows a step scalar: max(1, ceil(scalar * mul / div))."""

    scalar: str
    mul: int = 1
    div: int = 1

    def eval(self, scalars: dict[str, int]) -> int:
        return max(1, -(-scalars[self.scalar] * self.mul // self.div))


Extent = int | Scaled


def extent(rows: int | str, mul: int = 1, div: int = 1) -> Extent:
    """max(1, ceil(rows * mul / div)): a number for a known row count, a ``Scaled`` for a step scalar."""
    if isinstance(rows, str):
        return Scaled(rows, mul, div)
    return max(1, -(-rows * mul // div))


def resolve(e: Extent, scalars: dict[str, int]) -> int:
    return e.eval(scalars) if isinstance(e, Scaled) else int(e)


@dataclass(frozen=True)
class Shape:
    """Launch shape of one kernel: grid (numbers or step scalars), block, dynamic shared memory."""

    grid: tuple[Extent, Extent, Extent]
    block: tuple[int, int, int]
    smem: int = 0  # dynamic shared memory bytes (over 48 KiB needs the kernel's attribute raised)

    def at(self, scalars: dict[str, int]) -> "Shape":
        return Shape(tuple(resolve(e, scalars) for e in self.grid), self.block, self.smem)


@dataclass(frozen=True)
class Arg:
    kind: str  # "value" | "workspace" | "const" | "step" | "null"
    ref: str | int | float | None = None  # value / workspace / step scalar name, or the constant
    type: str = "ptr"  # C type passed: "ptr", "i32", "f32"; "str" for a library call's dtype names
    offset: int = 0  # "value": bytes past the value's start (a chunk of its rows)


ARG_KINDS = ("value", "workspace", "const", "step", "null")


def value(name: str, offset: int = 0) -> Arg:
    return Arg("value", name, "ptr", offset)


def workspace(name: str) -> Arg:
    return Arg("workspace", name)


def const(x: int | float | str) -> Arg:
    return Arg("const", x, "str" if isinstance(x, str) else "f32" if isinstance(x, float) else "i32")


def step(scalar: str) -> Arg:
    return Arg("step", scalar, "i32")


NULL = Arg("null")


@dataclass(frozen=True)
class Cond:
    """Run the launch only when ``scalar <op> bound`` for this step."""

    scalar: str
    op: str  # "<=" or ">"
    bound: int

    def holds(self, scalars: dict[str, int]) -> bool:
        v = scalars.get(self.scalar, 0) if self.scalar.startswith((WANTS, MACHINE)) else scalars[self.scalar]
        return v <= self.bound if self.op == "<=" else v > self.bound


def wants(output: str) -> Cond:
    """The condition of an on-demand launch: the step fetches ``output``."""
    return Cond(WANTS + output, ">", 0)


@dataclass(frozen=True)
class Launch:
    fn: str  # kernel name in the plan's source, or a library function (kind "library")
    shape: Shape | None
    args: tuple[Arg, ...]
    kind: str = "kernel"  # "kernel" | "peer_kernel" | "library" | "collective"
    when: tuple[Cond, ...] = ()  # every one must hold for the launch to run
    node: int = -1  # index of the graph node it computes (set when the plan is assembled)
    # the kernel waits for the kernel before it itself (lg_pdl_wait at its top): it may be launched
    # before that one finishes (programmatic dependent launch), overlapping its start-up
    early: bool = False
    # argument indices the kernel reads before its lg_pdl_wait (the kernel before it may still be
    # running): CompiledPlan.check proves the launch before it writes none of them
    reads_early: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"{self.kind} {self.fn}"

    def runs(self, scalars: dict[str, int]) -> bool:
        return all(c.holds(scalars) for c in self.when)

    @property
    def on_demand(self) -> str | None:
        """The output an on-demand launch computes, else None."""
        return next((c.scalar[len(WANTS):] for c in self.when if c.scalar.startswith(WANTS)), None)


@dataclass(frozen=True)
class Workspace:
    name: str
    nbytes: int
    # "scratch" (uninitialised) | "zeros" (zeroed once; its kernels leave it zeroed) | "table" (``data``,
    # uploaded once) | "seq_tiles" (rebuilt every step) | "peer_mailbox" (zeroed once; its kernels keep
    # their own state in it; the other ranks' kernels write into it) | "peer_table" (u64: this rank,
    # then the address of workspace ``source`` on every rank, written by the executor)
    fill: str = "scratch"
    data: tuple = ()  # "table": float32 contents
    source: str = ""  # "seq_tiles": the step input it is built from
    rows: int = 0  # "seq_tiles": most rows per tile


WORKSPACE_FILLS = ("scratch", "zeros", "table", "seq_tiles", "peer_mailbox", "peer_table")


def seq_tiles(seq_ids: np.ndarray, rows: int) -> np.ndarray:
    """int32 [n, 2] of (first row, row count <= rows): consecutive rows of one sequence, never
    crossing into the next. Prefill attention gives each tile one block."""
    seq_ids = np.asarray(seq_ids)
    if seq_ids.size == 0:
        return np.zeros((0, 2), np.int32)
    starts = np.flatnonzero(np.r_[True, seq_ids[1:] != seq_ids[:-1]])
    counts = np.diff(np.r_[starts, len(seq_ids)])
    tiles = [(int(s) + i, min(rows, int(n) - i)) for s, n in zip(starts, counts) for i in range(0, int(n), rows)]
    return np.asarray(tiles, dtype=np.int32).reshape(-1, 2)


# fill kind -> (step input array, workspace) -> the table to write before the step
STEP_FILLS = {"seq_tiles": lambda source, ws: seq_tiles(source, ws.rows)}


# ---- JSON ---------------------------------------------------------------------------------------


def _extent_json(e: Extent):
    return asdict(e) if isinstance(e, Scaled) else e


def _extent_from(d) -> Extent:
    return Scaled(**d) if isinstance(d, dict) else int(d)


def launch_to_dict(launch: Launch) -> dict:
    d: dict = {"node": launch.node, "kind": launch.kind, "fn": launch.fn}
    if launch.shape is not None:
        d["grid"] = [_extent_json(e) for e in launch.shape.grid]
        d["block"] = list(launch.shape.block)
        d["smem"] = launch.shape.smem
    d["args"] = [[a.kind, a.ref, a.type] + ([a.offset] if a.offset else []) for a in launch.args]
    if launch.when:
        d["when"] = [[c.scalar, c.op, c.bound] for c in launch.when]
    if launch.early:
        d["early"] = True
    if launch.reads_early:
        d["reads_early"] = list(launch.reads_early)
    return d


def launch_from_dict(d: dict) -> Launch:
    shape = None
    if "grid" in d:
        shape = Shape(tuple(_extent_from(e) for e in d["grid"]), tuple(d["block"]), d["smem"])
    return Launch(d["fn"], shape, tuple(Arg(*a) for a in d["args"]), d["kind"],
                  tuple(Cond(*c) for c in d.get("when", ())), d["node"], bool(d.get("early", False)),
                  tuple(int(i) for i in d.get("reads_early", ())))


def workspace_to_dict(ws: Workspace) -> dict:
    d = asdict(ws)
    d["data"] = list(ws.data)
    return d


def workspace_from_dict(d: dict) -> Workspace:
    return Workspace(**{**d, "data": tuple(d.get("data", ()))})


__all__ = [
    "ADVANCE", "Arg", "DECODE_GREEDY", "BUCKET_SCALARS", "Cond", "KERNEL_KINDS", "MACHINE", "NO_PEER_ACCESS", "WANTS", "Extent", "Launch", "NULL", "STEP_FILLS", "Scaled", "Shape", "Workspace",
    "const", "extent", "resolve", "seq_tiles", "step", "value", "wants", "workspace",
]
