"""The compiled plan: the contract between the compiler and the executors.

A ``CompiledPlan`` holds everything an executor needs and nothing it must recompute: the
fused, memory-planned graph (its values carry their layouts and arena offsets), the CUDA
source of every kernel, the launch list of each phase, the workspaces those launches use and
the phases that are captured into CUDA graphs. Like a TensorRT engine or TVM's VM executable
it is an artifact: ``save`` writes ``plan.json`` with ``kernels.cu`` beside it, ``load`` reads
them back, and an executor runs the result without running a pass or a lowering.

Before a phase may be captured, ``check_capturable`` proves its launch list graph-safe:
1. every argument that changes between steps is read from device memory (a step input the
   executor copies in before each replay), never passed by value at capture: the only step
   scalars a captured launch may use are those fixed per captured batch size (``T``, ``B``),
   and no workspace the host rebuilds each step;
   (on-demand launches, gated by ``wants.<output>``, are left out of every capture: a step that
   wants their output runs the phase directly, so they are not checked here)
2. no launch is a library call (cupy refuses cuBLAS during stream capture);
3. every address is fixed for the plan's lifetime: a planned arena offset, a persistent weight,
   cache or input, or a declared workspace.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from typing import Callable, TypeVar

from llamagraph.ir import ACTIVATION, Graph, verify
from llamagraph.ir.errors import GraphError, PlanError
from llamagraph.ir.jsontext import dumps_lines

from .launch import (
    ARG_KINDS, BUCKET_SCALARS, KERNEL_KINDS, MACHINE, WORKSPACE_FILLS, Launch, Scaled, Workspace, launch_from_dict, launch_to_dict,
    workspace_from_dict, workspace_to_dict,
)

FORMAT = "llamagraph-plan/2"  # 2: conditions are lists; value arguments may carry an offset
PLAN_FILE, SOURCE_FILE = "plan.json", "kernels.cu"
T = TypeVar("T")
# (an attribute macro of the prelude, LG_...(...), may stand before the launch bounds)
_KERNEL_DEF = re.compile(r'extern "C" __global__ void(?: LG_[A-Z0-9_]+\([^)]*\))?(?: __launch_bounds__\([^)]*\))?\s+(\w+)\s*\(')


def defined_kernels(source: str) -> list[str]:
    """Names of the ``extern "C" __global__`` functions a CUDA source defines."""
    return _KERNEL_DEF.findall(source)


@dataclass
class CompiledPlan:
    graph: Graph  # fused and memory-planned
    source: str  # kernels.cu: the prelude and every kernel once
    kernels: list[str]  # kernel names, in the order the source defines them
    workspaces: list[Workspace]
    phases: dict[str, list[Launch]]  # "decode": one token per sequence; "prefill": any other step
    captured: tuple[str, ...] = ("decode",)  # phases replayed as CUDA graphs, one per batch size
    model: str | None = None  # the config or checkpoint it was compiled from (default weights)

    # ---- what it holds ----------------------------------------------------------------------
    def kernel_launches(self, phase: str) -> int:
        """Kernel launches of a step of ``phase`` that asks for no on-demand output."""
        # counted for a step of one token: of a collective's alternatives, the peer kernel (machine
        # scalars are 0 unless an executor sets them)
        return sum(1 for launch in self.phases[phase] if launch.kind in KERNEL_KINDS and not launch.on_demand
                   and launch.runs({"T": 1, "B": 1}))

    def sizes(self) -> dict[str, int]:
        """Device bytes by region."""
        mem = self.graph.meta["memory"]
        return {"arena": mem["arena_bytes"], "weights": mem["weight_bytes"], "kv_cache": mem["kv_cache_bytes"],
                "inputs": mem["input_bytes"], "workspaces": sum(w.nbytes for w in self.workspaces)}

    def workspace(self, name: str) -> Workspace:
        for w in self.workspaces:
            if w.name == name:
                return w
        raise KeyError(name)

    # ---- checks -----------------------------------------------------------------------------
    def check(self, where: str | None = None) -> None:
        """Consistency: the graph verifies, the source defines exactly the named kernels, every
        kernel launch names one of them, every argument names something that exists, and every
        captured phase is graph-safe. ``where``: the plan.json path, to name in errors."""
        at = f"{where}: " if where else ""
        source = os.path.join(os.path.dirname(where), SOURCE_FILE) if where else SOURCE_FILE
        try:
            verify(self.graph, "load")
        except GraphError as e:
            raise PlanError(f"{at}graph is not well formed: {e}") from None
        defined = defined_kernels(self.source)
        if sorted(defined) != sorted(self.kernels):
            missing = sorted(set(self.kernels) - set(defined)) or sorted(set(defined) - set(self.kernels))
            raise PlanError(f"{source} and {where or 'the plan'} disagree on kernel {missing[0]!r}")
        known = set(self.kernels)
        spaces = {w.name for w in self.workspaces}
        for w in self.workspaces:
            if w.fill not in WORKSPACE_FILLS:
                raise PlanError(f"{at}workspace {w.name!r} has unknown fill {w.fill!r}")
        for phase, launches in self.phases.items():
            for k, launch in enumerate(launches):
                here = f"{at}{phase} launch {k} ({launch.describe()})"
                if launch.kind in KERNEL_KINDS and launch.fn not in known:
                    raise PlanError(f"{here}: kernel {launch.fn!r} is not in {source}")
                for j, a in enumerate(launch.args):
                    if a.kind not in ARG_KINDS:
                        raise PlanError(f"{here}: argument {j} has unknown kind {a.kind!r}")
                    if a.kind == "value" and a.ref not in self.graph.values:
                        raise PlanError(f"{here}: argument {j} names no value of the graph: %{a.ref}")
                    if a.kind == "workspace" and a.ref not in spaces:
                        raise PlanError(f"{here}: argument {j} names no workspace of the plan: {a.ref!r}")
        for phase in self.captured:
            try:
                check_capturable(self, phase)
            except PlanError as e:
                raise PlanError(f"{at}{e}") from None
        for phase in self.phases:
            try:
                check_early_reads(self, phase)
            except PlanError as e:
                raise PlanError(f"{at}{e}") from None

    # ---- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "kernels": self.kernels,
            "source_sha256": hashlib.sha256(self.source.encode()).hexdigest(),
            "captured": list(self.captured),
            "workspaces": [workspace_to_dict(w) for w in self.workspaces],
            "phases": {p: [launch_to_dict(launch) for launch in ls] for p, ls in self.phases.items()},
            "graph": self.graph.to_dict(),
        }

    def save(self, outdir: str) -> list[str]:
        """Write ``plan.json`` and ``kernels.cu`` as the directory ``outdir``, whole or not at all
        (see ``write_whole``); return the file names."""
        return write_whole(outdir, self.write_files)

    def write_files(self, folder: str) -> list[str]:
        """Write ``plan.json`` and ``kernels.cu`` into an existing ``folder``; return the file names."""
        with open(os.path.join(folder, SOURCE_FILE), "w", encoding="utf-8") as f:
            f.write(self.source)
        text = dumps_lines(self.to_dict())  # one launch a line (json's indent= walks it in Python: slow)
        with open(os.path.join(folder, PLAN_FILE), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        return [PLAN_FILE, SOURCE_FILE]

    @classmethod
    def load(cls, plan_dir: str) -> "CompiledPlan":
        """Read a plan written by ``save`` (``llamagraph compile -o DIR``) and check it."""
        path = os.path.join(plan_dir, PLAN_FILE)
        if not os.path.isfile(path):
            raise PlanError(f"{plan_dir}: no {PLAN_FILE} (write one with: llamagraph compile MODEL -o {plan_dir})")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            with open(os.path.join(plan_dir, SOURCE_FILE), encoding="utf-8") as f:
                source = f.read()
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except OSError as e:
            raise PlanError(f"{plan_dir}: cannot read the plan ({e.strerror}: {e.filename})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else None
            raise PlanError(f"{path}: format {got!r} is not {FORMAT!r}; recompile with this llamagraph")
        if hashlib.sha256(source.encode()).hexdigest() != d["source_sha256"]:
            raise PlanError(f"{os.path.join(plan_dir, SOURCE_FILE)}: does not match the source {PLAN_FILE} was written with")
        try:
            plan = cls(
                graph=Graph.from_dict(d["graph"]),
                source=source,
                kernels=list(d["kernels"]),
                workspaces=[workspace_from_dict(w) for w in d["workspaces"]],
                phases={p: [launch_from_dict(x) for x in ls] for p, ls in d["phases"].items()},
                captured=tuple(d["captured"]),
                model=d.get("model"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{path}: malformed plan ({type(e).__name__}: {e})") from None
        plan.check(path)
        return plan


def write_whole(outdir: str, write: Callable[[str], T]) -> T:
    """Write the directory ``outdir`` whole or not at all, and return what ``write`` returns.

    ``write(tmp)`` fills a new directory beside ``outdir``, which then takes its place by rename:
    a failure part-way (a full disk, Ctrl-C) leaves ``outdir`` as it was. An existing ``outdir``
    is replaced whole, never merged into, and only when it is empty or a plan directory (it
    holds plan.json), so a mistyped ``-o`` cannot delete other files."""
    target = os.path.realpath(outdir)  # a link to a plan directory: replace what it points to
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise NotADirectoryError(errno.ENOTDIR, "output directory exists and is not a directory", outdir)
        held = sorted(os.listdir(target))
        if held and PLAN_FILE not in held:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise PlanError(f"{outdir}: exists and is not a plan directory (it holds {shown}); choose a new "
                            "directory, or a plan directory to replace")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.{secrets.token_hex(4)}")
    os.mkdir(tmp)  # (mkdir, unlike mkdtemp, gives the plan directory the usual umask permissions)
    try:
        result = write(tmp)
        if os.path.isdir(target):
            old = tmp + ".old"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when something failed
    return result


def _storage(g: Graph, name: str) -> tuple:
    """Where a value lives: ("arena", first byte, end) for an activation, else ("value", its storage name)."""
    v = g.values[name]
    if v.kind == ACTIVATION:
        return ("arena", v.attrs["offset"], v.attrs["offset"] + v.nbytes(g.dims))
    return ("value", v.attrs.get("alias", name))


def _overlap(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    return a[1] < b[2] and b[1] < a[2] if a[0] == "arena" else a[1] == b[1]


def _ranges(conds) -> dict[str, tuple[float, float]]:
    """Per step scalar, the closed range of values where every condition holds."""
    out: dict[str, tuple[float, float]] = {}
    for c in conds:
        lo, hi = out.get(c.scalar, (float("-inf"), float("inf")))
        out[c.scalar] = (lo, min(hi, c.bound)) if c.op == "<=" else (max(lo, c.bound + 1), hi)
    return out


def _never_together(a, b) -> bool:
    """No step runs both a launch of conditions ``a`` and one of conditions ``b``."""
    return any(lo > hi for lo, hi in _ranges(tuple(a) + tuple(b)).values())


def _runs_whenever(before, conds) -> bool:
    """A launch of conditions ``before`` runs in every step that runs one of conditions ``conds``."""
    have, anything = _ranges(conds), (float("-inf"), float("inf"))
    return all(lo <= have.get(s, anything)[0] and have.get(s, anything)[1] <= hi for s, (lo, hi) in _ranges(before).items())


def check_early_reads(plan: CompiledPlan, phase: str) -> None:
    """Raise ``PlanError`` where a launch reads an argument before its PDL wait (``reads_early``) that
    the launch before it may write: that kernel may still be running. Every launch that can run just
    before it counts: walking back, launches that never run in the same step are passed over, and the
    walk ends at the first that runs whenever this one does. A launch whose writes are not known (no
    graph node) writes everything; the first launch of a phase follows whatever ran last, so it may
    read nothing early."""
    g = plan.graph
    launches = plan.phases[phase]
    for k, launch in enumerate(launches):
        if not launch.reads_early:
            continue
        where = f"{phase} launch {k} ({launch.describe()})"
        for j in launch.reads_early:
            a = launch.args[j] if 0 <= j < len(launch.args) else None
            if a is None or a.kind != "value":
                raise PlanError(f"{where}: reads_early names argument {j}, which is not a value")
            read = _storage(g, a.ref)
            p = k - 1
            while True:
                if p < 0:
                    raise PlanError(f"{where}: reads argument {j} (%{a.ref}) before its wait, but it is the first "
                                    "launch of the phase: whatever ran last may still write it")
                before = launches[p]
                if _never_together(before.when, launch.when):
                    p -= 1
                    continue
                if not 0 <= before.node < len(g.nodes):
                    raise PlanError(f"{where}: reads argument {j} (%{a.ref}) before its wait, but launch {p} "
                                    f"({before.describe()}) before it may write anything")
                for out in g.nodes[before.node].outputs:
                    if _overlap(read, _storage(g, out)):
                        raise PlanError(f"{where}: reads argument {j} (%{a.ref}) before its wait, but launch {p} "
                                        f"({before.describe()}) before it writes %{out}, which shares its memory")
                if _runs_whenever(before.when, launch.when):
                    break
                p -= 1


def check_capturable(plan: CompiledPlan, phase: str) -> None:
    """Raise ``PlanError`` naming the launch and argument that would make ``phase`` unsafe to
    capture into a CUDA graph (see the module docstring for the three rules)."""
    spaces = {w.name: w for w in plan.workspaces}
    g = plan.graph

    def scalar_problem(name: str) -> str | None:
        if name in BUCKET_SCALARS or name.startswith(MACHINE):
            return None
        return (f"step scalar {name!r} changes between replays of a captured graph and would be baked in at "
                "capture; read it from device memory (a step input) instead")

    for k, launch in enumerate(plan.phases[phase]):
        if launch.on_demand:
            continue
        node = g.nodes[launch.node].name if 0 <= launch.node < len(g.nodes) else "?"
        where = f"{phase} launch {k} ({launch.describe()}, node {launch.node} '{node}')"
        if launch.kind == "library":  # a collective (NCCL) is captured like a kernel
            raise PlanError(f"{where}: a library call cannot be captured into a CUDA graph (cupy refuses cuBLAS "
                            "during stream capture); lower it to a generated kernel")
        for c in launch.when:
            if scalar_problem(c.scalar):
                raise PlanError(f"{where}: its condition reads {scalar_problem(c.scalar)}")
        for e in launch.shape.grid if launch.shape else ():
            if isinstance(e, Scaled) and scalar_problem(e.scalar):
                raise PlanError(f"{where}: its grid follows {scalar_problem(e.scalar)}")
        for j, a in enumerate(launch.args):
            arg = f"{where}: argument {j} ({a.kind} {a.ref!r})"
            if a.kind == "step" and scalar_problem(a.ref):
                raise PlanError(f"{arg}: {scalar_problem(a.ref)}")
            if a.kind == "workspace":
                ws = spaces.get(a.ref)
                if ws is None:
                    raise PlanError(f"{arg}: no such workspace, so no fixed address")
                if ws.fill == "seq_tiles":
                    raise PlanError(f"{arg}: the host rebuilds this workspace before every step; a replay would "
                                    "read whatever the last eager step left there")
            if a.kind == "value":
                v = g.values.get(a.ref)
                if v is None:
                    raise PlanError(f"{arg}: no such value, so no fixed address")
                if v.kind == ACTIVATION and "offset" not in v.attrs:
                    raise PlanError(f"{arg}: the activation has no planned arena offset, so no fixed address")
